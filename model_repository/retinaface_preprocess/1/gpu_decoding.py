"""Encoded images decoded and letterboxed on the GPU: :class:`GpuDecoder`.

The headers are read and checked on the CPU exactly as the CPU preprocess does (``decoding.py``),
so bad bytes get the same errors. Then every JPEG of the requests Triton batched together that
nvJPEG takes (Huffman-coded baseline, extended or progressive, gray or YCbCr, upright) is decoded
in one ``torchvision.io.decode_jpeg(..., device="cuda")`` call: the GPU's hardware JPEG decoder
where it has one (A100, H100, H200) for baseline frames, nvJPEG's CUDA decoder otherwise. PNGs,
CMYK JPEGs, JPEGs with an EXIF rotation and anything nvJPEG refuses are decoded with OpenCV on the
CPU and copied up. Each image is then resized on the GPU (bilinear, the SDK's letterbox
geometry) where its size differs from the frame's, and its RGB planes are written into its row
of the frames in BGR order by one kernel.

Used by the GPU preprocess step (``model_torch.py`` beside this file) and, in its own process,
by the torch detector where it decodes (``PREPROCESS=detector``). Imports torch, torchvision,
OpenCV and numpy.
"""

import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from decoding import RequestError, RowError, checked_headers, decode, encoded_rows, fitted_size
from torchvision.io import ImageReadMode, decode_jpeg

GPU_JPEG_FRAMES = {"baseline", "extended", "progressive"}  # Huffman-coded frames nvJPEG decodes
GPU_JPEG_COMPONENTS = {1, 3}  # gray, YCbCr (CMYK/YCCK: OpenCV)


def on_gpu_decoder(header):
    """Whether nvJPEG decodes this image as the CPU path would (else OpenCV does)."""
    return (header.kind == "JPEG" and header.frame in GPU_JPEG_FRAMES
            and header.components in GPU_JPEG_COMPONENTS and header.orientation == 1)


def letterbox_into(image, out):
    """``image`` (uint8 [3, h, w] RGB planes on the GPU, as nvJPEG writes them) resized into the
    top-left of ``out`` ([H, W, 3] uint8 BGR on the GPU, written in place, zeros around it), as
    ``decoding.letterbox_into`` places it; returns the scale. The planes are interleaved in BGR order
    by one kernel, straight into ``out`` when the image fills it."""
    height, width = image.shape[1:]
    scale, new_w, new_h = fitted_size(width, height, out.shape[1], out.shape[0])
    if (new_w, new_h) != (width, height):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    red, green, blue = image
    if (new_h, new_w) == tuple(out.shape[:2]):
        torch.stack((blue, green, red), dim=2, out=out)
        return scale
    out[:new_h, :new_w].copy_(torch.stack((blue, green, red), dim=2))
    if new_h < out.shape[0]:
        out[new_h:].zero_()
    if new_w < out.shape[1]:
        out[:new_h, new_w:].zero_()
    return scale


class GpuDecoder:
    """Encoded images of the requests Triton hands over together, decoded on ``device`` for
    frames of ``height`` x ``width``; images over ``max_pixels`` are refused unread."""

    def __init__(self, device, height, width, max_pixels):
        self.device, self.height, self.width, self.max_pixels = device, height, width, max_pixels
        cv2.setNumThreads(1)
        # nvJPEG's handle and the resize kernels are set up now, not by the first request
        # (and PyTorch's warning that ``bytes`` are read-only, which it gives once per process, is given here)
        sample = bytes(cv2.imencode(".jpg", np.full((48, 64, 3), 128, dtype=np.uint8))[1])
        frames = torch.empty((1, height, width, 3), dtype=torch.uint8, device=device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            self.letterbox(self.decode([sample], checked_headers([sample], max_pixels)), frames)
        torch.cuda.synchronize(device)

    def _gpu_batch(self, rows):
        """nvJPEG on ``rows`` (encoded bytes): uint8 [3, h, w] RGB tensors on the GPU, ``None`` for
        a row nvJPEG fails on. One batched call; row by row only when that call fails. The bytes
        are read where they are (no copy); nvJPEG only reads them."""
        data = [torch.frombuffer(row, dtype=torch.uint8) for row in rows]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = []
            for one in data:
                try:
                    images.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError:
                    images.append(None)
            return images

    def decode(self, rows, headers):
        """Each row decoded to uint8 [3, h, w] RGB planes on the GPU, or the :class:`RequestError`
        saying why it cannot be: nvJPEG for the JPEGs it takes, all in one batch; OpenCV for the rest."""
        gpu = [i for i, header in enumerate(headers) if on_gpu_decoder(header)]
        decoded = dict(zip(gpu, self._gpu_batch([rows[i] for i in gpu]))) if gpu else {}
        for i, (row, header) in enumerate(zip(rows, headers)):
            if decoded.get(i) is None:  # not for nvJPEG, or nvJPEG refused it
                try:
                    bgr = torch.from_numpy(decode(row, header)).to(self.device)
                    decoded[i] = bgr.permute(2, 0, 1).flip(0)
                except RequestError as exc:
                    decoded[i] = exc
        return [decoded[i] for i in range(len(rows))]

    def decode_requests(self, requests):
        """``(errors, accepted)`` for ``requests`` (each one's ``image`` input, a numpy array of
        encoded images, one per batch row):
        ``errors`` maps the index of each request with a row that cannot be read to its
        :class:`decoding.RowError` (headers are checked before anything is decoded);
        ``accepted`` lists ``(index, images)`` for the others, every JPEG of them decoded in one
        nvJPEG batch."""
        errors, counts, rows, headers = {}, [], [], []
        for index, array in enumerate(requests):
            mine = encoded_rows(array)
            try:
                headers += checked_headers(mine, self.max_pixels)
            except RowError as exc:
                errors[index] = exc
                continue
            counts.append((index, len(mine)))
            rows += mine
        images, accepted, start = self.decode(rows, headers), [], 0
        for index, count in counts:
            mine, start = images[start:start + count], start + count
            failed = next((row for row, image in enumerate(mine) if isinstance(image, Exception)), None)
            if failed is None:
                accepted.append((index, mine))
            else:
                errors[index] = RowError(failed, count, mine[failed])
        return errors, accepted

    @staticmethod
    def letterbox(images, frames):
        """Each of ``images`` letterboxed into its row of ``frames`` (uint8 [n, H, W, 3] on the
        GPU, written on the current stream): ``letterbox`` [n, 3] and ``image_size`` [n, 2] as
        numpy arrays."""
        placement = np.zeros((len(images), 3), dtype=np.float32)
        sizes = np.empty((len(images), 2), dtype=np.int32)
        for row, image in enumerate(images):
            placement[row, 0] = letterbox_into(image, frames[row])
            sizes[row] = image.shape[2], image.shape[1]
        return placement, sizes
