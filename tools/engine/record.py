"""The build record: ``build.json`` beside the detector artifact, and what a rebuild must redo.

:func:`fingerprint` lists everything the artifact depends on (the source's hash, the settings,
tool versions, the hash of the code that builds it). A rebuild compares it with the stored
record (:func:`stored_state`): the same build is a no-op; one that differs only in what the
configs say rewrites the configs and keeps the artifact (and the torch detector's compiled
packages); anything else builds the artifact again. ``make serve`` checks the artifact against
the recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

from tools.engine.plan import Plan
from tools.engine.repository import DETECTOR, MODEL_REPOSITORY, MODELS, artifact_name
from tools.engine.source import SourceModel
from tools.settings import GPU_BACKENDS

__all__ = ["METADATA", "COMPILED", "PACKAGES", "read", "write", "file_sha256", "fingerprint", "stored_state",
           "CONFIG_ONLY"]

METADATA = "build.json"
TOOL_PACKAGES = ("onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "tensorrt", "torch")
ENGINE_DIR = Path(__file__).parent
CONFIG_WRITERS = ("configs.py", "plan.py", "repository.py")  # their changes rewrite the configs only
COMPILED_CODE = ("graph_program.py", "trim_layout.py")  # the detector code its packages are compiled from


def _server_module(name: str):
    """A standard-library module of the detector's server code, loaded by path."""
    spec = importlib.util.spec_from_file_location(f"rtface_server_{name}", MODEL_REPOSITORY / DETECTOR / "1" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PACKAGES = _server_module("compiled_packages")  # which compiled packages the server may load
COMPILED = PACKAGES.RECORD_KEY  # build.json's key for the record of the compiled packages
file_sha256 = PACKAGES.file_sha256


def _path(repository: Path) -> Path:
    return repository / DETECTOR / "1" / METADATA


def read(repository: Path) -> dict | None:
    """The record of the detector last built into ``repository``, if any."""
    try:
        return json.loads(_path(repository).read_text())
    except (OSError, ValueError):
        return None


def write(repository: Path, record: dict) -> Path:
    """Store ``record`` next to the detector artifact in ``repository``."""
    path = _path(repository)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def _versions() -> dict[str, str]:
    versions = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _code_sha256(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(plan: Plan, source: SourceModel, builder: dict | None = None) -> dict:
    """Everything the artifact depends on: source hash, sizes, options, tool and builder versions
    (``builder``: what the backend adds, e.g. the TensorRT that builds the plan)."""
    s, backend = plan.settings, plan.backend
    code = sorted([*ENGINE_DIR.rglob("*.py"), *ENGINE_DIR.parent.glob("*.py")])
    detector_code = [MODEL_REPOSITORY / DETECTOR / "1" / name for name in COMPILED_CODE]
    return {
        "source": source.origin, "source_sha256": source.sha256, "network": source.network,
        "input_convention": str(source.convention), "backend": backend,
        "input_size": f"{s.input_width}x{s.input_height}", "max_batch": s.max_batch, "topk": s.topk,
        "max_detections": s.max_detections, "max_queue": s.max_queue, "queue_timeout_ms": s.queue_timeout_ms,
        "overload_keep": s.overload_keep, "precision": s.precision if backend in GPU_BACKENDS else "fp32",
        "gpu_instances": s.gpu_instances, "gpus": s.gpus, "torch_compile": s.torch_compile,
        "cudnn_algorithms": s.cudnn_algorithms, "cuda_waits": s.cuda_waits,
        "postprocess_instances": s.postprocess_instances, "preprocess": plan.preprocess,
        "preprocess_instances": s.preprocess_instances, "max_image_pixels": s.max_image_pixels,
        "tools": _versions(),
        "builder_sha256": _code_sha256([p for p in code if p.name not in CONFIG_WRITERS] + detector_code),
        "configs_sha256": _code_sha256([ENGINE_DIR / name for name in CONFIG_WRITERS]),
        **(builder or {}),
    }


# Record keys that change only what the config.pbtxt files say, never the detector artifact (nor
# the torch detector's packages): a build that differs from the stored one in these alone
# rewrites the configs and keeps the artifact, instead of compiling it again.
CONFIG_ONLY = ("max_detections", "max_queue", "queue_timeout_ms", "overload_keep", "gpu_instances", "gpus",
               "cudnn_algorithms", "cuda_waits", "postprocess_instances", "preprocess", "preprocess_instances",
               "max_image_pixels", "configs_sha256")


def stored_state(plan: Plan, metadata: dict, stored: dict, packages_usable: bool) -> str | None:
    """How the build ``stored`` in the plan's repository compares with ``metadata``: ``"same"``
    (nothing to do), ``"configs"`` (the artifact is this build's, ``packages_usable`` says its
    compiled packages are too; only :data:`CONFIG_ONLY` keys differ, or a config file is missing)
    or None (the artifact must be built)."""
    repository = plan.settings.repository
    artifact = repository / DETECTOR / "1" / artifact_name(plan.backend)
    skipped = ("artifact_sha256", COMPILED, *CONFIG_ONLY)
    if not ({k: v for k, v in stored.items() if k not in skipped} == {k: v for k, v in metadata.items() if k not in skipped}
            and artifact.is_file() and file_sha256(artifact) == stored.get("artifact_sha256") and packages_usable):
        return None
    configs = [repository / name / "config.pbtxt" for name in MODELS]
    same = all(stored.get(key) == metadata.get(key) for key in CONFIG_ONLY) and all(path.is_file() for path in configs)
    return "same" if same else "configs"
