"""Triton Python model: encoded images -> letterboxed uint8 frames, decoded on the GPU.

The first step of ``retinaface_encoded`` with ``PREPROCESS=torch``: :class:`gpu_decoding.GpuDecoder`
decodes and letterboxes each request's images into a fresh GPU tensor, its ``images`` output,
which Triton hands to the detector on the GPU (no host copy). With the default
``PREPROCESS=detector`` the torch detector runs the same decoder in its own process instead. A
request with a row that cannot be read gets INVALID_ARGUMENT naming it; the others are served.
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils
from decoding import frame_size
from gpu_decoding import GpuDecoder

sys.dont_write_bytecode = True  # no __pycache__ beside the models: Triton would take it for one
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))  # shared_*.py
from shared_backend import config_parameters, failed, invalid_argument  # noqa: E402


class TritonPythonModel:
    """``image`` BYTES [N, 1] -> ``images`` [N, H, W, 3] (GPU), ``letterbox`` [N, 3], ``image_size`` [N, 2]."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(device)
        height, width = frame_size(config)
        self.decoder = GpuDecoder(device, height, width, int(config_parameters(config)["max_pixels"]))

    def _response(self, images):
        """One request's outputs: a fresh GPU tensor of frames (Triton reads it after this returns)."""
        decoder = self.decoder
        frames = torch.empty((len(images), decoder.height, decoder.width, 3), dtype=torch.uint8, device=decoder.device)
        placement, sizes = decoder.letterbox(images, frames)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack("images", frames), pb_utils.Tensor("letterbox", placement),
            pb_utils.Tensor("image_size", sizes)])

    def execute(self, requests):
        responses = [None] * len(requests)
        try:
            with torch.inference_mode():
                errors, accepted = self.decoder.decode_requests(
                    [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests])
                for index, error in errors.items():
                    responses[index] = pb_utils.InferenceResponse(error=invalid_argument(str(error)))
                for index, images in accepted:
                    responses[index] = self._response(images)
            torch.cuda.current_stream(self.decoder.device).synchronize()  # the detector reads them from another process
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            responses = [response or pb_utils.InferenceResponse(error=failed(f"preprocess failed: {exc}"))
                         for response in responses]
        return responses
