"""Triton Python model for ``make bench``'s transport rows: the ensemble's inputs and outputs,
no detection, so a request's time is what moving its frame and outputs costs.

Each image's ``num_detections`` is a checksum of a sparse sample of its pixels (every 61st row,
every 67th column), so the benchmark can tell that the frame really arrived. The other outputs
are zeros of the ensemble's shapes (one row where the ensemble's is variable: one face), so
they travel back the way detections do. Served only from
the benchmark's scratch repository, never from ``model_repository/``.
"""

import json

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the benchmark itself, for sample_checksum
    pb_utils = None

ROW_STEP, COLUMN_STEP = 61, 67
DTYPES = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32}


def sample_checksum(images):
    """Per image, the sum of the sampled pixels, as int32 [N, 1] (the benchmark's own check)."""
    return images[:, ::ROW_STEP, ::COLUMN_STEP].reshape(len(images), -1).sum(axis=1, dtype=np.int64) \
        .astype(np.int32).reshape(-1, 1)


class TritonPythonModel:
    """Answers every request with its frames' checksums and zero detections."""

    def initialize(self, args):
        outputs = json.loads(args["model_config"])["output"]
        self.shapes = {o["name"]: ([max(1, int(d)) for d in o["dims"]], DTYPES[o["data_type"]]) for o in outputs}

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
            batch = len(images)
            tensors = [pb_utils.Tensor("num_detections", sample_checksum(images))]
            tensors += [pb_utils.Tensor(name, np.zeros([batch, *dims], dtype=dtype))
                        for name, (dims, dtype) in self.shapes.items() if name != "num_detections"]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
