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
model's instances).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def overloaded():
    """A fresh error per response (the backend takes ownership of each) with status UNAVAILABLE
    where this Triton version supports error codes."""
    message = "overloaded: the detector is busy and its queue is full; retry later"
    code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def respond(request, response):
    """Send ``request``'s one and only response now (execute then returns None)."""
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def parameter(config, name, default):
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` -> ``candidates [N, TOPK, 15]``."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"],
                            parameter(config, "onnx_file", "model.onnx"))
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        threads = int(parameter(config, "intra_op_threads", "0")) or max(1, (os.cpu_count() or 1) // instances)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = parameter(config, "allow_spinning", "1")
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.keep = int(parameter(config, "overload_keep", "0")) or None

    def execute(self, requests):
        shed = requests[:-self.keep] if self.keep else []  # arrival order: oldest first
        requests = requests[-self.keep:] if self.keep else requests
        for request in shed:  # answered now, not after the batch that runs
            respond(request, pb_utils.InferenceResponse(error=overloaded()))
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches)
        try:
            candidates = self.session.run([self.output_name], {self.input_name: images})[0]
        except Exception as exc:  # e.g. out of memory: each kept request still gets its one response
            for request in requests:
                respond(request, pb_utils.InferenceResponse(error=pb_utils.TritonError(f"detector failed: {exc}")))
            return None
        start = 0
        for request, batch in zip(requests, batches):
            part = candidates[start:start + len(batch)]
            start += len(batch)
            respond(request, pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("candidates", part)]))
        return None
