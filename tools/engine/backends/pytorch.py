"""BACKEND=torch: the rewritten graph as a graph program (``model.pt``) run by PyTorch on CUDA.

The verbs every backend has: :func:`status` (can it run here, and why not), :func:`build` (the
artifact: the rewritten ONNX graph node for node, with its constants and a float16 mark on the
network's nodes; with ``TORCH_COMPILE=engine``, also what the server runs compiled with
AOTInductor, one package per CUDA-graph batch size, so the server loads machine code instead of
compiling at every start) and :func:`check` (Polygraphy's PyTorch runner on the program, and on
the packages run as the server runs them, against onnxruntime on the rewritten graph, at
detection level). :func:`reusable` says whether a stored build's packages still serve here.

The program's runner and the server's graphs live in the model repository
(``retinaface_detector/1/``, torch only), so Triton serves them with no project code; the build
loads those same files (:func:`server_module`) to write and check what it builds.
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
from tools.engine.plan import Plan
from tools.engine.precision import half_nodes
from tools.engine.record import COMPILED, PACKAGES, file_sha256, read as read_record
from tools.engine.repository import DETECTOR, MODEL_REPOSITORY
from tools.engine.surgery import INPUT_NAME, OUTPUT_NAME

__all__ = ["NAME", "status", "builder", "build", "check", "reusable", "server_module", "program_from_onnx",
           "program_module", "servable_build", "load_packages", "packages_module", "compare_with_onnxruntime",
           "TOLERANCE"]

NAME = "torch"
TOLERANCE = Tolerance(iou=0.95, box_px=0.5, landmark_px=0.5, score=0.01)


def server_module(name: str, version_dir: Path = MODEL_REPOSITORY / DETECTOR / "1") -> ModuleType:
    """The detector's server file ``<name>.py`` in ``version_dir``, loaded by path and registered
    as ``rtface_server_<name>``, where ``torch.compile`` looks up the globals of the code it traces."""
    spec = importlib.util.spec_from_file_location(f"rtface_server_{name}", version_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def status() -> tuple[bool, str]:
    """Whether the torch detector can be built and served here, and why (or why not)."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed (pip install -e '.[gpu]', or python -c 'import torch' fails)"
    if not torch.cuda.is_available():
        return False, f"PyTorch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return True, f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def builder() -> dict:
    """What the torch build adds to the record's fingerprint: nothing (torch is among its tools)."""
    return {}


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


def program_module(artifact: Path, device: str = "cuda"):
    """The artifact at ``artifact`` (``model.pt``) loaded with the runner beside it, on ``device``."""
    import torch

    program = torch.load(artifact, map_location="cpu", weights_only=True)
    return server_module("graph_program", artifact.parent).GraphProgram(program, device=device)


def _compile_packages(plan: Plan, artifact: Path) -> dict:
    """Compile what the served detector runs (the program at ``artifact`` with fused depthwise
    taps, in the trim layout) with AOTInductor, one package per bucket of ``plan``, beside
    ``artifact``; the record for ``build.json``: the torch, CUDA and GPU compiled for, each
    package's file and sha256."""
    import torch

    s, version_dir = plan.settings, artifact.parent
    program = torch.load(artifact, map_location="cpu", weights_only=True)
    detector = server_module("graph_program", version_dir).GraphProgram(program, device="cuda", depthwise_taps=True)
    layout = server_module("trim_layout", version_dir).TrimLayout(detector, plan.chunks).eval()
    files = {}
    for batch in plan.buckets:
        started = time.perf_counter()
        example = (torch.zeros((batch, s.input_height, s.input_width, 3), dtype=torch.uint8, device="cuda"),)
        path = version_dir / PACKAGES.package_name(batch)
        with torch.no_grad():
            exported = torch.export.export(layout, example)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
        files[str(batch)] = {"file": path.name, "sha256": file_sha256(path)}
        print(f"compiled batch {batch}: {path.name} ({path.stat().st_size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - started:.0f} s")
    return {**PACKAGES.running_platform(torch, torch.cuda.current_device()), "files": files}


def build(plan: Plan, rewritten: bytes, artifact: Path) -> dict:
    """Write the graph program to ``artifact`` (``model.pt``) and, with ``TORCH_COMPILE=engine``,
    compile its packages; the record's extra entries (the packages' record under ``COMPILED``)."""
    import torch

    torch.save(program_from_onnx(onnx.load_from_string(rewritten), plan.settings.precision == "fp16"), artifact)
    if plan.settings.torch_compile != "engine":
        return {}
    print(f"compiling the torch detector ahead of time (AOTInductor), batches {', '.join(map(str, plan.buckets))}")
    return {COMPILED: _compile_packages(plan, artifact)}


