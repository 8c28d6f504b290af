"""Triton Python model: the rewritten RetinaFace graph on a GPU with PyTorch (BACKEND=torch).

``model.pt`` beside this file is the graph program written by ``make engine BACKEND=torch``;
``graph_program.py`` runs it (float16 network, float32 decode and top-K). At load, each instance
captures one CUDA graph per batch bucket (config parameter ``batch_buckets``; optionally after
``torch.compile``, parameter ``torch_compile``), so a request costs one graph replay.

Input stays on the GPU: with ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``, images sent through CUDA
shared memory arrive as GPU tensors and are read in place through DLPack; images sent as gRPC
bytes or system shared memory arrive on the CPU and are copied up once. The requests Triton's
dynamic batcher hands over together run as one replay of the smallest bucket that holds them
(rows past them are left over from earlier batches and ignored); ``candidates`` go on as GPU
tensors (DLPack), which Triton copies to the host for the numpy postprocess. Imports torch and
numpy only: no project code.
"""

import importlib.util
import json
import os
import sys

# torch.compile's worker pool starts sys.executable, which in Triton's stub is the stub binary,
# not Python: compile in this process instead.
if not os.path.basename(sys.executable).startswith("python"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from torch.utils import dlpack  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_runner():
    """``graph_program.py`` from this directory, loaded by path (whatever the stub puts on sys.path)."""
    spec = importlib.util.spec_from_file_location("rtface_graph_program", os.path.join(HERE, "graph_program.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameter(config, name, default):
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


class TritonPythonModel:
    """uint8 ``images [N, H, W, 3]`` (CPU or GPU) -> ``candidates [N, TOPK, 15]`` on the GPU."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)
        torch.backends.cudnn.benchmark = True
        program = torch.load(os.path.join(args["model_repository"], args["model_version"],
                                          parameter(config, "program_file", "model.pt")),
                             map_location="cpu", weights_only=True)
        runner = load_runner()
        compiled = parameter(config, "torch_compile", "0") == "1"
        module = runner.GraphProgram(program, device=self.device, depthwise_taps=compiled)
        if compiled:
            module = torch.compile(module, dynamic=False)
        height, width, _ = (int(d) for d in next(i for i in config["input"] if i["name"] == "images")["dims"])
        buckets = [int(b) for b in parameter(config, "batch_buckets", "1").split(",")]
        self.replay = runner.GraphReplay(module, height, width, buckets, self.device)

    def _images(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "images")
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy())
        return torch.from_dlpack(tensor.to_dlpack())

    def execute(self, requests):
        responses = []
        try:
            with torch.inference_mode():
                parts = [self._images(r) for r in requests]
                candidates = self.replay.run(parts)
        except Exception as exc:  # e.g. out of memory: each request still gets its one response
            error = f"detector failed: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) for _ in requests]
        start = 0
        for part in parts:
            mine = candidates[start:start + len(part)]
            start += len(part)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor.from_dlpack("candidates", dlpack.to_dlpack(mine))]))
        return responses
