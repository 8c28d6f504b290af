"""BACKEND=torch: the rewritten graph as a graph program (``model.pt``) run by PyTorch on CUDA.

Three verbs, like every detector backend: :func:`torch_status` (can it run here, and why not),
:func:`write_program` (the artifact: the rewritten ONNX graph node for node, with its constants
and a float16 mark on the network's nodes) and :func:`compare_with_onnxruntime` (Polygraphy's
PyTorch runner on the artifact against onnxruntime on the rewritten graph, at detection level).
With ``TORCH_COMPILE=engine``, :func:`compile_packages` also compiles what the server runs with
AOTInductor, one package per CUDA-graph batch size, so the server loads machine code instead of
compiling at every start; :func:`packages_module` runs those packages as the server does, for the
same comparison.

The runner of the program lives in the model repository
(``retinaface_detector/1/graph_program.py``, torch only), so Triton serves it with no project
code; the build imports that same file to validate what it wrote.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from onnx import numpy_helper

from tools.engine.detections import Tolerance, compare_runs
from tools.engine.repository import DETECTOR, file_sha256, read_metadata
from tools.engine.surgery import INPUT_NAME, OUTPUT_NAME
from tools.settings import MODEL_REPOSITORY, BuildSettings

__all__ = ["torch_status", "half_nodes", "program_from_onnx", "write_program", "load_runner_module",
           "program_module", "compile_packages", "load_packages", "packages_module", "compare_with_onnxruntime", "TOLERANCE",
           "HEAD_OUTPUTS", "PROGRAM_FILE", "PACKAGES_FILE", "PACKAGES", "COMPILED", "packages_refusal",
           "servable_build"]

HEAD_OUTPUTS = ("loc", "conf", "landmarks")  # the network's own outputs; the decode follows them
FLOAT32_OPS = {"Softmax"}  # scores are normalised in float32 even inside the network
PROGRAM_FILE = "graph_program.py"
PACKAGES_FILE = "compiled_packages.py"  # which compiled packages the server may load (standard library only)


def _load_by_path(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PACKAGES = _load_by_path(MODEL_REPOSITORY / DETECTOR / "1" / PACKAGES_FILE, "rtface_compiled_packages")
COMPILED = PACKAGES.RECORD_KEY  # build.json's key for the record of the compiled packages
TOLERANCE = Tolerance(iou=0.95, box_px=0.5, landmark_px=0.5, score=0.01)


def torch_status() -> tuple[bool, str]:
    """Whether the torch detector can be built and served here, and why (or why not)."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed (pip install -e '.[gpu]', or python -c 'import torch' fails)"
    if not torch.cuda.is_available():
        return False, f"PyTorch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return True, f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def _attributes(node: onnx.NodeProto) -> dict:
    out = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        elif not isinstance(value, (int, float, str)):
            raise ValueError(f"node {node.name or node.output[0]}: attribute {attribute.name} is not a "
                             "number, string or list; the torch detector cannot take it")
        out[attribute.name] = value
    return out


def half_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that run in float16: those on a path from a convolution to one of
    the network's outputs (:data:`HEAD_OUTPUTS`), except :data:`FLOAT32_OPS`. Preprocessing
    before the first convolution and the decode after the heads stay float32."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    upstream, stack = set(), [producer[name] for name in HEAD_OUTPUTS if name in producer]
    while stack:
        index = stack.pop()
        if index not in upstream:
            upstream.add(index)
            stack.extend(producer[name] for name in graph.node[index].input if name in producer)
    downstream, frontier = set(), [i for i, node in enumerate(graph.node) if node.op_type == "Conv"]
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    while frontier:
        index = frontier.pop()
        if index not in downstream:
            downstream.add(index)
            frontier.extend(j for name in graph.node[index].output for j in consumers.get(name, []))
    return {i for i in upstream & downstream if graph.node[i].op_type not in FLOAT32_OPS}


def program_from_onnx(model: onnx.ModelProto, half: bool) -> dict:
    """The graph program of the rewritten ``model``: its nodes in order with their attributes,
    its initializers as tensors, and (``half``) the float16 marks of :func:`half_nodes`."""
    import torch

    graph = model.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ValueError(f"expected the rewritten graph ({INPUT_NAME} -> {OUTPUT_NAME}); run the surgery first")
    marks = half_nodes(graph) if half else set()
    tensors = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant":
            (value,) = node.attribute
            tensors[node.output[0]] = torch.from_numpy(numpy_helper.to_array(value.t).copy())
            continue
        nodes.append({"op": node.op_type, "inputs": list(node.input), "outputs": list(node.output),
                      "attrs": _attributes(node), "half": index in marks})
    return {"format": "rtface-graph-program/1", "inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME],
            "nodes": nodes, "tensors": tensors}


def write_program(rewritten: bytes, path: Path, half: bool) -> Path:
    """Write the graph program of the ``rewritten`` ONNX bytes to ``path`` (``model.pt``)."""
    import torch

    torch.save(program_from_onnx(onnx.load_from_string(rewritten), half), path)
    return path


def load_runner_module(version_dir: Path) -> ModuleType:
    """Import the model repository's program runner (``graph_program.py`` in ``version_dir``)."""
    return _load_by_path(version_dir / PROGRAM_FILE, "rtface_graph_program")


def program_module(artifact: Path, device: str = "cuda"):
    """The artifact at ``artifact`` (``model.pt``) loaded with the runner beside it, on ``device``."""
    import torch

    runner = load_runner_module(artifact.parent)
    program = torch.load(artifact, map_location="cpu", weights_only=True)
    return runner.GraphProgram(program, device=device)


