"""Channel removal surgery: write a model where each channel group keeps only some of its channels.

The producers lose output channels, everything the channels flow through (BN, bias,
activations, gates, residual Adds, Resize, channel Concat) is sliced the same way, and the
readers get the re-fitted weights :mod:`.channel_plan` computed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxopt.passes.prune.channel_groups import ChannelGroup

from onnxopt.graph import (
    GraphIndex,
    NameGenerator,
    node_attribute,
    remove_unused,
    set_initializer,
)

__all__ = ["remove_channels"]


def _constant_axis(value: np.ndarray, group: ChannelGroup) -> int | None:
    at = value.ndim + group.axis
    return at if at >= 0 and value.shape[at] == group.channels and group.channels > 1 else None


def remove_channels(
    model: onnx.ModelProto,
    groups: list[ChannelGroup],
    kept: list[np.ndarray | None],
    consumer_weights: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> onnx.ModelProto:
    """Return a copy of ``model`` where each group keeps only channels ``kept[i]`` (None = all).

    ``consumer_weights`` maps a consumer's output name to its new (weight, bias) in ONNX
    layout; consumers not in it have their weights sliced.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    index = GraphIndex(graph)
    names = NameGenerator(result)
    by_output = {n.output[0]: n for n in graph.node if n.output}
    changed_tensors: set[str] = set()

    written: dict[str, np.ndarray] = {}

    def value_of(name: str) -> np.ndarray | None:
        return written[name] if name in written else index.constant(name) if name else None

    def write(node: onnx.NodeProto, position: int, value: np.ndarray) -> None:
        old = node.input[position] if position < len(node.input) else ""
        name = names.fresh(old or f"{node.output[0]}_bias")
        written[name] = value.astype(np.float32)
        set_initializer(graph, name, written[name])
        if position < len(node.input):
            node.input[position] = name
        else:
            while len(node.input) < position:
                node.input.append("")
            node.input.append(name)

    active = [(g, k) for g, k in zip(groups, kept, strict=True) if k is not None]
    # consumers first: a layer that reads one group and makes another gets its re-fit
    # weight (all output rows) before its output rows are sliced
    for group, _ in active:
        for old in group.consumers:
            node = by_output[old.output[0]]
            weight_value, bias_value = consumer_weights[node.output[0]]
            write(node, 1, weight_value)
            if bias_value is not None:
                write(node, 2, bias_value)
    for group, keep in active:
        changed_tensors.update(group.tensors)
        for old in group.sources:
            node = by_output[old.output[0]]
            weight = value_of(node.input[1])
            assert weight is not None
            axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(node.op_type)
            if axis is None:
                axis = 0 if node_attribute(node, "transB", 0) else 1
            write(node, 1, np.take(weight, keep, axis=axis))
            bias = value_of(node.input[2]) if len(node.input) > 2 else None
            if bias is not None and bias.ndim >= 1 and bias.shape[-1] == group.channels:
                write(node, 2, np.take(bias, keep, axis=-1))
        for old in group.through:
            node = by_output[old.output[0]]
            if node.op_type == "Conv":  # depthwise
                for position in range(1, len(node.input)):
                    value = value_of(node.input[position])
                    if value is not None:
                        write(node, position, np.take(value, keep, axis=0))
                for attr in node.attribute:
                    if attr.name == "group":
                        attr.i = len(keep)
                continue
            for position, name in enumerate(node.input):
                if not name or name in group.tensors or not index.is_constant(name):
                    continue
                value = value_of(name)
                at = 0 if node.op_type == "BatchNormalization" else _constant_axis(value, group)  # type: ignore[arg-type]
                if value is not None and value.ndim and at is not None:
                    write(node, position, np.take(value, keep, axis=at))
    stale = [v for v in graph.value_info if v.name in changed_tensors]
    for info in stale:
        graph.value_info.remove(info)
    remove_unused(graph)
    return result
