"""BACKEND=tensorrt: a TensorRT plan (``model.plan``), built and checked with Polygraphy (needs
TensorRT 10 and a GPU). The verbs every backend has: :func:`status`, :func:`build` and :func:`check`.

The plan has one optimization profile (batch min 1 / opt MAX_BATCH/2 / max MAX_BATCH). With
FP16, the layers outside the network (uint8 preprocessing, softmax, prior decode, top-K and
gather) are pinned to FP32 (layer precisions, ``precision_constraints="obey"``): FP16 spacing is
0.5 px at 512-1024 px and 2 px at 2048-4096 px. The plan is compared with the rewritten graph on
onnxruntime at detection level, both ways and landmarks included (:mod:`tools.engine.detections`).

A plan deserializes only in the TensorRT version that built it, so the build refuses to write
one for a server known to load another TensorRT (:func:`serving_tensorrt_version`), and
``make serve`` refuses a plan whose recorded builder differs from the server's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx

from tools.engine.backends.common import BackendError
from tools.engine.detections import Tolerance, compare_runs
from tools.engine.plan import Plan
from tools.engine.precision import half_nodes
from tools.engine.surgery import INPUT_NAME, OUTPUT_NAME

__all__ = ["NAME", "status", "builder", "build", "check", "reusable", "TensorRTBuildError", "builder_version",
           "serving_tensorrt_version", "check_versions_match", "fp32_layer_names", "build_plan", "compare_plan",
           "TOLERANCE", "CONTAINER_RELEASE", "TENSORRT_PIN"]

NAME = "tensorrt"

TOLERANCE = Tolerance(iou=0.9, box_px=1.0, landmark_px=1.0, score=0.02)  # FP16 network
CONTAINER_RELEASE = "24.12"   # nvcr.io/nvidia/tensorrt:24.12-py3 builds, tritonserver:24.12-py3 serves
TENSORRT_PIN = "10.7.0"       # the TensorRT of that release (10.7.0.23); the `trt` extra pins it
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/local/tensorrt/lib", "/opt/tritonserver/backends/tensorrt",
                "/opt/tritonserver/lib")


class TensorRTBuildError(BackendError):
    """The plan cannot be built or checked; the message says why and what to do, in one line."""


def status() -> tuple[bool, str]:
    """Whether a TensorRT plan can be built here, and why (or why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("TensorRT is not installed (python -c 'import tensorrt' fails; "
                       f"pip install -e '.[trt]' pins TensorRT {TENSORRT_PIN})")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "TensorRT is installed but no NVIDIA GPU is visible (no nvidia-smi)"
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        return False, "TensorRT is installed but nvidia-smi lists no GPU"
    return True, f"TensorRT {tensorrt.__version__} and {listing.stdout.splitlines()[0]}"


def builder_version() -> str:
    """The importable TensorRT's version, major.minor.patch (e.g. ``10.7.0``)."""
    import tensorrt

    return ".".join(tensorrt.__version__.split(".")[:3])


def serving_tensorrt_version(extra_dirs: tuple[str, ...] = ()) -> str | None:
    """The TensorRT (major.minor.patch) the server here will load, where it can be known:
    ``$TRITON_TENSORRT_VERSION``, else the ``libnvinfer.so.X.Y.Z`` in ``extra_dirs``, the
    directories on ``LD_LIBRARY_PATH`` and NVIDIA's container paths; None when there is none."""
    stated = os.environ.get("TRITON_TENSORRT_VERSION", "").strip()
    if stated:
        return ".".join(stated.split(".")[:3])
    dirs = [*extra_dirs, *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep), *LIBRARY_DIRS]
    for directory in filter(None, dirs):
        for path in sorted(Path(directory).glob("libnvinfer.so.*.*.*")) if Path(directory).is_dir() else []:
            match = re.fullmatch(r"libnvinfer\.so\.(\d+)\.(\d+)\.(\d+)", path.name)
            if match:
                return ".".join(match.groups())
    return None


def check_versions_match(built_by: str, serving: str | None, where: str) -> None:
    """Raise :class:`TensorRTBuildError` when a plan built by TensorRT ``built_by`` would be
    served by another ``serving`` version (``where`` says which side is checking)."""
    if serving is not None and serving != built_by:
        raise TensorRTBuildError(
            f"{where}: the plan is built by TensorRT {built_by} but the server loads TensorRT {serving}, "
            f"which cannot deserialize it; build and serve with the same release (e.g. NVIDIA's "
            f"{CONTAINER_RELEASE} tensorrt and tritonserver containers: TensorRT {TENSORRT_PIN})")


