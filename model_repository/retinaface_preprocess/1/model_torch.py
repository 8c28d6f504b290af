"""Triton Python model: encoded images -> letterboxed uint8 frames, decoded and letterboxed on the GPU.

The GPU build's first step of ``retinaface_encoded`` (config ``default_model_filename``). The
headers are read and checked on the CPU exactly as ``model.py`` does (its helpers are loaded from
beside this file), so bad bytes get the same INVALID_ARGUMENT. Then every JPEG of the requests
Triton batched together that nvJPEG takes (Huffman-coded baseline, extended or progressive, gray or
YCbCr, upright) is decoded in one ``torchvision.io.decode_jpeg(..., device="cuda")`` call: the GPU's
hardware JPEG decoder where it has one (A100, H100, H200) for baseline frames, nvJPEG's CUDA
decoder otherwise. PNGs, CMYK JPEGs, JPEGs with an EXIF rotation and anything nvJPEG refuses are
decoded with OpenCV on the CPU, as ``model.py`` does, and copied up. Each image is then resized on
the GPU (bilinear, the SDK's letterbox geometry) into its request's ``images`` output, which Triton
hands to the detector on the GPU (no host copy).

Imports torch, torchvision, OpenCV and numpy: no project code.
"""

import importlib.util
import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import triton_python_backend_utils as pb_utils
from torchvision.io import ImageReadMode, decode_jpeg

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_JPEG_FRAMES = {"baseline", "extended", "progressive"}  # Huffman-coded frames nvJPEG decodes
GPU_JPEG_COMPONENTS = {1, 3}  # gray, YCbCr (CMYK/YCCK: OpenCV)


# model.py beside this file (its checks, OpenCV decoding and letterbox geometry), loaded by path
_spec = importlib.util.spec_from_file_location("rtface_preprocess_cpu", os.path.join(HERE, "model.py"))
cpu_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_model)


def on_gpu_decoder(header):
    """Whether nvJPEG decodes this image as the CPU path would (else OpenCV does)."""
    return (header.kind == "JPEG" and header.frame in GPU_JPEG_FRAMES
            and header.components in GPU_JPEG_COMPONENTS and header.orientation == 1)


def letterbox_into(image, out):
    """``image`` (uint8 [3, h, w] BGR on the GPU) resized into the top-left of ``out`` ([H, W, 3]
    uint8 on the GPU, written in place, zeros around it), as ``model.letterbox_into`` places it;
    returns the scale."""
    height, width = image.shape[1:]
    scale, new_w, new_h = cpu_model.fitted_size(width, height, out.shape[1], out.shape[0])
    if (new_w, new_h) != (width, height):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    out[:new_h, :new_w].copy_(image.permute(1, 2, 0))
    if new_h < out.shape[0]:
        out[new_h:].zero_()
    if new_w < out.shape[1]:
        out[:new_h, new_w:].zero_()
    return scale


class TritonPythonModel:
    """``image`` BYTES [N, 1] -> ``images`` [N, H, W, 3] (GPU), ``letterbox`` [N, 3], ``image_size`` [N, 2]."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        self.height, self.width = cpu_model.frame_size(config)
        self.max_pixels = cpu_model.max_pixels(config)
        cv2.setNumThreads(1)
        # nvJPEG's handle and the resize kernels are set up now, not by the first request
        sample = bytes(cv2.imencode(".jpg", np.full((48, 64, 3), 128, dtype=np.uint8))[1])
        with torch.inference_mode():
            self._frames(self._decode([sample], cpu_model.checked_headers([sample], self.max_pixels)))
        torch.cuda.synchronize(self.device)

    def _gpu_batch(self, rows):
        """nvJPEG on ``rows`` (encoded bytes): uint8 [3, h, w] BGR tensors on the GPU, ``None`` for
        a row nvJPEG fails on. One batched call; row by row only when that call fails."""
        data = [torch.frombuffer(bytearray(row), dtype=torch.uint8) for row in rows]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = []
            for one in data:
                try:
                    images.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError:
                    images.append(None)
        return [None if image is None else image.flip(0) for image in images]

    def _decode(self, rows, headers):
        """Each row decoded to uint8 [3, h, w] BGR on the GPU, or the :class:`RequestError` saying
        why it cannot be: nvJPEG for the JPEGs it takes, all in one batch; OpenCV for the rest."""
        gpu = [i for i, header in enumerate(headers) if on_gpu_decoder(header)]
        decoded = dict(zip(gpu, self._gpu_batch([rows[i] for i in gpu]))) if gpu else {}
        for i, (row, header) in enumerate(zip(rows, headers)):
            if decoded.get(i) is None:  # not for nvJPEG, or nvJPEG refused it
                try:
                    decoded[i] = torch.from_numpy(cpu_model.decode(row, header)).to(self.device).permute(2, 0, 1)
                except cpu_model.RequestError as exc:
                    decoded[i] = exc
        return [decoded[i] for i in range(len(rows))]

    def _frames(self, images):
        """One request's ``images``, ``letterbox`` and ``image_size`` from its decoded ``images``:
        a fresh GPU tensor (Triton reads it after this returns) and two numpy arrays."""
        frames = torch.empty((len(images), self.height, self.width, 3), dtype=torch.uint8, device=self.device)
        placement = np.zeros((len(images), 3), dtype=np.float32)
        sizes = np.empty((len(images), 2), dtype=np.int32)
        for row, image in enumerate(images):
            placement[row, 0] = letterbox_into(image, frames[row])
            sizes[row] = image.shape[2], image.shape[1]
        return frames, placement, sizes

    def _response(self, images):
        """One request's response: its outputs, or INVALID_ARGUMENT for its first row that failed."""
        failed = next((row for row, image in enumerate(images) if isinstance(image, Exception)), None)
        if failed is not None:
            return cpu_model.RowError(failed, len(images), images[failed]).response()
        frames, placement, sizes = self._frames(images)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack("images", frames), pb_utils.Tensor("letterbox", placement),
            pb_utils.Tensor("image_size", sizes)])

    def execute(self, requests):
        responses, accepted, rows, headers = [None] * len(requests), [], [], []
        for index, request in enumerate(requests):  # headers first: a bad one fails its request at once
            mine = cpu_model.encoded_rows(request)
            try:
                headers += cpu_model.checked_headers(mine, self.max_pixels)
            except cpu_model.RowError as exc:
                responses[index] = exc.response()
                continue
            accepted.append((index, len(mine)))
            rows += mine
        try:
            with torch.inference_mode():
                images, start = self._decode(rows, headers), 0  # every request's rows in one nvJPEG batch
                for index, count in accepted:
                    responses[index] = self._response(images[start:start + count])
                    start += count
            torch.cuda.current_stream(self.device).synchronize()  # the detector reads them from another process
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            error = pb_utils.TritonError(f"preprocess failed: {exc}")
            responses = [response or pb_utils.InferenceResponse(error=error) for response in responses]
        return responses
