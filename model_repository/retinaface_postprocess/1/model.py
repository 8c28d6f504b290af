"""Triton Python model: RetinaFace detections from the detector's top-K candidates.

The second step of the ensembles beside the TensorRT and onnxruntime detectors: threshold, NMS
and letterbox undo per request, by ``shared_postprocess.py`` at the repository's top (numpy only,
so the repository runs in a stock Triton container; the torch detector runs the same code). A
request with a bad option or letterbox row gets INVALID_ARGUMENT naming it; the others are served.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

sys.dont_write_bytecode = True  # no __pycache__ beside the models: Triton would take it for one
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))  # shared_*.py
from shared_backend import config_parameters, invalid_argument  # noqa: E402
from shared_postprocess import Postprocess, RequestError, keep_heap_warm  # noqa: E402


class TritonPythonModel:
    """Threshold + NMS + letterbox undo, one response per request."""

    def initialize(self, args):
        self.post = Postprocess(config_parameters(json.loads(args["model_config"])))
        keep_heap_warm()

    def _array(self, request, name):
        """The request's input ``name`` as a numpy array."""
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    def _inputs(self, request):
        candidates = self._array(request, "candidates")
        self.post.rows(candidates.shape[1])
        return candidates, self.post.placement(self._array(request, "letterbox"), candidates.shape[0])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                candidates, placement = self._inputs(request)
                outputs = self.post.detect(candidates, placement, self.post.options(request.parameters()))
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(str(exc))))
        return responses
