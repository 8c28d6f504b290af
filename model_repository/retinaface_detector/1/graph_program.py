"""The rewritten RetinaFace graph as a PyTorch module: the detector of BACKEND=torch.

``model.pt`` beside this file holds a *graph program*, written by ``make engine BACKEND=torch``
from the rewritten ONNX graph (the one source of truth, node for node): its inputs and outputs,
its nodes in topological order (ONNX op type, input and output names, attributes, and whether
the node runs in float16), and its constant tensors. :class:`GraphProgram` runs it with PyTorch
ops. Everything that is not a pixel-dependent tensor (shapes, slice bounds, top-K, resize
scales) is read once at load time, so ``forward`` launches GPU work only: it can be captured into
a CUDA graph and compiled.

Precision: nodes marked ``half`` (the network, convolution to the three heads) run in float16;
the rest (uint8 -> float preprocessing, softmax, prior decode, top-K) in float32. A tensor
crossing that boundary is cast where it is used.

Only torch is imported, so this file runs inside Triton's Python backend with no project code,
and the build imports it by path to validate the artifact it writes.
"""

import math

import torch
import torch.nn.functional as F

FORMAT = "rtface-graph-program/1"
# A TopK over at most this many rows (batch x top-K chunks) runs as one stable sort: torch.topk
# gives each row one thread block and is the slower below it (docs/benchmarks.md, History); both
# break ties by the lower index, as ONNX TopK does.
SORTED_TOPK_ROWS = 12
ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64}


def _depthwise_as_taps(pads, strides):
    """A depthwise convolution (one filter per channel) as the sum of its kernel's shifted taps.
    ``pads`` as for ``F.pad``; ``strides`` (height, width)."""
    stride_h, stride_w = strides

    def depthwise(x, weight, bias=None):
        x = F.pad(x, pads)
        kernel_h, kernel_w = weight.shape[2:]
        out_h = (x.shape[2] - kernel_h) // stride_h + 1
        out_w = (x.shape[3] - kernel_w) // stride_w + 1
        total = None
        for i in range(kernel_h):
            for j in range(kernel_w):
                window = x[:, :, i:i + (out_h - 1) * stride_h + 1:stride_h, j:j + (out_w - 1) * stride_w + 1:stride_w]
                tap = window * weight[:, :, i, j].reshape(1, -1, 1, 1)
                total = tap if total is None else total + tap
        return total if bias is None else total + bias.reshape(1, -1, 1, 1)
    return depthwise


class ProgramError(ValueError):
    """The graph program uses an op or attribute this runner does not implement."""


def _static(tensors, name):
    """A constant input as a Python list (shapes, bounds, scales), read once at load time."""
    if name not in tensors:
        raise ProgramError(f"input {name!r} must be a constant (rebuild the engine: no Shape op may remain)")
    return tensors[name].flatten().tolist()


def _conv_padding(pads):
    """ONNX ``pads`` (begin..., end...) as a symmetric conv padding, or None if asymmetric."""
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    return tuple(begin) if begin == end else None


# ops with no attributes: one torch function of the node's inputs
PLAIN_OPS = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Exp": torch.exp, "Add": torch.add, "Sub": torch.sub,
             "Mul": torch.mul, "Div": torch.div, "Identity": lambda x: x}


