"""``make engine``: RetinaFace ONNX -> graph surgery -> validation -> detector artifact + configs.

    load -> rewrite -> check TensorRT readiness -> validate against the reference
         -> build the artifact (TensorRT plan, or the rewritten ONNX for onnxruntime)
         -> write the model repository

Settings come from the environment (see ``tools/settings.py``). A rebuild with the same inputs
is a no-op. Exit status 1 with a one-line reason on any failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import sys
from pathlib import Path

import numpy as np

from tools.engine import repository
from tools.engine.source import ModelSourceError, SourceModel, load_source_model
from tools.engine.reference import ReferencePipeline
from tools.settings import GPU_BACKENDS, BuildSettings, SettingsError, topk_plan
from tools.engine.surgery import INPUT_NAME, SurgeryError, rewrite
from tools.engine.tensorrt_plan import (TensorRTBuildError, build_plan, builder_version, check_versions_match,
                                        compare_plan, serving_tensorrt_version, tensorrt_status)
from tools.engine.tensorrt_check import check_tensorrt_readiness
from tools.engine.torch_backend import (COMPILED, compare_with_onnxruntime, compile_packages, packages_module,
                                        packages_refusal, program_module, torch_status, write_program)
from tools.engine.validate import compare_with_reference, validation_feeds

__all__ = ["BuildError", "choose_backend", "fingerprint", "build", "build_scratch", "main"]

PREPROCESS_WHERE = {"numpy": "CPU, OpenCV", "torch": "GPU, nvJPEG through torchvision, a step of its own",
                    "detector": "GPU, nvJPEG through torchvision, inside the detector's process"}
TOOL_PACKAGES = ("onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "tensorrt", "torch")


class BuildError(RuntimeError):
    """The engine build stopped; the message says at which step and what to do."""


def _status(backend: str) -> tuple[bool, str]:
    return {"tensorrt": tensorrt_status, "torch": torch_status}[backend]()


def choose_backend(requested: str) -> tuple[str, str]:
    """Resolve ``BACKEND`` to a concrete backend and the reason: ``auto`` tries tensorrt, then
    torch (PyTorch imports and sees a GPU), then onnxruntime (CPU, always there)."""
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if requested in GPU_BACKENDS:
        available, why = _status(requested)
        if not available:
            raise BuildError(f"BACKEND={requested} but {why}; use BACKEND=onnxruntime on this machine")
        return requested, f"requested ({why})"
    reasons = []
    for backend in GPU_BACKENDS:
        available, why = _status(backend)
        if available:
            return backend, "auto: " + "; ".join([*reasons, why])
        reasons.append(why)
    return "onnxruntime", "auto: " + "; ".join(reasons)


def _versions() -> dict[str, str]:
    versions = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint(settings: BuildSettings, backend: str, source: SourceModel) -> dict:
    """Everything the artifact depends on: source hash, sizes, options, tool and builder versions."""
    builder = hashlib.sha256()
    engine_dir = Path(__file__).parent
    config_writer = Path(repository.__file__)  # its changes rewrite the configs only (configs_sha256)
    for path in sorted([*engine_dir.glob("*.py"), *engine_dir.parent.glob("*.py")]):
        if path.resolve() != config_writer.resolve():
            builder.update(path.read_bytes())
    return {
        "source": source.origin, "source_sha256": source.sha256, "backend": backend,
        "input_size": f"{settings.input_width}x{settings.input_height}",
        "max_batch": settings.max_batch, "topk": settings.topk,
        "max_detections": settings.max_detections,
        "max_queue": settings.max_queue, "queue_timeout_ms": settings.queue_timeout_ms,
        "overload_keep": settings.overload_keep,
        "precision": settings.precision if backend in GPU_BACKENDS else "fp32",
        "gpu_instances": settings.gpu_instances, "gpus": settings.gpus, "torch_compile": settings.torch_compile,
        "cudnn_algorithms": settings.cudnn_algorithms, "cuda_waits": settings.cuda_waits,
        "postprocess_instances": settings.postprocess_instances,
        "preprocess": repository.preprocess_kind(settings, backend),
        "preprocess_instances": settings.preprocess_instances, "max_image_pixels": settings.max_image_pixels,
        "tools": _versions(), "builder_sha256": builder.hexdigest(),
        "configs_sha256": repository.file_sha256(Path(repository.__file__)),
        **({"tensorrt_builder": builder_version()} if backend == "tensorrt" else {}),
    }


# Build settings that change only what the config.pbtxt files say, never the detector artifact (nor
# the torch detector's packages), and the config writer's own hash: a build that differs from the
# stored one in these alone rewrites the configs and keeps the artifact, instead of compiling it again.
CONFIG_ONLY = ("max_detections", "max_queue", "queue_timeout_ms", "overload_keep", "gpu_instances", "gpus",
               "cudnn_algorithms", "cuda_waits", "postprocess_instances", "preprocess", "preprocess_instances",
               "max_image_pixels", "configs_sha256")


def _stored_state(settings: BuildSettings, metadata: dict, stored: dict) -> str | None:
    """How the build ``stored`` in ``settings.repository`` compares with ``metadata``: ``"same"``
    (nothing to do), ``"configs"`` (the artifact is this build's; only :data:`CONFIG_ONLY`
    settings differ, or a config file is missing) or None (the artifact must be built)."""
    version_dir = settings.repository / repository.DETECTOR / "1"
    artifact = version_dir / repository.artifact_name(metadata["backend"])
    packaged = (metadata["backend"] != "torch" or settings.torch_compile != "engine"
                or packages_refusal(stored.get(COMPILED), version_dir, repository.cuda_graph_batches(settings)) is None)
    skipped = ("artifact_sha256", COMPILED, *CONFIG_ONLY)
    if not ({k: v for k, v in stored.items() if k not in skipped} == {k: v for k, v in metadata.items() if k not in skipped}
            and artifact.is_file() and repository.file_sha256(artifact) == stored.get("artifact_sha256") and packaged):
        return None
    configs = [settings.repository / name / "config.pbtxt" for name in repository.MODELS]
    same = all(stored.get(key) == metadata.get(key) for key in CONFIG_ONLY) and all(path.is_file() for path in configs)
    return "same" if same else "configs"


def _compile(settings: BuildSettings, artifact: Path, rewritten: bytes, feeds: list) -> dict:
    """AOTInductor packages of the torch detector (``TORCH_COMPILE=engine``), validated as the
    server runs them against onnxruntime, on ``feeds`` plus one batch per larger bucket; the
    record for ``build.json``."""
    buckets = repository.cuda_graph_batches(settings)
    chunks = topk_plan(settings.topk)[0]
    print(f"compiling the torch detector ahead of time (AOTInductor), batches {', '.join(map(str, buckets))}")
    record = compile_packages(artifact, buckets, settings.input_height, settings.input_width, chunks)
    images = np.concatenate([feed[INPUT_NAME] for feed in feeds])
    larger = [{INPUT_NAME: images[np.arange(batch) % len(images)]} for batch in buckets if batch > 2]
    disagreements = compare_with_onnxruntime(
        lambda: packages_module(record, artifact.parent, settings.input_height, settings.input_width, chunks),
        rewritten, feeds + larger, name="torch (compiled at make engine)")
    if disagreements:
        for entry in record["files"].values():
            (artifact.parent / entry["file"]).unlink()
        raise BuildError("compiled torch detector disagrees with onnxruntime: " + "; ".join(disagreements))
    print(f"validation: compiled packages (CUDA graphs, batches {', '.join(map(str, buckets))}) match onnxruntime "
          f"at detection level; compiled for {record['gpu']} (compute {record['capability']}), "
          f"torch {record['torch']}, CUDA {record['cuda']}")
    return record


def build(settings: BuildSettings) -> dict:
    """Run the whole pipeline for ``settings``; return the build metadata written."""
    backend, why = choose_backend(settings.backend)
    print(f"backend: {backend} ({why})")
    preprocess = repository.preprocess_kind(settings, backend)
    if preprocess == "torch" and backend != "torch" and not torch_status()[0]:
        raise BuildError(f"PREPROCESS=torch but {torch_status()[1]}; use PREPROCESS=numpy")
    if preprocess == "detector" and backend != "torch":
        raise BuildError(f"PREPROCESS=detector decodes inside the torch detector, but the backend is {backend}; "
                         "use PREPROCESS=torch (a GPU step of its own) or numpy")
    print(f"preprocess (encoded images): {preprocess} ({PREPROCESS_WHERE[preprocess]})")
    print("postprocess: " + ("in the detector (GPU, behind the network in its CUDA graph; numpy for crowds)"
                             if repository.finishes_in_detector(backend) else "a step of its own (CPU, numpy)"))
    source = load_source_model(settings.onnx_path)
    metadata = fingerprint(settings, backend, source)
    stored = repository.read_metadata(settings) or {}
    state = _stored_state(settings, metadata, stored)
    if state == "same":
        print(f"up to date: {settings.repository / repository.DETECTOR} already holds this build")
        return metadata
    if state == "configs":
        changed = [key for key in CONFIG_ONLY if stored.get(key) != metadata.get(key)]
        for path in repository.write_configs(settings, backend):
            print(f"wrote {path.relative_to(settings.repository.parent)}")
        repository.write_metadata(settings, {**metadata, "artifact_sha256": stored["artifact_sha256"],
                                             **({COMPILED: stored[COMPILED]} if COMPILED in stored else {})})
        print(f"configs rewritten ({', '.join(changed) or 'missing config files'}); "
              f"the detector artifact in {settings.repository / repository.DETECTOR} is this build's and stays")
        return metadata

    print(f"source: {source.origin} (sha256 {source.sha256[:12]})")
    model, summary = rewrite(source.load(), settings.input_width, settings.input_height, settings.topk)
    print(summary)
    rewritten = model.SerializeToString()

    problems = check_tensorrt_readiness(model)
    print("tensorrt readiness: " + ("ready" if not problems else "; ".join(problems)))
    if problems and backend == "tensorrt":
        raise BuildError("the rewritten graph would not parse in TensorRT: " + "; ".join(problems))

    pipeline = ReferencePipeline(source, settings.input_width, settings.input_height)
    if not compare_with_reference(rewritten, pipeline, settings.topk):
        raise BuildError("validation failed: the rewritten graph does not reproduce the original "
                         "graph + reference decode within tolerance (see the comparison above)")
    print("validation: rewritten graph == original graph + reference decode + top-K (Polygraphy)")

    version_dir = settings.repository / repository.DETECTOR / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    artifact = version_dir / repository.artifact_name(backend)
    compiled = None
    if backend == "tensorrt":
        try:
            check_versions_match(metadata["tensorrt_builder"], serving_tensorrt_version(), "make engine")
            build_plan(rewritten, artifact, settings.input_width, settings.input_height,
                       settings.max_batch, fp16=settings.precision == "fp16")
            disagreements = compare_plan(artifact, rewritten,
                                         validation_feeds(settings.input_width, settings.input_height),
                                         settings.max_batch)
        except TensorRTBuildError as exc:
            raise BuildError(str(exc)) from None
        if disagreements:
            artifact.unlink()
            raise BuildError("TensorRT plan disagrees with onnxruntime: " + "; ".join(disagreements))
        print("validation: TensorRT plan matches onnxruntime at detection level")
    elif backend == "torch":
        write_program(rewritten, artifact, half=settings.precision == "fp16")
        feeds = validation_feeds(settings.input_width, settings.input_height)
        disagreements = compare_with_onnxruntime(lambda: program_module(artifact), rewritten, feeds)
        if disagreements:
            artifact.unlink()
            raise BuildError("torch detector disagrees with onnxruntime: " + "; ".join(disagreements))
        print(f"validation: torch detector ({settings.precision}) matches onnxruntime at detection level "
              "(Polygraphy PyTorch runner)")
        if settings.torch_compile == "engine":
            compiled = _compile(settings, artifact, rewritten, feeds)
    else:
        artifact.write_bytes(rewritten)
    for path in repository.write_configs(settings, backend):
        print(f"wrote {path.relative_to(settings.repository.parent)}")
    repository.write_metadata(settings, {**metadata, "artifact_sha256": repository.file_sha256(artifact),
                                         **({COMPILED: compiled} if compiled else {})})
    print(f"detector: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    return metadata


def build_scratch(directory: Path, **changes) -> BuildSettings:
    """Build the default engine plus ``changes`` (e.g. ``topk=3840``) into a scratch repository
    at ``directory`` (model code copied in), reusing it while its inputs do not change."""
    settings = dataclasses.replace(BuildSettings.from_env(), repository=directory, **changes)
    repository.copy_model_code(directory)
    build(settings)
    return settings


def main() -> int:
    """Entry point for ``python -m tools.engine.build``."""
    try:
        build(BuildSettings.from_env())
    except (BuildError, SettingsError, ModelSourceError, SurgeryError) as exc:
        print(f"make engine: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
