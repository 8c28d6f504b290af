"""Encoded images (JPEG or PNG bytes): their headers checked, decoded by OpenCV, letterboxed.

Each image's header is read before anything is decoded (:func:`inspect`): the format (JPEG or
PNG), the pixel size it declares (over ``max_pixels`` the image is refused: a decompression bomb
never reaches the decoder), and whether it is whole (a JPEG with no end-of-image marker after its
scan, a PNG with no ``IEND`` chunk: truncated). Then OpenCV decodes it (``IMREAD_COLOR``: gray and
CMYK become BGR, the EXIF orientation is applied) and :func:`letterbox_into` fits it into the
engine's frame as the SDK does: scale ``s = min(W / w, H / h)``, bilinear resize to
``(round(w * s), round(h * s))`` at the top-left, zeros elsewhere. A row that cannot be read is a
:class:`RowError` naming the row and the reason ("image row 2 of 4: truncated JPEG ...").

numpy and OpenCV only: ``model.py`` (the CPU preprocess, in a stock Triton container with
``opencv-python-headless``) and ``gpu_decoding.py`` (nvJPEG, for what it takes) share it.
"""

from dataclasses import dataclass

import cv2
import numpy as np

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_FRAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
               0xC5: "differential", 0xC6: "differential progressive", 0xC7: "differential lossless",
               0xC9: "arithmetic", 0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless",
               0xCD: "differential arithmetic", 0xCE: "differential arithmetic progressive",
               0xCF: "differential arithmetic lossless"}
JPEG_SCAN, JPEG_EXIF = 0xDA, 0xE1
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field
EXIF_ORIENTATION_TAG = 0x0112


class RequestError(ValueError):
    """An input the model cannot serve; its message goes back as the request's error."""


@dataclass(frozen=True)
class Header:
    """What an encoded image declares before decoding: format, size, colour components, JPEG
    frame type and EXIF orientation (1 = upright)."""

    kind: str
    width: int
    height: int
    components: int = 3
    frame: str = ""
    orientation: int = 1


