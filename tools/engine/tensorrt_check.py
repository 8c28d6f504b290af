"""Offline TensorRT readiness check: would TensorRT 10's ONNX parser accept this graph?

TensorRT itself is not needed. The op table lists what the parser supports (from its public
operator-support matrix) for the ops a convolutional detector uses, with the restrictions that
bite in practice: TopK's ``K`` constant, at most 3840 and sorted; uint8 only at network inputs
and outputs (so only a ``Cast`` may touch it); Resize modes; constant ``axes``; constant conv
weights; the opset range. An op outside the table is reported, not guessed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tools.settings import TOPK_MAX_K

__all__ = ["check_tensorrt_readiness", "TensorRTReadinessError", "OPSET_RANGE", "TOPK_MAX_K"]

OPSET_RANGE = (9, 20)  # what the ONNX parser of TensorRT 10.1 takes
RESIZE_MODES = {"nearest", "linear", "cubic"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                      "align_corners"}  # half_pixel_symmetric (opset 19) is rejected by TensorRT 10.1's parser
NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
CAST_TARGETS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}


class TensorRTReadinessError(ValueError):
    """The graph uses something TensorRT's ONNX parser rejects; the message lists every finding."""


def _is_const(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _topk(node: gs.Node) -> list[str]:
    problems = []
    if not _is_const(node.inputs[1]):
        problems.append("K must be a constant (an initializer)")
    elif int(node.inputs[1].values.reshape(-1)[0]) > TOPK_MAX_K:
        problems.append(f"K={int(node.inputs[1].values.reshape(-1)[0])} exceeds TensorRT's limit "
                        f"of {TOPK_MAX_K}")
    if node.attrs.get("sorted", 1) != 1:
        problems.append("sorted=0 is not supported; TensorRT always sorts")
    return problems


def _resize(node: gs.Node) -> list[str]:
    problems = []
    mode = node.attrs.get("mode", "nearest")
    coords = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest = node.attrs.get("nearest_mode", "round_prefer_floor")
    if mode not in RESIZE_MODES:
        problems.append(f"mode={mode!r} unsupported (use {sorted(RESIZE_MODES)})")
    if coords not in RESIZE_COORDINATES:
        problems.append(f"coordinate_transformation_mode={coords!r} unsupported")
    if mode == "nearest" and nearest not in NEAREST_MODES:
        problems.append(f"nearest_mode={nearest!r} unsupported")
    return problems


def _constant_input(index: int, what: str) -> Callable[[gs.Node], list[str]]:
    def check(node: gs.Node) -> list[str]:
        if len(node.inputs) > index and node.inputs[index].name and not _is_const(node.inputs[index]):
            return [f"{what} must be a constant (an initializer)"]
        return []
    return check


def _cast(node: gs.Node) -> list[str]:
    return [] if node.attrs.get("to") in CAST_TARGETS else [f"cast to type {node.attrs.get('to')} unsupported"]


def _none(node: gs.Node) -> list[str]:
    return []


SUPPORTED: dict[str, Callable[[gs.Node], list[str]]] = {
    "TopK": _topk, "Resize": _resize, "Cast": _cast,
    "Conv": _constant_input(1, "weights W"), "ConvTranspose": _constant_input(1, "weights W"),
    "Slice": _constant_input(3, "axes"), "Squeeze": _constant_input(1, "axes"),
    "Unsqueeze": _constant_input(1, "axes"),
    **{op: _none for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Ceil", "Clip",
        "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Div", "Dropout", "Elu", "Equal",
        "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
        "GlobalAveragePool", "GlobalMaxPool", "Greater", "HardSigmoid", "HardSwish", "Identity",
        "InstanceNormalization", "LeakyRelu", "Less", "Log", "LogSoftmax", "MatMul", "Max",
        "MaxPool", "Min", "Mish", "Mul", "Neg", "Not", "Pad", "Pow", "PRelu", "Reciprocal",
        "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Round", "Selu",
        "Shape", "Sigmoid", "Sign", "Softmax", "Softplus", "Split", "Sqrt", "Sub", "Sum", "Tanh",
        "Tile", "Transpose", "Upsample", "Where")},
}


def _is_uint8(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.uint8
    except TypeError:  # an ONNX-only type numpy does not know (e.g. float8)
        return False


def _uint8_misuse(graph: gs.Graph) -> list[str]:
    """uint8 may only enter or leave the network, and only a Cast may consume or produce it."""
    problems = []
    for node in graph.nodes:
        if node.op == "Cast":
            continue
        for tensor in list(node.inputs) + list(node.outputs):
            if _is_uint8(tensor):
                problems.append(f"{node.op} {node.name!r}: uint8 tensor {tensor.name!r} — TensorRT "
                                "takes uint8 only at network I/O; Cast it to float first")
                break
    return problems


def check_tensorrt_readiness(model: onnx.ModelProto) -> list[str]:
    """Return every reason TensorRT 10's ONNX parser would reject ``model`` (empty when ready)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        check = SUPPORTED.get(node.op)
        if check is None:
            problems.append(f"{node.op} {node.name!r}: not in TensorRT's supported-op table")
            continue
        problems += [f"{node.op} {node.name!r}: {p}" for p in check(node)]
    problems += _uint8_misuse(graph)
    return problems
