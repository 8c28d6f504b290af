"""BACKEND=onnxruntime: the rewritten graph itself (``model.onnx``), run by onnxruntime on the CPU.

The verbs every backend has: :func:`status` (always available: onnxruntime is installed with the
server), :func:`build` (the rewritten graph's bytes are the artifact) and :func:`check` (nothing
more to compare: the build's validation already ran the rewritten graph on onnxruntime against
the original graph and the reference decode).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tools.engine.plan import Plan

__all__ = ["NAME", "status", "builder", "build", "check", "reusable"]

NAME = "onnxruntime"


def status() -> tuple[bool, str]:
    """Always available: onnxruntime on this machine's CPU cores."""
    return True, f"onnxruntime {importlib.metadata.version('onnxruntime')} on the CPU"


def builder() -> dict:
    """Nothing beyond the record's tool versions."""
    return {}


def build(plan: Plan, rewritten: bytes, artifact: Path) -> dict:
    """Write the rewritten graph to ``artifact`` (``model.onnx``)."""
    artifact.write_bytes(rewritten)
    return {}


def check(plan: Plan, rewritten: bytes, artifact: Path, feeds: list, built: dict) -> list[str]:
    """Nothing to compare: the artifact is the graph the build's validation ran."""
    return []


def reusable(plan: Plan, stored: dict) -> bool:
    """A stored ``model.onnx`` serves anywhere."""
    return True
