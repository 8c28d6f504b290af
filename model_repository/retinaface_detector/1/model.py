"""Triton Python model: the rewritten RetinaFace graph (``model.onnx`` beside this file) on
onnxruntime, CPU. Used when the detector is built with BACKEND=onnxruntime; with
BACKEND=tensorrt, ``config.pbtxt`` selects the ``tensorrt_plan`` platform and this file is unused.

Requests handed over in one ``execute`` call (Triton's dynamic batcher groups them) run as one
onnxruntime batch. Overload: when more than ``overload_keep`` requests arrive at once, requests
have been queueing behind a busy detector; the newest ``overload_keep`` run (they waited least)
and the older ones are answered with UNAVAILABLE "overloaded" before the batch runs, so the
latency of what is served stays bounded under any burst and the clients that waited longest
learn it first. Responses go through each request's response sender (``execute`` returns None).
Threads: config parameter ``intra_op_threads`` (0 = this machine's cores divided among the
model's instances); ``allow_spinning`` 0 (the build's default) makes onnxruntime's threads sleep
rather than spin while they wait, leaving the cores to the server's other steps.

Candidates go on trimmed (:func:`trimmed`): each top-K chunk keeps its rows down to the last one
any image of the request scores above the request's ``score_threshold`` (request parameter, else
config parameter), which the postprocess would discard anyway. An ordinary frame then hands on a
few hundred rows instead of TOPK; a crowd keeps what it needs.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.dont_write_bytecode = True  # no __pycache__ beside the models: Triton would take it for one
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))  # shared_*.py
from shared_backend import config_parameters, failed, unavailable  # noqa: E402

OVERLOADED = "overloaded: the detector is busy and its queue is full; retry later"


def respond(request, response):
    """Send ``request``'s one and only response now (execute then returns None)."""
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def score_threshold(request, default):
    """The request's ``score_threshold`` parameter, or ``default`` when it is absent or not a
    number in [0, 1] (the postprocess answers a bad one with its error, on untrimmed candidates)."""
    try:
        value = float(json.loads(request.parameters() or "{}").get("score_threshold", default))
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


def trimmed(candidates, chunks, threshold):
    """``candidates [n, TOPK, 15]`` (``chunks`` top-K chunks one after another, each sorted by
    score) with each chunk cut after its last row that some image scores above ``threshold``,
    so every chunk keeps the same number of rows (at least one). ``threshold`` None: untouched."""
    if threshold is None:
        return candidates
    n, rows, width = candidates.shape
    per_chunk = rows // chunks
    passing = (candidates[..., 4] > threshold).reshape(n, chunks, per_chunk).any(axis=(0, 1))
    keep = int(np.flatnonzero(passing)[-1]) + 1 if passing.any() else 1
    if keep == per_chunk:
        return candidates
    return np.ascontiguousarray(candidates.reshape(n, chunks, per_chunk, width)[:, :, :keep]).reshape(n, -1, width)


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` -> ``candidates [N, R, 15]`` (R <= TOPK: :func:`trimmed`)."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = config_parameters(config)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        threads = int(params.get("intra_op_threads", "0")) or max(1, (os.cpu_count() or 1) // instances)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = params.get("allow_spinning", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.keep = int(params.get("overload_keep", "0")) or None
        self.chunks = int(params.get("topk_chunks", "1"))
        self.default_threshold = float(params.get("score_threshold", "0"))

    def execute(self, requests):
        shed = requests[:-self.keep] if self.keep else []  # arrival order: oldest first
        requests = requests[-self.keep:] if self.keep else requests
        for request in shed:  # answered now, not after the batch that runs
            respond(request, pb_utils.InferenceResponse(error=unavailable(OVERLOADED)))
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches)
        try:
            candidates = self.session.run([self.output_name], {self.input_name: images})[0]
        except Exception as exc:  # e.g. out of memory: each kept request still gets its one response
            for request in requests:
                respond(request, pb_utils.InferenceResponse(error=failed(f"detector failed: {exc}")))
            return None
        start = 0
        for request, batch in zip(requests, batches):
            part = trimmed(candidates[start:start + len(batch)], self.chunks,
                           score_threshold(request, self.default_threshold))
            start += len(batch)
            respond(request, pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("candidates", part)]))
        return None
