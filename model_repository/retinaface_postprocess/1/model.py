"""Triton Python model: RetinaFace detections from the detector's top-K candidates.

The second step of the ensembles beside the TensorRT and onnxruntime detectors: threshold, NMS
and letterbox undo per request, by ``postprocess.py`` beside this file (numpy only, so the model
repository runs in a stock Triton container; the Python backend puts this folder on
``sys.path``). A request with a bad option or letterbox row gets INVALID_ARGUMENT naming it; the
others are served.
"""

import json

import triton_python_backend_utils as pb_utils
from postprocess import Postprocess, RequestError, config_parameters, invalid_argument, keep_heap_warm


def output_tensors(outputs):
    """A response's output tensors from :meth:`Postprocess.detect`'s arrays."""
    return [pb_utils.Tensor(name, array) for name, array in outputs.items()]


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
                responses.append(pb_utils.InferenceResponse(output_tensors=output_tensors(outputs)))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=invalid_argument(str(exc))))
        return responses