def check(plan: Plan, rewritten: bytes, artifact: Path, feeds: list, built: dict) -> list[str]:
    """The program (and its compiled packages, run in CUDA graphs as the server runs them, on
    ``feeds`` plus one batch per larger bucket) against onnxruntime at detection level; the
    disagreements (empty when they agree)."""
    s = plan.settings
    disagreements = compare_with_onnxruntime(lambda: program_module(artifact), rewritten, feeds)
    if disagreements:
        return disagreements
    print(f"validation: torch detector ({s.precision}) matches onnxruntime at detection level (Polygraphy PyTorch runner)")
    record = built.get(COMPILED)
    if record is None:
        return []
    images = np.concatenate([feed[INPUT_NAME] for feed in feeds])
    larger = [{INPUT_NAME: images[np.arange(batch) % len(images)]} for batch in plan.buckets if batch > 2]
    disagreements = compare_with_onnxruntime(
        lambda: packages_module(record, artifact.parent, s.input_height, s.input_width),
        rewritten, feeds + larger, name="torch (compiled at make engine)")
    if disagreements:  # no package that disagrees stays for the server to load
        for entry in record["files"].values():
            (artifact.parent / entry["file"]).unlink()
        return ["compiled at make engine: " + d for d in disagreements]
    print(f"validation: compiled packages (CUDA graphs, batches {', '.join(map(str, plan.buckets))}) match "
          f"onnxruntime at detection level; compiled for {record['gpu']} (compute {record['capability']}), "
          f"torch {record['torch']}, CUDA {record['cuda']}")
    return []


def reusable(plan: Plan, stored: dict) -> bool:
    """Whether a stored build's compiled packages (where this build wants them) serve on this
    machine's first GPU, as the server's own check decides."""
    if plan.settings.torch_compile != "engine":
        return True
    import torch

    version_dir = plan.settings.repository / DETECTOR / "1"
    return PACKAGES.refusal(stored.get(COMPILED), PACKAGES.running_platform(torch, torch.cuda.current_device()),
                            list(plan.buckets), str(version_dir)) is None


def servable_build(repository: Path, buckets: list[int]) -> tuple[dict, Path]:
    """The record and the detector's version folder of the torch build in ``repository``, when its
    AOTInductor packages for ``buckets`` can serve on this machine's GPU; raises LookupError saying
    why not and what to run."""
    stored = read_record(repository) or {}
    version_dir = repository / DETECTOR / "1"
    if stored.get("backend") != "torch":
        raise LookupError(f"no torch build in {repository}: run make engine BACKEND=torch")
    import torch

    why = PACKAGES.refusal(stored.get(COMPILED), PACKAGES.running_platform(torch, torch.cuda.current_device()),
                           buckets, str(version_dir))
    if why:
        raise LookupError(f"the AOTInductor packages in {repository} cannot serve here: {why}")
    return stored, version_dir


def load_packages(record: dict, version_dir: Path, buckets: list[int]) -> dict:
    """Batch size -> the loaded package of ``record`` for it (on the current GPU), as the server loads them."""
    import torch

    return PACKAGES.load_packages(PACKAGES.package_paths(record, buckets, str(version_dir)), torch.cuda.current_device())


def packages_module(record: dict, version_dir: Path, height: int, width: int):
    """The compiled packages of ``record`` as the server runs them (CUDA graphs captured around
    them, ``graph_replay.GraphReplay``), as a module ``images -> (candidates,)`` with the trim
    layout undone, for :func:`compare_with_onnxruntime`."""
    import torch

    buckets = sorted(int(batch) for batch in record["files"])
    replay = server_module("graph_replay", version_dir).GraphReplay(
        load_packages(record, version_dir, buckets), (height, width, 3), buckets, torch.device("cuda"))
    chunk_major = server_module("trim_layout", version_dir).chunk_major

    class Replayed(torch.nn.Module):
        def __init__(self, replay):
            super().__init__()
            self.replay = replay

        def forward(self, images):
            (by_position,) = self.replay.run([images])
            return (chunk_major(by_position).clone(),)

    return Replayed(replay)


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
