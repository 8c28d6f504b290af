"""The detector backends, one module each, with the same verbs.

Each module has ``NAME``, ``status()`` (can it run here, and why not), ``builder()`` (what it adds
to the build record's fingerprint), ``build(plan, rewritten, artifact)`` (write the artifact; the
record's extra entries), ``check(plan, rewritten, artifact, feeds, built)`` (the artifact against
the reference: the disagreements, empty when it agrees) and ``reusable(plan, stored)`` (whether a
stored build's extras still serve here). :func:`choose` resolves ``BACKEND``.
"""

from __future__ import annotations

from types import ModuleType

from tools.engine.backends import onnxruntime, pytorch, tensorrt
from tools.engine.backends.common import BackendError

__all__ = ["BACKENDS", "BackendError", "choose"]

BACKENDS: dict[str, ModuleType] = {module.NAME: module for module in (tensorrt, pytorch, onnxruntime)}  # auto's order


def choose(requested: str) -> tuple[ModuleType, str]:
    """The backend for ``BACKEND=requested`` and the reason: ``auto`` takes the first of
    :data:`BACKENDS` that can run here (TensorRT, then PyTorch with a GPU, then onnxruntime); a
    named one that cannot raises :class:`BackendError` saying why."""
    if requested != "auto":
        backend = BACKENDS[requested]
        available, why = backend.status()
        if not available:
            raise BackendError(f"BACKEND={requested} but {why}; use BACKEND=onnxruntime on this machine")
        return backend, f"requested ({why})"
    reasons = []
    for backend in BACKENDS.values():
        available, why = backend.status()
        if available:
            return backend, "auto: " + "; ".join([*reasons, why])
        reasons.append(why)
    raise BackendError("no backend can run here: " + "; ".join(reasons))  # onnxruntime always can
