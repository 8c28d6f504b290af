"""Reading the images callers pass: arrays (BGR or gray uint8), paths, or encoded bytes.

:func:`load_image` gives the pixels the letterboxing transports send; :func:`encode_image` gives
the bytes the ``encoded`` transport sends: JPEG and PNG data as the caller has it, anything else
encoded once as JPEG at :data:`JPEG_QUALITY`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from rtface_client.errors import InvalidImageError

__all__ = ["ImageLike", "load_image", "encode_image", "MAX_PIXELS", "JPEG_QUALITY"]

ImageLike = Union[np.ndarray, str, os.PathLike, bytes, bytearray, memoryview]
MAX_PIXELS = 64_000_000  # 64 megapixels: a 8000x8000 frame; beyond, downscale before sending
# Arrays sent as encoded images: JPEG at this quality (OpenCV's default), once per image. The
# selfie's AP and the faces found are in docs/accuracy.md ("Encoded images").
JPEG_QUALITY = 95
JPEG_START, PNG_SIGNATURE = b"\xff\xd8", b"\x89PNG\r\n\x1a\n"


def _check_array(image: np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    if image.dtype != np.uint8:
        raise InvalidImageError(f"image dtype is {image.dtype}; pass uint8 pixels "
                                "(e.g. np.clip(img, 0, 255).astype(np.uint8))")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise InvalidImageError(f"image shape is {image.shape}; pass HxWx3 BGR or HxW gray")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InvalidImageError(f"image shape is {image.shape}: it has no pixels")
    if height * width > max_pixels:
        raise InvalidImageError(f"image is {width}x{height} = {height * width / 1e6:.0f} MP, over the "
                                f"{max_pixels / 1e6:g} MP limit; downscale it first")
    return image


JPEG_SIZE_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker in JPEG_SIZE_MARKERS:
            return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
        at += 2 + length
    return None


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The pixel size a PNG or JPEG header declares, read before decoding anything."""
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == JPEG_START:
        return _jpeg_size(data)
    return None


def _check_declared(data: bytes, origin: str, max_pixels: int) -> None:
    """Refuse empty data, and data whose header declares more than ``max_pixels`` pixels."""
    if not data:
        raise InvalidImageError(f"{origin} is empty")
    declared = _declared_size(data)
    if declared is not None and declared[0] * declared[1] > max_pixels:
        raise InvalidImageError(f"{origin} declares {declared[0]}x{declared[1]} = "
                                f"{declared[0] * declared[1] / 1e6:.0f} MP, over the "
                                f"{max_pixels / 1e6:g} MP limit; downscale it first")


def _decode(data: bytes, origin: str) -> np.ndarray:
    _check_declared(data, origin, MAX_PIXELS)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise InvalidImageError(f"{origin} could not be decoded ({exc.msg.strip()})") from None
    if image is None:
        raise InvalidImageError(f"{origin} is not a readable image (truncated, or not JPEG/PNG/...)")
    return image


def _read(image: ImageLike) -> np.ndarray | tuple[bytes, str]:
    """``image`` itself when it is an array, else its encoded bytes and where they came from."""
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "image bytes"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.read_bytes(), f"image file {path}"
        except OSError as exc:
            raise InvalidImageError(f"cannot read image file {path}: {exc.strerror}") from None
    raise InvalidImageError(f"cannot read an image from {type(image).__name__}; pass a numpy array "
                            "(HxWx3 BGR or HxW gray, uint8), a path, or encoded bytes")


def load_image(image: ImageLike) -> np.ndarray:
    """Return ``image`` as a uint8 ``HxWx3`` BGR or ``HxW`` gray array, decoding paths and bytes.

    Raises :class:`InvalidImageError` naming the problem for anything else.
    """
    source = _read(image)
    if isinstance(source, np.ndarray):
        return _check_array(source)
    return _check_array(_decode(*source))


def encode_image(image: ImageLike, max_pixels: int = MAX_PIXELS, quality: int = JPEG_QUALITY) -> bytes:
    """The bytes the ``encoded`` transport sends for ``image``: JPEG or PNG data (bytes, or a
    file's contents) as they are, after checking the size their header declares against
    ``max_pixels``; arrays, and images in other formats (decoded here first), encoded once as
    JPEG at ``quality`` (gray arrays as gray JPEG). Raises :class:`InvalidImageError` naming the
    problem."""
    source = _read(image)
    if not isinstance(source, np.ndarray):
        data, origin = source
        if data[:2] == JPEG_START or data[:8] == PNG_SIGNATURE:
            _check_declared(data, origin, max_pixels)
            return data
        source = _decode(data, origin)
    ok, encoded = cv2.imencode(".jpg", _check_array(source, max_pixels), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InvalidImageError("OpenCV could not encode the image as JPEG")
    return encoded.tobytes()