def exif_orientation(tiff):
    """The orientation tag (1..8) of an EXIF block (the TIFF structure after ``Exif\\0\\0``); 1
    when there is none or the block is malformed (the image is then shown as stored)."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(tiff[ifd:ifd + 2], order), 12):
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == EXIF_ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_header(data):
    """The :class:`Header` of JPEG ``data``, walking its marker segments up to the first scan;
    raises :class:`RequestError` for a JPEG that is malformed or cut short."""
    at, frame, orientation = 2, None, 1
    while True:
        if at + 4 > len(data):
            raise RequestError(f"truncated JPEG: {len(data)} bytes end inside its header")
        if data[at] != 0xFF:
            raise RequestError(f"corrupt JPEG: no marker at byte {at} of its header")
        marker = data[at + 1]
        if marker == 0xFF or marker in STANDALONE_MARKERS:  # fill byte, or a marker with no length
            at += 1 if marker == 0xFF else 2
            continue
        if marker == JPEG_END[1]:
            raise RequestError("corrupt JPEG: it ends before any image data")
        length = int.from_bytes(data[at + 2:at + 4], "big")
        segment = data[at + 4:at + 2 + length]
        if length < 2 or len(segment) < length - 2:
            raise RequestError(f"truncated JPEG: {len(data)} bytes end inside its header")
        if marker in JPEG_FRAMES:
            if len(segment) < 6:
                raise RequestError("corrupt JPEG: its frame header is too short")
            frame = (JPEG_FRAMES[marker], int.from_bytes(segment[3:5], "big"),
                     int.from_bytes(segment[1:3], "big"), segment[5])
        elif marker == JPEG_EXIF and segment[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(segment[6:])
        elif marker == JPEG_SCAN:
            break
        at += 2 + length
    if frame is None:
        raise RequestError("corrupt JPEG: no frame header before its image data")
    if data.rfind(JPEG_END) < at:
        raise RequestError(f"truncated JPEG: {len(data)} bytes and no end-of-image marker after the image data")
    kind, width, height, components = frame
    return Header("JPEG", width, height, components, kind, orientation)


def png_header(data):
    """The :class:`Header` of PNG ``data`` (its IHDR chunk); raises :class:`RequestError` for a
    PNG that is malformed or cut short (no IEND chunk)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise RequestError(f"corrupt PNG: {len(data)} bytes and no IHDR chunk")
    if data.rfind(b"IEND") < 33:
        raise RequestError(f"truncated PNG: {len(data)} bytes and no IEND chunk")
    return Header("PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))


def inspect(data, max_pixels):
    """The :class:`Header` of encoded ``data`` (JPEG or PNG), checked: a readable header, whole,
    with at most ``max_pixels`` pixels. Raises :class:`RequestError` saying what is wrong."""
    if not data:
        raise RequestError("0 bytes: send the encoded image (JPEG or PNG)")
    if data[:2] == JPEG_START:
        header = jpeg_header(data)
    elif data[:8] == PNG_SIGNATURE:
        header = png_header(data)
    else:
        raise RequestError(f"not a JPEG or PNG ({len(data)} bytes starting {bytes(data[:8]).hex(' ')})")
    pixels = header.width * header.height
    if pixels == 0:
        raise RequestError(f"{header.kind} declares {header.width}x{header.height}: no pixels")
    if pixels > max_pixels:
        raise RequestError(f"{header.kind} declares {header.width}x{header.height} = {pixels / 1e6:.1f} MP, over "
                           f"the server's limit of {max_pixels / 1e6:g} MP; downscale it before sending")
    return header


def decode(data, header):
    """``data`` decoded by OpenCV as BGR uint8 [h, w, 3] (gray and CMYK converted, EXIF
    orientation applied); raises :class:`RequestError` when OpenCV cannot decode it."""
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise RequestError(f"{header.kind} could not be decoded ({exc.msg.strip()})") from None
    if image is None:
        raise RequestError(f"{header.kind} could not be decoded (corrupt data)")
    return image


def fitted_size(width, height, frame_width, frame_height):
    """``(scale, new_width, new_height)``: an image of ``width`` x ``height`` scaled to fit the
    frame, as the SDK's letterbox rounds it."""
    scale = min(frame_width / width, frame_height / height)
    return (scale, min(frame_width, max(1, round(width * scale))),
            min(frame_height, max(1, round(height * scale))))


def letterbox_into(image, out):
    """``image`` (BGR uint8 [h, w, 3]) resized into the top-left of ``out`` ([H, W, 3] uint8,
    written in place, zeros around it); returns the scale."""
    scale, new_w, new_h = fitted_size(image.shape[1], image.shape[0], out.shape[1], out.shape[0])
    if (new_w, new_h) == (image.shape[1], image.shape[0]):
        out[:new_h, :new_w] = image
    else:
        cv2.resize(image, (new_w, new_h), dst=out[:new_h, :new_w], interpolation=cv2.INTER_LINEAR)
    out[new_h:] = 0
    out[:new_h, new_w:] = 0
    return scale


def encoded_rows(array):
    """A request's encoded images, one ``bytes`` per batch row, from its ``image`` input's array."""
    return [bytes(row) for row in array.reshape(-1)]


class RowError(Exception):
    """Row ``row`` of a request of ``count`` rows cannot be read, because of ``reason``."""

    def __init__(self, row, count, reason):
        super().__init__(f"image row {row}" + (f" of {count}" if count > 1 else "") + f": {reason}")


def checked_headers(rows, max_pixels):
    """:func:`inspect` of each of a request's ``rows``; :class:`RowError` for the first bad one."""
    headers = []
    for row, data in enumerate(rows):
        try:
            headers.append(inspect(data, max_pixels))
        except RequestError as exc:
            raise RowError(row, len(rows), exc) from None
    return headers


def frame_size(config):
    """``(height, width)`` of the ``images`` output in a preprocess model's ``config``."""
    height, width, _ = (int(d) for d in next(o for o in config["output"] if o["name"] == "images")["dims"])
    return height, width