class GraphProgram(torch.nn.Module):
    """Runs a graph program: ``forward(images)`` -> the program's outputs, as a tuple.

    ``program``: the dict stored in ``model.pt`` (see the module docstring). ``device``: where the
    constants live. ``half``: honour the nodes' float16 marks (False runs everything in float32).
    ``channels_last``: store convolution weights NHWC, the layout the uint8 NHWC input already
    has after its transpose, so cuDNN runs NHWC kernels with no per-call weight copies.
    ``depthwise_taps``: write depthwise convolutions as a sum of their kernel's shifted taps, which
    ``torch.compile`` fuses with the bias and activation into one memory-bound kernel (cuDNN's
    grouped kernels are the slowest layers at high resolution); eager mode would run each tap."""

    def __init__(self, program, device="cuda", half=True, channels_last=True, depthwise_taps=False):
        super().__init__()
        if program.get("format") != FORMAT:
            raise ProgramError(f"not a graph program of format {FORMAT}: rebuild with make engine BACKEND=torch")
        self.input_names = list(program["inputs"])
        self.output_names = list(program["outputs"])
        raw = program["tensors"]
        conv_weights = {node["inputs"][1] for node in program["nodes"] if node["op"] == "Conv"}
        consumers = {}
        for node in program["nodes"]:
            for name in node["inputs"]:
                consumers.setdefault(name, []).append(half and node["half"])
        self._constants = {}
        self._depthwise_taps = depthwise_taps
        for index, (name, tensor) in enumerate(raw.items()):
            if tensor.is_floating_point() and all(consumers.get(name, [False])):
                tensor = tensor.half()
            if channels_last and tensor.dim() == 4 and name in conv_weights:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            self.register_buffer(f"c{index}", tensor.to(device), persistent=False)
            self._constants[name] = f"c{index}"
        self._steps = [self._prepare(node, raw, half and node["half"]) for node in program["nodes"]]

    def _prepare(self, node, raw, half):
        """One node as ``(function, tensor input names, output names, half)``, its static
        arguments bound now."""
        op, attrs, inputs = node["op"], node["attrs"], node["inputs"]
        if op in PLAIN_OPS:
            return PLAIN_OPS[op], list(inputs), list(node["outputs"]), half
        make = getattr(self, f"_op_{op}", None)
        if make is None:
            raise ProgramError(f"op {op} (node {node['outputs'][0]!r}) is not supported by the torch detector; "
                               "use BACKEND=onnxruntime or tensorrt for this model")
        function, tensor_inputs = make(attrs, inputs, raw, half)
        return function, tensor_inputs, list(node["outputs"]), half

    def forward(self, *inputs):
        values = dict(zip(self.input_names, inputs))
        for function, names, outputs, half in self._steps:
            args = []
            for name in names:
                value = values[name] if name in values else getattr(self, self._constants[name])
                if value.is_floating_point():
                    value = value.half() if half else value.float()
                args.append(value)
            result = function(*args)
            if len(outputs) == 1:
                values[outputs[0]] = result
            else:
                values.update(zip(outputs, result))
        return tuple(values[name] for name in self.output_names)

    # Each _op_X(attrs, inputs, raw constants, half) -> (function of the tensor inputs, their names);
    # the ops without attributes are in PLAIN_OPS.

    def _op_Conv(self, attrs, inputs, raw, half):
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ProgramError(f"Conv auto_pad={attrs['auto_pad']} is not supported")
        pads = attrs.get("pads", [0, 0, 0, 0])
        padding = _conv_padding(pads)
        begin, end = pads[:len(pads) // 2], pads[len(pads) // 2:]
        explicit = [p for b, e in zip(begin[::-1], end[::-1]) for p in (b, e)]  # F.pad: last axis first
        stride, dilation, groups = attrs.get("strides", 1), attrs.get("dilations", 1), attrs.get("group", 1)
        weight_shape = tuple(raw[inputs[1]].shape) if inputs[1] in raw else None
        if (self._depthwise_taps and weight_shape and groups > 1 and weight_shape[0] == groups
                and weight_shape[1] == 1 and dilation in (1, [1, 1])):
            return _depthwise_as_taps(explicit, stride if isinstance(stride, list) else [stride] * 2), inputs

        def conv(x, weight, bias=None):
            if padding is None:
                x = F.pad(x, explicit)
            return F.conv2d(x, weight, bias, stride, padding or 0, dilation, groups)
        return conv, inputs

    def _op_BatchNormalization(self, attrs, inputs, raw, half):
        epsilon = attrs.get("epsilon", 1e-5)
        return (lambda x, scale, bias, mean, var:
                F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)), inputs

    def _op_MaxPool(self, attrs, inputs, raw, half):
        pads = attrs.get("pads", [0, 0, 0, 0])
        padding = _conv_padding(pads)
        if padding is None:
            raise ProgramError("MaxPool with asymmetric pads is not supported")
        kernel, stride = attrs["kernel_shape"], attrs.get("strides", 1)
        ceil = bool(attrs.get("ceil_mode", 0))
        return (lambda x: F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil)), inputs

    def _op_Clip(self, attrs, inputs, raw, half):
        low, high = attrs.get("min"), attrs.get("max")  # attributes before opset 11, inputs since
        if len(inputs) > 1 and inputs[1]:
            low = _static(raw, inputs[1])[0]
        if len(inputs) > 2 and inputs[2]:
            high = _static(raw, inputs[2])[0]
        return (lambda x: torch.clamp(x, low, high)), inputs[:1]

    def _op_LeakyRelu(self, attrs, inputs, raw, half):
        slope = attrs.get("alpha", 0.01)
        return (lambda x: F.leaky_relu(x, slope)), inputs

    def _op_Cast(self, attrs, inputs, raw, half):
        dtype = ONNX_DTYPES[attrs["to"]]
        if half and dtype.is_floating_point:
            dtype = torch.float16
        return (lambda x: x.to(dtype)), inputs

    def _op_Transpose(self, attrs, inputs, raw, half):
        perm = attrs["perm"]
        return (lambda x: x.permute(perm)), inputs

    def _op_Concat(self, attrs, inputs, raw, half):
        axis = attrs["axis"]
        return (lambda *xs: torch.cat(xs, axis)), inputs

    def _op_Reshape(self, attrs, inputs, raw, half):
        shape = [int(d) for d in _static(raw, inputs[1])]
        if attrs.get("allowzero", 0):
            raise ProgramError("Reshape allowzero=1 is not supported")
        return (lambda x: x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])), inputs[:1]

    def _op_Flatten(self, attrs, inputs, raw, half):
        axis = attrs.get("axis", 1)
        return (lambda x: x.reshape(math.prod(x.shape[:axis]), -1)), inputs

    def _axes(self, attrs, inputs, raw):
        return attrs["axes"] if "axes" in attrs else [int(a) for a in _static(raw, inputs[1])]

    def _op_Unsqueeze(self, attrs, inputs, raw, half):
        axes = self._axes(attrs, inputs, raw)

        def unsqueeze(x):
            rank = x.dim() + len(axes)
            for axis in sorted(a % rank for a in axes):
                x = x.unsqueeze(axis)
            return x
        return unsqueeze, inputs[:1]

    def _op_Squeeze(self, attrs, inputs, raw, half):
        axes = self._axes(attrs, inputs, raw)
        return (lambda x: x.squeeze(tuple(axes))), inputs[:1]

    def _op_Softmax(self, attrs, inputs, raw, half):
        axis = attrs.get("axis", -1)
        return (lambda x: torch.softmax(x, axis)), inputs

    def _op_Slice(self, attrs, inputs, raw, half):
        starts, ends = (_static(raw, name) for name in inputs[1:3])
        axes = _static(raw, inputs[3]) if len(inputs) > 3 and inputs[3] else list(range(len(starts)))
        steps = _static(raw, inputs[4]) if len(inputs) > 4 and inputs[4] else [1] * len(starts)

        def slice_(x):
            index = [slice(None)] * x.dim()
            for start, end, axis, step in zip(starts, ends, axes, steps):
                index[axis] = slice(int(start), min(int(end), x.shape[axis]), int(step))
            return x[tuple(index)]
        return slice_, inputs[:1]

    def _op_Resize(self, attrs, inputs, raw, half):
        mode = attrs.get("mode", "nearest")
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        sizes = _static(raw, inputs[3]) if len(inputs) > 3 and inputs[3] else None
        scales = _static(raw, inputs[2]) if not sizes else None
        if mode == "nearest" and transform == "asymmetric" and attrs.get("nearest_mode", "round_prefer_floor") == "floor":
            kind, align = "nearest", None
        elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            kind, align = "bilinear", transform == "align_corners"
        else:
            raise ProgramError(f"Resize mode={mode} coordinate_transformation_mode={transform} is not supported")
        if sizes:
            return (lambda x: F.interpolate(x, size=[int(s) for s in sizes[2:]], mode=kind, align_corners=align)), inputs[:1]
        return (lambda x: F.interpolate(x, scale_factor=[float(s) for s in scales[2:]], mode=kind,
                                        align_corners=align)), inputs[:1]

    def _op_TopK(self, attrs, inputs, raw, half):
        k = int(_static(raw, inputs[1])[0])
        axis, largest = attrs.get("axis", -1), bool(attrs.get("largest", 1))

        def topk(x):
            if x.numel() // x.shape[axis] <= SORTED_TOPK_ROWS:
                values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
                return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)
            return tuple(torch.topk(x, k, axis, largest, sorted=True))
        return topk, inputs[:1]

    def _op_Expand(self, attrs, inputs, raw, half):
        shape = [int(d) for d in _static(raw, inputs[1])]
        return (lambda x: x.expand(torch.broadcast_shapes(x.shape, shape))), inputs[:1]

    def _op_GatherElements(self, attrs, inputs, raw, half):
        axis = attrs.get("axis", 0)
        return (lambda x, index: torch.gather(x, axis, index)), inputs

    def _op_Gather(self, attrs, inputs, raw, half):
        axis = attrs.get("axis", 0)
        return (lambda x, index: torch.index_select(x, axis, index.flatten()).reshape(
            x.shape[:axis] + index.shape + x.shape[axis + 1:])), inputs
