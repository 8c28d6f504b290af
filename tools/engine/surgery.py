"""Graph surgery: turn a RetinaFace export into the served detector graph.

``images`` uint8 ``[N, H, W, 3]`` BGR  ->  ``candidates`` float32 ``[N, TOPK, 15]``
(x1, y1, x2, y2, score, five landmark points; network pixels; sorted by score).

One function per rewrite, applied in this order by :func:`rewrite`:

1. :func:`add_preprocessing` — uint8 NHWC BGR input, Cast -> Transpose, then what the source's
   input convention asks (channel order, mean, std) in-graph.
2. :func:`make_shapes_static` — fixed spatial size, dynamic batch, no ``Shape`` op left; then
   :func:`plain_ops`: padding folded into the convolutions it feeds, half-pixel nearest resizes
   by whole factors as plain ones (the same pixels), so every backend takes the graph.
3. :func:`add_decode` — anchor priors as constants; boxes to corners, five landmarks.
4. :func:`add_topk` — top-K faces by score, their boxes and landmarks gathered. Past TensorRT's
   largest K (3,840) the anchors are dealt round-robin into ``C`` chunks (anchor ``a`` goes to
   chunk ``a mod C``) and one TopK takes the best ``K / C`` of each: a face's neighbouring anchors
   land in different chunks, so a crowd anywhere in the frame fills them evenly. Candidates then
   come chunk by chunk, each chunk sorted by score (``tools.settings.topk_plan``).

Each leaves a valid graph (``onnx.checker`` with full shape inference).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime

onnxruntime.set_default_logger_severity(3)  # folding runs ORT; its optimizer chatter is noise here

from tools.engine.conventions import BGR_MEAN, InputConvention
from tools.engine.priors import VARIANCES, make_priors
from tools.settings import topk_plan

__all__ = ["SurgeryError", "SurgerySummary", "rewrite", "add_preprocessing", "make_shapes_static", "plain_ops",
           "add_decode", "add_topk", "INPUT_NAME", "OUTPUT_NAME", "CANDIDATE_WIDTH"]

INPUT_NAME = "images"
OUTPUT_NAME = "candidates"
CANDIDATE_WIDTH = 15
BATCH = "batch"
MAX_FOLD_PASSES = 10


class SurgeryError(RuntimeError):
    """The export has a structure the rewrites cannot handle; the message names the node."""


@dataclass
class SurgerySummary:
    """Op counts before and after the rewrites, for the build log."""

    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    steps: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"surgery: {sum(self.ops_before.values())} nodes -> "
                 f"{sum(self.ops_after.values())} nodes"]
        lines += [f"  {step}" for step in self.steps]
        for title, ops in (("before", self.ops_before), ("after", self.ops_after)):
            lines.append(f"  ops {title}: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())))
        return "\n".join(lines)


def _const(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(value))


def _op_counts(graph: gs.Graph) -> Counter:
    return Counter(node.op for node in graph.nodes)


def _checked(graph: gs.Graph) -> gs.Graph:
    """Clean up, sort, and prove the graph valid with ONNX's checker and full shape inference."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    return graph


