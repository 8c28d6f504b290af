"""Triton Python model: encoded images (JPEG or PNG bytes) -> letterboxed uint8 frames, on the CPU.

The first step of the ``retinaface_encoded`` ensemble beside the TensorRT and onnxruntime
detectors (``PREPROCESS=numpy``). Each batch row of the input ``image`` (BYTES) is one encoded
image, checked, decoded by OpenCV and letterboxed as the SDK letterboxes (``decoding.py``).
Outputs per row: ``images`` [H, W, 3] uint8 BGR, ``letterbox`` (scale, pad_x, pad_y) float32 and
``image_size`` (width, height) int32 of the decoded image, after its EXIF orientation.

Each request is answered on its own: a request with an image that cannot be read gets
INVALID_ARGUMENT naming the row and the reason, and the other requests Triton batched with it are
served. numpy and OpenCV only, so the repository runs in a stock Triton container with
``opencv-python-headless``.
"""

import json
import os
import sys

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils
from decoding import RequestError, RowError, checked_headers, decode, encoded_rows, frame_size, letterbox_into

sys.dont_write_bytecode = True  # no __pycache__ beside the models: Triton would take it for one
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))  # shared_*.py
from shared_backend import config_parameters, invalid_argument  # noqa: E402


class TritonPythonModel:
    """``image`` BYTES [N, 1] -> ``images`` [N, H, W, 3], ``letterbox`` [N, 3], ``image_size`` [N, 2]."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.height, self.width = frame_size(config)
        self.max_pixels = int(config_parameters(config)["max_pixels"])
        cv2.setNumThreads(1)  # instances are processes: parallelism comes from their count

    def _outputs(self, rows):
        headers = checked_headers(rows, self.max_pixels)
        images = np.empty((len(rows), self.height, self.width, 3), dtype=np.uint8)
        placement = np.zeros((len(rows), 3), dtype=np.float32)
        sizes = np.empty((len(rows), 2), dtype=np.int32)
        for row, (data, header) in enumerate(zip(rows, headers)):
            try:
                image = decode(data, header)
            except RequestError as exc:
                raise RowError(row, len(rows), exc) from None
            placement[row, 0] = letterbox_into(image, images[row])
            sizes[row] = image.shape[1], image.shape[0]
        return [pb_utils.Tensor("images", images), pb_utils.Tensor("letterbox", placement),
                pb_utils.Tensor("image_size", sizes)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                rows = encoded_rows(pb_utils.get_input_tensor_by_name(request, "image").as_numpy())
                responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(rows)))
            except RowError as exc:
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(str(exc))))
        return responses
