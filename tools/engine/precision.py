"""Which nodes of the rewritten graph are the float16 network: the GPU backends' precision split.

The network (convolution to the three heads) runs in float16; the uint8 preprocessing, softmax,
prior decode and top-K stay float32 (FP16 spacing is 0.5 px at 512-1024 px). The torch detector
marks its program's nodes with :func:`half_nodes`; an FP16 TensorRT plan pins the others to FP32.
"""

from __future__ import annotations

import onnx

__all__ = ["HEAD_OUTPUTS", "FLOAT32_OPS", "half_nodes"]

HEAD_OUTPUTS = ("loc", "conf", "landmarks")  # the network's own outputs; the decode follows them
FLOAT32_OPS = {"Softmax"}  # scores are normalised in float32 even inside the network


def half_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that run in float16: those on a path from a convolution to one of
    the network's outputs (:data:`HEAD_OUTPUTS`), except :data:`FLOAT32_OPS`. Preprocessing
    before the first convolution and the decode after the heads stay float32."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    upstream, stack = set(), [producer[name] for name in HEAD_OUTPUTS if name in producer]
    while stack:
        index = stack.pop()
        if index not in upstream:
            upstream.add(index)
            stack.extend(producer[name] for name in graph.node[index].input if name in producer)
    downstream, frontier = set(), [i for i, node in enumerate(graph.node) if node.op_type == "Conv"]
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    while frontier:
        index = frontier.pop()
        if index not in downstream:
            downstream.add(index)
            frontier.extend(j for name in graph.node[index].output for j in consumers.get(name, []))
    return {i for i in upstream & downstream if graph.node[i].op_type not in FLOAT32_OPS}