def _infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Forget every intermediate shape (exports carry stale symbolic ones) and infer them anew."""
    ends = {id(t) for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in ends:
            tensor.shape, tensor.dtype = None, None
    for output in graph.outputs:
        output.shape = None
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True)
    return gs.import_onnx(model)


def _fold(graph: gs.Graph) -> gs.Graph:
    """Infer shapes and fold constants until the node count stops changing."""
    for _ in range(MAX_FOLD_PASSES):
        count = len(graph.nodes)
        graph = _infer_shapes(graph)
        graph.fold_constants(fold_shapes=True).cleanup().toposort()
        if len(graph.nodes) == count:
            return graph
    return graph


def add_preprocessing(graph: gs.Graph, width: int, height: int, convention: InputConvention = BGR_MEAN) -> gs.Graph:
    """Replace the float NCHW input by uint8 ``images [N, H, W, 3]`` (BGR) and do in-graph
    Cast -> Transpose(NCHW), then what ``convention`` asks: the channels reversed (RGB networks),
    Sub(mean), Div(std). Cast comes first because TensorRT accepts uint8 only at network inputs
    and outputs; the per-channel steps follow the Transpose so their ``[1, 3, 1, 1]`` constants
    broadcast over contiguous planes."""
    old = graph.inputs[0]
    images = gs.Variable(INPUT_NAME, dtype=np.uint8, shape=[BATCH, height, width, 3])
    as_float = gs.Variable("images_float", dtype=np.float32)
    steps = [("Cast", {"to": onnx.TensorProto.FLOAT}, []), ("Transpose", {"perm": [0, 3, 1, 2]}, [])]
    if convention.order == "rgb":
        steps.append(("Gather", {"axis": 1}, [_const("bgr_to_rgb", np.array([2, 1, 0], np.int64))]))
    if convention.mean != (0.0, 0.0, 0.0):
        steps.append(("Sub", {}, [_const("input_mean", np.array(convention.mean, np.float32).reshape(1, 3, 1, 1))]))
    if convention.std != (1.0, 1.0, 1.0):
        steps.append(("Div", {}, [_const("input_std", np.array(convention.std, np.float32).reshape(1, 3, 1, 1))]))
    tensor = images
    for index, (op, attrs, constants) in enumerate(steps):
        last, first = index == len(steps) - 1, index == 0
        out = old if last else as_float if first else gs.Variable(f"images_{index}", dtype=np.float32)
        graph.nodes.append(gs.Node(op, f"images_{op.lower()}", attrs=attrs, inputs=[tensor, *constants], outputs=[out]))
        tensor = out
    old.shape = [BATCH, 3, height, width]
    graph.inputs = [images]
    return _checked(graph)


def _unique_node_names(graph: gs.Graph) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{index}"
        seen.add(node.name)


def _shapes_at_batch(graph: gs.Graph, batch: int) -> dict[str, list[int]]:
    """Tensor shapes when the batch is fixed, keyed by tensor name (shape chains folded away)."""
    fixed = graph.copy()
    fixed.inputs[0].shape = [batch, *fixed.inputs[0].shape[1:]]
    fixed = _fold(fixed)
    return {name: list(t.shape) for name, t in fixed.tensors().items()
            if t.shape is not None and all(isinstance(d, int) for d in t.shape)}


def _static_reshape(node: gs.Node, one: dict, two: dict) -> np.ndarray:
    data, out = node.inputs[0].name, node.outputs[0].name
    if data not in one or out not in one:
        raise SurgeryError(f"Reshape {node.name}: shape unknown even with a fixed batch")
    in1, in2, out1, out2 = one[data], two[data], one[out], two[out]
    batch_leading = in1[0] == 1 and in2[0] == 2 and out1[0] == 1 and out2[0] == 2
    if not batch_leading or in1[1:] != in2[1:] or out1[1:] != out2[1:]:
        raise SurgeryError(
            f"Reshape {node.name}: {in1}->{out1} does not keep the batch as its leading dimension; "
            "only batch-preserving reshapes can be made static")
    return np.array([0, *out1[1:]], dtype=np.int64)


def _static_resize_scales(node: gs.Node, one: dict) -> np.ndarray:
    data, out = node.inputs[0].name, node.outputs[0].name
    if data not in one or out not in one:
        raise SurgeryError(f"Resize {node.name}: shape unknown even with a fixed batch")
    return np.array([o / i for i, o in zip(one[data], one[out])], dtype=np.float32)


def make_shapes_static(graph: gs.Graph) -> gs.Graph:
    """Fold the graph for the fixed input size while keeping the batch dynamic.

    Folding alone leaves the exporter's ``Shape -> Gather -> Unsqueeze -> Concat`` chains that
    feed ``Reshape`` and ``Resize`` (they read the batch). Those are rewritten from the shapes
    seen at batch 1 and 2: Reshape targets become constants with 0 (copy the batch), Resize
    targets become constant scales. Afterwards no ``Shape`` op may remain.
    """
    _unique_node_names(graph)
    graph = _fold(graph)
    one, two = _shapes_at_batch(graph, 1), _shapes_at_batch(graph, 2)
    for node in graph.nodes:
        if node.op == "Reshape" and not isinstance(node.inputs[1], gs.Constant):
            node.inputs[1] = _const(f"{node.name}_shape", _static_reshape(node, one, two))
        elif node.op == "Resize" and not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
            roi = _const(f"{node.name}_roi", np.zeros(0, dtype=np.float32))
            scales = _const(f"{node.name}_scales", _static_resize_scales(node, one))
            while len(node.inputs) > 1:
                node.inputs.pop()
            node.inputs += [roi, scales]
    graph = _fold(graph)
    leftover = [node.name for node in graph.nodes if node.op == "Shape"]
    if leftover:
        raise SurgeryError(f"Shape ops remain after folding: {leftover}")
    return _checked(graph)


def _explicit_conv_pads(graph: gs.Graph) -> int:
    """Convolutions with ``auto_pad`` SAME (TensorFlow's SAME padding) with the explicit ``pads``
    it stands for at this graph's static size; the count rewritten."""
    rewritten = 0
    same = [n for n in graph.nodes if n.op == "Conv" and n.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")]
    for conv in same:
        size = conv.inputs[0].shape[2:] if conv.inputs[0].shape else None
        if not size or not all(isinstance(d, int) for d in size):
            raise SurgeryError(f"Conv {conv.name}: auto_pad={conv.attrs['auto_pad']} needs its input's size")
        kernel = conv.attrs.get("kernel_shape") or list(conv.inputs[1].shape[2:])
        strides = conv.attrs.get("strides", [1] * len(size))
        dilations = conv.attrs.get("dilations", [1] * len(size))
        begin, end = [], []
        for length, k, stride, dilation in zip(size, kernel, strides, dilations):
            total = max((-(-length // stride) - 1) * stride + (k - 1) * dilation + 1 - length, 0)
            small = total // 2
            begin.append(small if conv.attrs["auto_pad"] == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        conv.attrs["pads"], conv.attrs["auto_pad"] = begin + end, "NOTSET"
        rewritten += 1
    return rewritten


def _pads_into_convolutions(graph: gs.Graph) -> int:
    """Fold each zero-padding ``Pad`` of height and width alone (TensorFlow's SAME padding before
    a strided convolution: bottom and right only) into the one ``Conv`` it feeds; the count folded."""
    folded = 0
    for pad in [n for n in graph.nodes if n.op == "Pad"]:
        consumers = pad.outputs[0].outputs
        pads, value = pad.inputs[1], pad.inputs[2] if len(pad.inputs) > 2 else None
        if (len(consumers) != 1 or consumers[0].op != "Conv" or pad.attrs.get("mode", "constant") != "constant"
                or not isinstance(pads, gs.Constant) or (value is not None and not (
                    isinstance(value, gs.Constant) and not np.any(value.values)))):
            continue
        begin, end = np.split(pads.values.astype(np.int64), 2)
        if len(begin) != 4 or begin[:2].any() or end[:2].any():
            continue
        conv = consumers[0]
        own = np.array(conv.attrs.get("pads", [0, 0, 0, 0]), dtype=np.int64)
        conv.attrs["pads"] = [int(v) for v in own + np.concatenate([begin[2:], end[2:]])]
        conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    return folded


def _plain_nearest_resizes(graph: gs.Graph) -> int:
    """Nearest resizes with ``tf_half_pixel_for_nn`` coordinates and ``floor`` rounding by whole
    factors as ``asymmetric`` ones: for a factor s, floor((i + 0.5) / s) = floor(i / s), the same
    source pixel for every output pixel; the count rewritten."""
    rewritten = 0
    for node in graph.nodes:
        if (node.op != "Resize" or node.attrs.get("mode") != "nearest"
                or node.attrs.get("coordinate_transformation_mode") != "tf_half_pixel_for_nn"
                or node.attrs.get("nearest_mode") != "floor" or len(node.inputs) != 3):
            continue
        scales = node.inputs[2]
        if isinstance(scales, gs.Constant) and np.all(scales.values == np.round(scales.values)):
            node.attrs["coordinate_transformation_mode"] = "asymmetric"
            rewritten += 1
    return rewritten


def plain_ops(graph: gs.Graph) -> tuple[gs.Graph, str]:
    """The rewrites that make a TensorFlow export's ops plain for every backend (see the module
    docstring); the graph and what was rewritten, for the build log."""
    same = _explicit_conv_pads(graph)
    pads, resizes = _pads_into_convolutions(graph), _plain_nearest_resizes(graph)
    return _checked(graph), (f"{same} SAME paddings made explicit, {pads} Pad ops folded into convolutions, "
                             f"{resizes} half-pixel nearest resizes made plain")


def _output(graph: gs.Graph, name: str) -> gs.Variable:
    return next(t for t in graph.outputs if t.name == name)


def _slice_last(graph: gs.Graph, tensor: gs.Variable, start: int, end: int, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node("Slice", f"{name}_slice", inputs=[
        tensor, _const(f"{name}_starts", np.array([start], np.int64)),
        _const(f"{name}_ends", np.array([end], np.int64)),
        _const(f"{name}_axes", np.array([2], np.int64))], outputs=[out]))
    return out


def _binary(graph: gs.Graph, op: str, a, b, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op, name, inputs=[a, b], outputs=[out]))
    return out


def add_decode(graph: gs.Graph, width: int, height: int) -> gs.Graph:
    """Decode ``loc``/``conf``/``landmarks`` against the anchor priors into ``detections``
    ``[N, P, 15]``: corners, face score and five landmark points, in network pixels."""
    priors = make_priors(width, height)
    centers, sizes = priors[:, :2], priors[:, 2:]
    loc, conf, marks = (_output(graph, n) for n in ("loc", "conf", "landmarks"))

    offset_scale = _const("box_offset_scale", VARIANCES[0] * sizes)
    center = _binary(graph, "Add", _binary(graph, "Mul", _slice_last(graph, loc, 0, 2, "loc_xy"),
                                           offset_scale, "box_offset"),
                     _const("prior_centers", centers), "box_center")
    log_size = _binary(graph, "Mul", _slice_last(graph, loc, 2, 4, "loc_wh"),
                       _const("size_variance", np.array(VARIANCES[1], np.float32)), "box_log_scale")
    scale = gs.Variable("box_scale", dtype=np.float32)
    graph.nodes.append(gs.Node("Exp", "box_exp", inputs=[log_size], outputs=[scale]))
    half = _binary(graph, "Mul", scale, _const("prior_half_sizes", sizes / 2), "box_half_size")
    top_left = _binary(graph, "Sub", center, half, "box_top_left")
    bottom_right = _binary(graph, "Add", center, half, "box_bottom_right")
    score = _slice_last(graph, conf, 1, 2, "face_score")
    points = _binary(graph, "Add", _binary(graph, "Mul", marks,
                                           _const("landmark_scale", np.tile(offset_scale.values, 5)),
                                           "landmark_offset"),
                     _const("landmark_centers", np.tile(centers, 5)), "landmark_points")
    detections = gs.Variable("detections", dtype=np.float32, shape=[BATCH, len(priors), CANDIDATE_WIDTH])
    graph.nodes.append(gs.Node("Concat", "detections_concat", attrs={"axis": 2},
                               inputs=[top_left, bottom_right, score, points], outputs=[detections]))
    graph.outputs = [detections]
    return _checked(graph)


def add_topk(graph: gs.Graph, k: int) -> gs.Graph:
    """Keep the ``k`` highest-scoring detections: output ``candidates [N, k, 15]``, sorted by score
    (past TensorRT's largest K: chunk by chunk, see ``tools.settings.topk_plan``; ``k`` must be a multiple of
    the chunk count)."""
    chunks, per_chunk = topk_plan(k)
    if chunks * per_chunk != k:
        raise SurgeryError(f"TOPK={k} is not {chunks} chunks of {per_chunk}; use {chunks * per_chunk}")
    detections = _output(graph, "detections")
    anchors = detections.shape[1]
    if anchors % chunks or per_chunk > anchors // chunks:
        raise SurgeryError(f"TOPK={k}: {anchors} anchors do not split into {chunks} chunks of at least {per_chunk}")
    score = next(n for n in graph.nodes if n.name == "face_score_slice").outputs[0]
    flat = gs.Variable("face_score_chunks", dtype=np.float32)
    values = gs.Variable("topk_scores", dtype=np.float32)
    indices = gs.Variable("topk_indices", dtype=np.int64)
    column = gs.Variable("topk_indices_column", dtype=np.int64)
    rows = gs.Variable("topk_indices_rows", dtype=np.int64)
    candidates = gs.Variable(OUTPUT_NAME, dtype=np.float32, shape=[BATCH, k, CANDIDATE_WIDTH])
    # scores [N, P, 1] -> [N, P / C, C]: anchor a = row * C + chunk
    graph.nodes.append(gs.Node("Reshape", "face_score_to_chunks",
                               inputs=[score, _const("chunk_shape", np.array([0, -1, chunks], np.int64))],
                               outputs=[flat]))
    graph.nodes.append(gs.Node("TopK", "topk", attrs={"axis": 1, "largest": 1, "sorted": 1},
                               inputs=[flat, _const("topk_k", np.array([per_chunk], np.int64))],
                               outputs=[values, indices]))
    anchor = indices
    if chunks > 1:  # [N, k/C, C] rows within chunks -> [N, C, k/C] anchor indices, chunk by chunk
        by_chunk, scaled = gs.Variable("topk_rows_by_chunk", dtype=np.int64), gs.Variable("topk_rows_scaled", dtype=np.int64)
        anchor = gs.Variable("topk_anchors", dtype=np.int64)
        graph.nodes += [
            gs.Node("Transpose", "topk_chunk_major", attrs={"perm": [0, 2, 1]}, inputs=[indices], outputs=[by_chunk]),
            gs.Node("Mul", "topk_rows_times_chunks", inputs=[by_chunk, _const("chunk_count", np.array(chunks, np.int64))],
                    outputs=[scaled]),
            gs.Node("Add", "topk_anchor_index",
                    inputs=[scaled, _const("chunk_offsets", np.arange(chunks, dtype=np.int64).reshape(1, chunks, 1))],
                    outputs=[anchor]),
        ]
    graph.nodes += [
        gs.Node("Reshape", "topk_indices_to_column",
                inputs=[anchor, _const("column_shape", np.array([0, -1, 1], np.int64))], outputs=[column]),
        gs.Node("Expand", "topk_indices_to_rows",
                inputs=[column, _const("row_shape", np.array([1, 1, CANDIDATE_WIDTH], np.int64))],
                outputs=[rows]),
        gs.Node("GatherElements", "gather_candidates", attrs={"axis": 1},
                inputs=[detections, rows], outputs=[candidates]),
    ]
    graph.outputs = [candidates]
    return _checked(graph)


def rewrite(model: onnx.ModelProto, width: int, height: int, topk: int,
            convention: InputConvention = BGR_MEAN) -> tuple[onnx.ModelProto, SurgerySummary]:
    """Apply all rewrites to ``model`` (whose input takes ``convention``) for a ``width`` x
    ``height`` engine with top-``topk`` output."""
    priors = len(make_priors(width, height))
    if topk > priors:
        raise SurgeryError(f"TOPK={topk} exceeds the {priors} anchors of a {width}x{height} input")
    graph = gs.import_onnx(model)
    summary = SurgerySummary(ops_before=_op_counts(graph))
    graph = add_preprocessing(graph, width, height, convention)
    summary.steps.append(f"input: uint8 [N, {height}, {width}, 3] BGR, Cast -> Transpose, then {convention}")
    graph = make_shapes_static(graph)
    summary.steps.append("shapes: static spatial size, dynamic batch, no Shape op left")
    graph, plain = plain_ops(graph)
    summary.steps.append(f"plain ops: {plain}")
    graph = add_decode(graph, width, height)
    summary.steps.append(f"decode: {priors} priors (steps 8/16/32) -> corners + 5 landmarks")
    graph = add_topk(graph, topk)
    chunks, per_chunk = topk_plan(topk)
    how = f"K={topk}" if chunks == 1 else f"{chunks} interleaved chunks x K={per_chunk}"
    summary.steps.append(f"top-K: {how} -> {OUTPUT_NAME} [N, {topk}, {CANDIDATE_WIDTH}]")
    summary.ops_after = _op_counts(graph)
    out = gs.export_onnx(graph)
    out.producer_name = "rtface"
    return out, summary