def fp32_layer_names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """The ONNX node names and float tensor names outside the float16 network (preprocessing,
    softmax, decode, top-K, gather): the layers an FP16 plan must keep in FP32."""
    marks = half_nodes(model.graph)
    nodes = [node for i, node in enumerate(model.graph.node) if i not in marks]
    return {node.name for node in nodes}, {name for node in nodes for name in node.output}


def _pin_fp32(network, node_names: set[str], tensor_names: set[str]):
    """Set FP32 compute and output types on the layers of ``node_names`` (by layer name) or
    producing ``tensor_names``; returns the network (a Polygraphy postprocess step)."""
    import tensorrt as trt

    for layer in network:
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if layer.name in node_names or any(t.name in tensor_names for t in outputs):
            layer.precision = trt.float32
            for i, tensor in enumerate(outputs):
                if tensor.dtype in (trt.float32, trt.float16):
                    layer.set_output_type(i, trt.float32)
    return network


def build_plan(onnx_bytes: bytes, plan_path: Path, width: int, height: int, max_batch: int,
               fp16: bool) -> Path:
    """Build a serialized TensorRT engine from the rewritten graph and write it at ``plan_path``."""
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes,
                                        PostprocessNetwork, Profile)
    from polygraphy.exception import PolygraphyException

    shape = lambda batch: (batch, height, width, 3)  # noqa: E731
    profile = Profile().add(INPUT_NAME, min=shape(1), opt=shape(max(1, max_batch // 2)), max=shape(max_batch))
    network = NetworkFromOnnxBytes(onnx_bytes)
    if fp16:
        node_names, tensor_names = fp32_layer_names(onnx.load_from_string(onnx_bytes))
        network = PostprocessNetwork(network, lambda network: _pin_fp32(network, node_names, tensor_names),
                                     name="pin decode to FP32")
    config = CreateConfig(fp16=fp16, precision_constraints="obey" if fp16 else None, profiles=[profile])
    try:
        SaveBytes(EngineBytesFromNetwork(network, config=config), path=str(plan_path))()
    except PolygraphyException as exc:
        raise TensorRTBuildError(f"TensorRT could not build the plan ({exc}); see TensorRT's log above") from None
    return plan_path


def compare_plan(plan_path: Path, onnx_bytes: bytes, feeds: list[dict[str, np.ndarray]],
                 max_batch: int, tolerance: Tolerance = TOLERANCE) -> list[str]:
    """Run the plan and the rewritten graph on onnxruntime side by side (Polygraphy runners) on
    the ``feeds`` the plan's profile admits (batch <= ``max_batch``); return the disagreements
    at detection level over all images (empty when they agree)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    feeds = [feed for feed in feeds if len(feed[INPUT_NAME]) <= max_batch]
    runners = [TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))), name="tensorrt"),
               OnnxrtRunner(SessionFromOnnx(onnx_bytes, providers=["cpu"]), name="onnxruntime")]
    try:
        results = Comparator.run(runners, data_loader=feeds)
    except PolygraphyException as exc:
        raise TensorRTBuildError(f"running the plan failed ({exc}); see Polygraphy's log above") from None
    (_, plan_runs), (_, ort_runs) = results.items()
    return compare_runs("tensorrt", ort_runs, plan_runs, OUTPUT_NAME, tolerance)


def builder() -> dict:
    """The TensorRT that builds the plan (``make serve`` refuses a plan built by another)."""
    return {"tensorrt_builder": builder_version()}


def build(plan: Plan, rewritten: bytes, artifact: Path) -> dict:
    """Build the plan at ``artifact``, refusing first when the server here loads another TensorRT."""
    s = plan.settings
    check_versions_match(builder_version(), serving_tensorrt_version(), "make engine")
    build_plan(rewritten, artifact, s.input_width, s.input_height, s.max_batch, fp16=s.precision == "fp16")
    return {}


def check(plan: Plan, rewritten: bytes, artifact: Path, feeds: list, built: dict) -> list[str]:
    """The plan against onnxruntime at detection level, on the ``feeds`` its profile admits."""
    disagreements = compare_plan(artifact, rewritten, feeds, plan.settings.max_batch)
    if not disagreements:
        print("validation: TensorRT plan matches onnxruntime at detection level")
    return disagreements


def reusable(plan: Plan, stored: dict) -> bool:
    """A stored plan serves where its TensorRT does (the record's fingerprint holds the builder)."""
    return True
