"""Triton Python model: the rewritten RetinaFace graph on a GPU with PyTorch (BACKEND=torch).

``model.pt`` beside this file is the graph program written by ``make engine BACKEND=torch``;
``graph_program.py`` runs it (float16 network, float32 decode and top-K). At load, each instance
captures one CUDA graph per batch bucket (config parameter ``batch_buckets``; optionally after
``torch.compile``, parameter ``torch_compile``), so a request costs one graph replay.

Input stays on the GPU: with ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``, images sent through CUDA
shared memory arrive as GPU tensors and are read through DLPack; images sent as gRPC bytes or
system shared memory arrive on the CPU and are copied up once. The requests Triton's dynamic
batcher hands over together run as one replay of the smallest bucket that holds them (rows past
them are left over from earlier batches and ignored). Each request's candidates are trimmed like
the onnxruntime detector's (``model.py``, whose helpers this file loads) and copied out of the
graph's buffer: to the host when the postprocess runs on the CPU (config parameter
``candidates_on_gpu`` 0), else as GPU tensors through DLPack. Imports torch and numpy only: no
project code.
"""

import importlib.util
import json
import math
import os
import sys

# torch.compile's worker pool starts sys.executable, which in Triton's stub is the stub binary,
# not Python: compile in this process instead.
if not os.path.basename(sys.executable).startswith("python"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_sibling(name, filename):
    """A module of this directory, loaded by path (whatever the stub puts on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_model = load_sibling("rtface_detector_onnxruntime", "model.py")
runner = load_sibling("rtface_graph_program", "graph_program.py")
parameter = cpu_model.parameter


def kept_rows(candidates, chunks, thresholds):
    """Per image of ``candidates [n, TOPK, 15]`` (on the GPU): how many leading rows of its
    top-K chunks :func:`model.trimmed` would keep at the image's ``thresholds [n]``, as a list."""
    n, rows, _ = candidates.shape
    per_chunk = rows // chunks
    passing = (candidates[..., 4] > thresholds[:, None]).reshape(n, chunks, per_chunk).any(dim=1)
    position = torch.arange(1, per_chunk + 1, device=candidates.device)
    return torch.where(passing, position, 0).amax(dim=1).tolist()


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` (CPU or GPU) -> trimmed ``candidates [N, R, 15]``."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        torch.backends.cudnn.benchmark = True
        program = torch.load(os.path.join(args["model_repository"], args["model_version"],
                                          parameter(config, "program_file", "model.pt")),
                             map_location="cpu", weights_only=True)
        compiled = parameter(config, "torch_compile", "0") == "1"
        module = runner.GraphProgram(program, device=self.device, depthwise_taps=compiled)
        if compiled:
            module = torch.compile(module, dynamic=False)
        height, width, _ = (int(d) for d in next(i for i in config["input"] if i["name"] == "images")["dims"])
        buckets = [int(b) for b in parameter(config, "batch_buckets", "1").split(",")]
        self.replay = runner.GraphReplay(module, height, width, buckets, self.device)
        self.chunks = int(parameter(config, "topk_chunks", "1"))
        self.default_threshold = float(parameter(config, "score_threshold", "0"))
        self.on_gpu = parameter(config, "candidates_on_gpu", "0") == "1"

    def _images(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "images")
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy())
        return torch.from_dlpack(tensor.to_dlpack())

    def _trimmed(self, requests, parts, candidates):
        """Each request's rows of ``candidates`` (the graph's buffer), trimmed at its threshold,
        copied out in one piece (one device-to-host copy for the whole batch unless the
        postprocess runs on the GPU) and split per request."""
        thresholds = [cpu_model.score_threshold(r, self.default_threshold) for r in requests]
        per_image = torch.tensor([2.0 if t is None else t for t, part in zip(thresholds, parts) for _ in range(len(part))],
                                 device=self.device)  # 2.0: nothing passes; None keeps every row below
        kept = kept_rows(candidates, self.chunks, per_image)
        per_chunk, width = candidates.shape[1] // self.chunks, candidates.shape[2]
        pieces, shapes, start = [], [], 0
        for threshold, part in zip(thresholds, parts):
            keep = per_chunk if threshold is None else max(1, max(kept[start:start + len(part)]))
            mine = candidates[start:start + len(part)].reshape(len(part), self.chunks, per_chunk, width)
            pieces.append(mine[:, :, :keep].flatten())
            shapes.append((len(part), self.chunks * keep, width))
            start += len(part)
        joined = torch.cat(pieces)  # a copy: the next replay overwrites the graph's buffer
        if not self.on_gpu:
            joined = joined.cpu()
        return [rows.view(shape) for rows, shape in zip(joined.split([math.prod(s) for s in shapes]), shapes)]

    def execute(self, requests):
        try:
            with torch.inference_mode():
                parts = [self._images(r) for r in requests]
                candidates = self._trimmed(requests, parts, self.replay.run(parts))
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            error = f"detector failed: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("candidates", rows.numpy()) if rows.device.type == "cpu"
                    else pb_utils.Tensor.from_dlpack("candidates", rows)])
                for rows in candidates]
