"""``make engine``: RetinaFace ONNX -> graph surgery -> validation -> detector artifact + configs.

    choose the backend -> resolve the plan -> load the source
        -> (up to date? configs only?) -> rewrite -> check TensorRT readiness
        -> validate against the reference -> the backend builds and checks its artifact
        -> write the configs and the build record

Settings come from the environment (see ``tools/settings.py``). A rebuild with the same inputs
is a no-op. Exit status 1 with a one-line reason on any failure.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tools.engine import record
from tools.engine.backends import BackendError, choose, pytorch
from tools.engine.configs import write_configs
from tools.engine.plan import PREPROCESSES, Plan
from tools.engine.reference import ReferencePipeline
from tools.engine.repository import DETECTOR, artifact_name, copy_model_code
from tools.engine.source import ModelSourceError, settings_source
from tools.engine.surgery import SurgeryError, rewrite
from tools.engine.tensorrt_check import check_tensorrt_readiness
from tools.engine.validate import compare_with_reference, validation_feeds
from tools.settings import BuildSettings, SettingsError

__all__ = ["BuildError", "build", "build_scratch", "main"]


class BuildError(RuntimeError):
    """The engine build stopped; the message says at which step and what to do."""


def _describe(plan: Plan) -> None:
    print(f"preprocess (encoded images): {plan.preprocess} ({PREPROCESSES[plan.preprocess]})")
    print("postprocess: " + ("in the detector (GPU, behind the network in its CUDA graph; crowds in graphs of "
                             "their own)" if plan.finishes_in_detector else "a step of its own (CPU, numpy)"))


def _write(plan: Plan, metadata: dict) -> None:
    for path in write_configs(plan):
        print(f"wrote {path.relative_to(plan.settings.repository.parent)}")
    record.write(plan.settings.repository, metadata)


def build(settings: BuildSettings) -> dict:
    """Run the whole pipeline for ``settings``; return the build record written."""
    try:
        backend, why = choose(settings.backend)
    except BackendError as exc:
        raise BuildError(str(exc)) from None
    print(f"backend: {backend.NAME} ({why})")
    plan = Plan.resolve(settings, backend.NAME)
    if plan.preprocess == "torch" and not pytorch.status()[0]:
        raise BuildError(f"PREPROCESS=torch but {pytorch.status()[1]}; use PREPROCESS=numpy")
    _describe(plan)
    source = settings_source(settings)
    print(f"network: {source.network} ({source.origin}; input {source.convention})")
    metadata = record.fingerprint(plan, source, backend.builder())
    stored = record.read(settings.repository) or {}
    state = record.stored_state(plan, metadata, stored, bool(stored) and backend.reusable(plan, stored))
    if state == "same":
        print(f"up to date: {settings.repository / DETECTOR} already holds this build")
        return stored
    if state == "configs":
        changed = [key for key in record.CONFIG_ONLY if stored.get(key) != metadata.get(key)]
        kept = {key: stored[key] for key in ("artifact_sha256", record.COMPILED) if key in stored}
        _write(plan, {**metadata, **kept})
        print(f"configs rewritten ({', '.join(changed) or 'missing config files'}); "
              f"the detector artifact in {settings.repository / DETECTOR} is this build's and stays")
        return {**metadata, **kept}

    print(f"source: {source.origin} (sha256 {source.sha256[:12]})")
    model, summary = rewrite(source.load(), settings.input_width, settings.input_height, settings.topk,
                             source.convention)
    print(summary)
    rewritten = model.SerializeToString()
    problems = check_tensorrt_readiness(model)
    print("tensorrt readiness: " + ("ready" if not problems else "; ".join(problems)))
    if problems and backend.NAME == "tensorrt":
        raise BuildError("the rewritten graph would not parse in TensorRT: " + "; ".join(problems))
    if not compare_with_reference(rewritten, ReferencePipeline(source, settings.input_width, settings.input_height),
                                  settings.topk):
        raise BuildError("validation failed: the rewritten graph does not reproduce the original "
                         "graph + reference decode within tolerance (see the comparison above)")
    print("validation: rewritten graph == original graph + reference decode + top-K (Polygraphy)")

    artifact = settings.repository / DETECTOR / "1" / artifact_name(backend.NAME)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    try:
        built = backend.build(plan, rewritten, artifact)
        disagreements = backend.check(plan, rewritten, artifact,
                                      validation_feeds(settings.input_width, settings.input_height), built)
    except BackendError as exc:
        raise BuildError(str(exc)) from None
    if disagreements:
        artifact.unlink()
        raise BuildError(f"the {backend.NAME} detector disagrees with onnxruntime: " + "; ".join(disagreements))
    metadata = {**metadata, **built, "artifact_sha256": record.file_sha256(artifact)}
    _write(plan, metadata)
    print(f"detector: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    return metadata


def build_scratch(directory: Path, **changes) -> BuildSettings:
    """Build the default engine plus ``changes`` (e.g. ``topk=3840``) into a scratch repository
    at ``directory`` (model code copied in), reusing it while its inputs do not change."""
    settings = dataclasses.replace(BuildSettings.from_env(), repository=directory, **changes)
    copy_model_code(directory)
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