def compile_packages(artifact: Path, buckets: list[int], height: int, width: int, chunks: int) -> dict:
    """Compile what the served detector runs (the program at ``artifact`` with fused depthwise
    taps, in the trim layout) with AOTInductor, one package per batch size in ``buckets``,
    beside ``artifact``; return the record for ``build.json`` (``compiled_packages.py``: the
    torch, CUDA and GPU compiled for, each package's file and sha256)."""
    import torch

    version_dir = artifact.parent
    runner = load_runner_module(version_dir)
    program = torch.load(artifact, map_location="cpu", weights_only=True)
    layout = runner.TrimLayout(runner.GraphProgram(program, device="cuda", depthwise_taps=True), chunks).eval()
    files = {}
    for batch in buckets:
        started = time.perf_counter()
        example = (torch.zeros((batch, height, width, 3), dtype=torch.uint8, device="cuda"),
                   torch.zeros(batch, dtype=torch.float32, device="cuda"))
        path = version_dir / PACKAGES.package_name(batch)
        with torch.no_grad():
            exported = torch.export.export(layout, example)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
        files[str(batch)] = {"file": path.name, "sha256": file_sha256(path)}
        print(f"compiled batch {batch}: {path.name} ({path.stat().st_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - started:.0f} s")
    return {**PACKAGES.running_platform(torch, torch.cuda.current_device()), "files": files}


def packages_refusal(record: dict | None, version_dir: Path, buckets: list[int]) -> str | None:
    """Why the compiled packages of ``record`` would not serve on this machine's first GPU (the
    server's own check), or None when they would."""
    import torch

    return PACKAGES.refusal(record, PACKAGES.running_platform(torch, torch.cuda.current_device()), buckets,
                            str(version_dir))


def servable_build(settings: BuildSettings, buckets: list[int]) -> tuple[dict, Path]:
    """``build.json`` and the detector's version folder of the torch build in
    ``settings.repository``, when its AOTInductor packages for ``buckets`` can serve on this
    machine's GPU; raises LookupError saying why not and what to run."""
    metadata = read_metadata(settings) or {}
    version_dir = settings.repository / DETECTOR / "1"
    if metadata.get("backend") != "torch":
        raise LookupError(f"no torch build in {settings.repository}: run make engine BACKEND=torch")
    why = packages_refusal(metadata.get(COMPILED), version_dir, buckets)
    if why:
        raise LookupError(f"the AOTInductor packages in {settings.repository} cannot serve here: {why}")
    return metadata, version_dir


def load_packages(runner: ModuleType, record: dict, version_dir: Path, buckets: list[int]) -> dict:
    """Batch size -> the loaded package of ``record`` for it (on the current GPU), loaded by
    ``runner`` (:func:`load_runner_module`) as the server loads them."""
    import torch

    return runner.load_packages(PACKAGES.package_paths(record, buckets, str(version_dir)), torch.cuda.current_device())


def packages_module(record: dict, version_dir: Path, height: int, width: int, chunks: int):
    """The compiled packages of ``record`` as the server runs them (CUDA graphs captured around
    them, :class:`graph_program.GraphReplay`), as a module ``images -> (candidates,)`` with the
    trim layout undone, for :func:`compare_with_onnxruntime`."""
    import torch

    runner = load_runner_module(version_dir)
    buckets = sorted(int(batch) for batch in record["files"])
    loaded = load_packages(runner, record, version_dir, buckets)

    class Replayed(torch.nn.Module):
        def __init__(self, replay):
            super().__init__()
            self.replay = replay

        def forward(self, images):
            by_position, _, _ = self.replay.run([images], np.zeros(len(images), dtype=np.float32))
            n, per_chunk, _, row = by_position.shape
            return (by_position.transpose(1, 2).reshape(n, chunks * per_chunk, row).clone(),)

    return Replayed(runner.GraphReplay(loaded, (height, width, 3), buckets, torch.device("cuda"),
                                       per_image=[()]))


def _torch_runner(model, metadata, name: str):
    """Polygraphy's PyTorch runner on ``model`` (a function returning the module to run). Its
    ``infer_impl`` casts each feed with the metadata's dtype, which Polygraphy >= 0.49 stores as
    its own ``DataType`` that numpy cannot read; the feeds here already have the input's dtype
    (uint8), so they go to the GPU as they are."""
    import torch
    from polygraphy.backend.pyt import PytRunner

    class TorchRunner(PytRunner):
        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.inference_mode():
                outputs = self.model(*(torch.from_numpy(value).cuda() for value in feed_dict.values()))
                out = OrderedDict((n, o.cpu().numpy()) for n, o in zip(self.output_names, outputs))
            self.inference_time = time.perf_counter() - start
            return out

    return TorchRunner(model, metadata, [OUTPUT_NAME], name=name)


def compare_with_onnxruntime(model, rewritten: bytes, feeds: list[dict[str, np.ndarray]], name: str = "torch",
                             tolerance: Tolerance = TOLERANCE) -> list[str]:
    """Run ``model`` (a function returning a module ``images -> (candidates,)`` on CUDA, e.g.
    ``lambda: program_module(artifact)``) through Polygraphy's PyTorch runner and the rewritten
    graph through onnxruntime (CPU) on ``feeds``; return the disagreements beyond ``tolerance``
    over all images (empty when they agree)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator

    _, height, width, _ = feeds[0][INPUT_NAME].shape
    metadata = TensorMetadata().add(INPUT_NAME, np.uint8, (None, height, width, 3))
    runners = [OnnxrtRunner(SessionFromOnnx(rewritten, providers=["cpu"]), name="onnxruntime"),
               _torch_runner(model, metadata, name)]
    results = Comparator.run(runners, data_loader=feeds)
    (_, ort_runs), (_, torch_runs) = results.items()
    return compare_runs(name, ort_runs, torch_runs, OUTPUT_NAME, tolerance)
