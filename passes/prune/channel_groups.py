"""Channel groups for structured pruning: which tensors must lose the same channels.

A *channel group* starts at the outputs of weight layers (Conv / ConvTranspose output
channels, MatMul / Gemm output features) and follows every tensor whose channels map
one to one onto theirs: through BatchNormalization, element-wise unary ops (Relu, Clip,
HardSigmoid, HardSwish, Sigmoid…), pools, ``Resize`` with constant scales of 1 on the
channel axis (FPN upsampling), depthwise Convs (whose weights lose the
channels too), and binary element-wise ops (Add, Mul, …) with constants or with other
tensors of the same width, which joins their groups (residuals, squeeze-excitation
gates, the ``x·clip(x+3)`` form of HardSwish). It ends at *consumers*: Conv /
ConvTranspose inputs (group 1) and MatMul / Gemm left-hand sides with constant weights,
which lose the matching input channels. A ``Concat`` on the channel axis (of tensors of
known width) does not join its inputs' groups: a consumer reading it directly reads each
group's channels at that group's offset (``ChannelGroup.offsets``), and is re-fitted once
for everything removed from it. Channel axes are kept as negative indices,
which numpy-style broadcasting aligns.

A group is left alone, with the reason, when one of its tensors is a graph output, is
read by an op not listed above (Reshape, Flatten, Softmax…, a Concat read by anything but a
consumer) or by a
nested graph, mixes with a tensor no weight layer produces, has an unknown width, or
when a weight it would rewrite is also read by other nodes. The rewrite itself is
:mod:`.channel_surgery`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnxopt.passes.common.layers import is_depthwise

from onnxopt.graph import (
    GraphIndex,
    is_default_domain,
    node_attribute,
    outer_references,
    subgraphs,
)
from onnxopt.runtime import tensor_types

__all__ = ["ChannelGroup", "describe_types", "find_channel_groups"]

log = logging.getLogger(__name__)

UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Clip",
        "Elu",
        "Selu",
        "Softplus",
        "Softsign",
        "Erf",
        "Abs",
        "Neg",
        "Exp",
        "Sqrt",
        "Identity",
        "Gelu",
        "Dropout",
        "Mish",
        "Celu",
        "ThresholdedRelu",
        "Floor",
        "Ceil",
        "Round",
        "Reciprocal",
    }
)
POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "LpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass
class ChannelGroup:
    """Tensors that must lose the same channels, the nodes that produce and read them.

    ``sources`` produce the channels (their output rows are removed), ``through`` carry them
    (their per-channel constants are sliced), ``consumers`` read them (input channels removed).
    """

    channels: int
    axis: int
    tensors: list[str] = field(default_factory=list)
    sources: list[onnx.NodeProto] = field(default_factory=list)
    through: list[onnx.NodeProto] = field(default_factory=list)
    consumers: list[onnx.NodeProto] = field(default_factory=list)
    blocked: str | None = None
    #: consumer output -> (offset of this group's channels in its input, its input channels),
    #: for consumers that read the group through a channel ``Concat``
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    def offset(self, consumer: onnx.NodeProto) -> tuple[int, int]:
        """Return (offset, input channels) of this group in ``consumer``'s input."""
        return self.offsets.get(consumer.output[0], (0, self.channels))

    @property
    def key(self) -> str:
        """Return the name used in reports (the first source's output)."""
        return self.sources[0].output[0] if self.sources else self.tensors[0]


class _Sets:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        self.parent[name] = root
        return root

    def union(self, a: str, b: str) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _shape(types: dict[str, onnx.TypeProto], name: str) -> tuple[int | None, ...] | None:
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)


def _source_width(node: onnx.NodeProto, index: GraphIndex) -> tuple[int, int] | None:
    """Return (channels, negative axis) when ``node`` is a weight layer whose outputs can lose channels."""
    if node.op_type not in WEIGHTED or not is_default_domain(node) or len(node.input) < 2:
        return None
    weight = index.constant(node.input[1])
    if weight is None or weight.dtype != np.float32:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        if weight.ndim < 3 or int(node_attribute(node, "group", 1)) != 1:
            return None
        width = weight.shape[0] if node.op_type == "Conv" else weight.shape[1]
        return int(width), 1 - weight.ndim
    if weight.ndim != 2 or (node.op_type == "Gemm" and node_attribute(node, "transA", 0)):
        return None
    trans_b = node.op_type == "Gemm" and node_attribute(node, "transB", 0)
    return int(weight.shape[0] if trans_b else weight.shape[1]), -1


def _consumes(node: onnx.NodeProto, name: str, index: GraphIndex, axis: int) -> bool:
    """Return True when ``node`` reads ``name`` as a linear layer's input we can slice."""
    if node.op_type not in WEIGHTED or list(node.input).count(name) != 1 or node.input[0] != name:
        return False
    weight = index.constant(node.input[1])
    if weight is None or weight.dtype != np.float32:
        return False
    if node.op_type in ("Conv", "ConvTranspose"):
        return int(node_attribute(node, "group", 1)) == 1 and axis == 1 - weight.ndim
    return weight.ndim == 2 and axis == -1 and not node_attribute(node, "transA", 0)


def _channel_axis_of(types: dict[str, onnx.TypeProto], name: str, axis: int) -> bool:
    """Return True when ``axis`` is axis 1 (the NCHW channel axis) of tensor ``name``."""
    shape = _shape(types, name)
    return axis != -1 if shape is None else axis == 1 - len(shape)


def _carry_reason(
    node: onnx.NodeProto,
    name: str,
    channels: int,
    axis: int,
    index: GraphIndex,
    types: dict[str, onnx.TypeProto],
    width: dict[str, tuple[int, int]],
) -> str | None:
    """Return None when ``node`` carries the channels of its input ``name`` one to one, else why not."""
    op = node.op_type if is_default_domain(node) else f"{node.domain}.{node.op_type}"
    label = f"{op} node {node.name or node.output[0]!r}" if node.output else f"{op} node {node.name!r}"
    if op in UNARY or op == "BatchNormalization" or op in POOLS or op == "Conv":
        if node.input[0] != name or list(node.input).count(name) != 1:
            return f"read by {label} as a parameter"
        if op == "Conv" and not is_depthwise(node, index, channels):
            return f"read by {label} (grouped, not depthwise)"
        if op in POOLS or op == "BatchNormalization" or op == "Conv":
            return None if _channel_axis_of(types, name, axis) else f"read by {label} along another axis"
        if op == "PRelu" and len(node.input) > 1 and not index.is_constant(node.input[1]):
            return f"read by {label} with a computed slope"
        return None
    if op == "Resize":
        if node.input[0] != name or list(node.input).count(name) != 1:
            return f"read by {label} as a parameter"
        position = 1 if len(node.input) == 2 else 2  # Resize-10 has (X, scales)
        scales = index.constant(node.input[position]) if len(node.input) > position and node.input[position] else None
        sizes = len(node.input) > 3 and bool(node.input[3])
        if sizes or scales is None or scales.ndim != 1:
            return f"read by {label} with computed or absolute output sizes"
        if node_attribute(node, "coordinate_transformation_mode", b"") == b"tf_crop_and_resize":
            return f"read by {label} that crops (tf_crop_and_resize)"
        axes = node_attribute(node, "axes")  # opset 18: scales of the listed axes only
        shape = _shape(types, name)
        if axes is not None:
            if shape is None:
                return f"read by {label} with axes on a tensor of unknown rank"
            listed = [int(a) - len(shape) if int(a) >= 0 else int(a) for a in axes]
            scale = float(scales[listed.index(axis)]) if axis in listed else 1.0
        elif scales.size >= -axis:
            scale = float(scales[axis])
        else:
            return f"read by {label} with scales of another rank"
        return (
            None
            if scale == 1 and _channel_axis_of(types, name, axis)
            else f"read by {label} that resizes the channel axis"
        )
    if op not in BINARY:
        return f"read by {label}"
    if op == "Pow" and node.input[1] == name:
        return f"read by {label} as the exponent"
    for other in node.input:
        if other in width:
            continue
        if index.is_constant(other):
            value = index.constant(other)
            at = value.ndim + axis if value is not None else -1
            if value is None or (at >= 0 and value.shape[at] not in (1, channels)):
                return f"read by {label} with a constant that does not broadcast per channel"
            continue
        shape = _shape(types, other)
        if shape is None or len(shape) < -axis or shape[axis] not in (1, channels):
            return f"mixed by {label} with {other!r} of unknown or different width"
        if shape[axis] == channels:
            return f"mixed by {label} with {other!r}, which no weight layer makes"
    return None


def _concat_parts(
    node: onnx.NodeProto, width: dict[str, tuple[int, int]], types: dict[str, onnx.TypeProto]
) -> tuple[list[tuple[str, int, int]], int, int] | str:
    """Return the parts (input, offset, width), total width and axis of a channel Concat, or why not."""
    axis_attr = int(node_attribute(node, "axis", 0))
    label = f"Concat node {node.name or node.output[0]!r}"
    tracked = [n for n in node.input if n in width]
    if len({width[n][1] for n in tracked}) > 1:
        return f"read by {label} with channel axes that differ"
    axis = width[tracked[0]][1]
    rank = len(_shape(types, node.output[0]) or ())
    if not rank or axis_attr - (rank if axis_attr >= 0 else 0) != axis:
        return f"read by {label} along another axis or of unknown rank"
    parts, offset = [], 0
    for name in node.input:
        if name in width:
            channels = width[name][0]
        else:
            shape = _shape(types, name)
            if shape is None or len(shape) != rank or shape[axis] is None:
                return f"read by {label} beside {name!r} of unknown width"
            channels = int(shape[axis])  # type: ignore[arg-type]
        if list(node.input).count(name) != 1:
            return f"read by {label} more than once"
        parts.append((name, offset, channels))
        offset += channels
    return parts, offset, axis


def find_channel_groups(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto] | None = None) -> list[ChannelGroup]:
    """Return the channel groups of ``graph`` (main graph only), blocked ones with their reason."""
    index = GraphIndex(graph)
    types = types if types is not None else {}
    sets = _Sets()
    width: dict[str, tuple[int, int]] = {}  # tensor -> (channels, negative axis)
    role: dict[str, tuple[str, onnx.NodeProto]] = {}  # tensor -> ("source" | "through", producer)
    blocked: dict[str, str] = {}
    consumers: list[tuple[str, onnx.NodeProto]] = []
    consumed: list[tuple[str, onnx.NodeProto]] = []  # (Concat output, consumer)

    def block(name: str, reason: str) -> None:
        blocked.setdefault(name, reason)

    # Concat output -> its parts (input, offset, width) and total width
    concats: dict[str, tuple[list[tuple[str, int, int]], int, int]] = {}
    for node in graph.node:
        source = _source_width(node, index)
        if source is not None:
            out = node.output[0]
            width[out], role[out] = source, ("source", node)
            sets.union(out, out)
        for name in {n for g in subgraphs(node) for n in outer_references(g)}:
            for part in [p for p, _, _ in concats[name][0]] if name in concats else [name]:
                if part in width:
                    block(part, f"read by a graph nested in {node.op_type} node {node.name!r}")
        for name in [n for n in node.input if n in concats]:
            parts, total, axis = concats[name]
            if _consumes(node, name, index, axis):
                consumed.append((name, node))
                continue
            op = f"{node.op_type} node {node.name or node.output[0]!r}" if node.output else node.op_type
            for part, _, _ in parts:
                if part in width:
                    block(part, f"concatenated into {name!r}, which is read by {op}")
        if node.op_type == "Concat" and any(n in width for n in node.input):
            parts_of = _concat_parts(node, width, types)
            if isinstance(parts_of, str):
                for name in node.input:
                    if name in width:
                        block(name, parts_of)
            else:
                concats[node.output[0]] = parts_of
            continue
        tracked = [n for n in node.input if n in width]
        for name in tracked:
            channels, axis = width[name]
            if _consumes(node, name, index, axis):
                consumers.append((name, node))
                continue
            out = node.output[0] if node.output else ""
            reason = _carry_reason(node, name, channels, axis, index, types, width)
            if reason is not None or not out:
                block(name, reason or f"read by {node.op_type} node {node.name!r}")
                continue
            if out in width and role.get(out, ("",))[0] == "source":
                block(name, f"{node.op_type} node {node.name or out!r} is both a layer and a channel op")
                continue
            width[out] = (channels, axis)
            role.setdefault(out, ("through", node))
            sets.union(name, out)
    for name, (parts, _, _) in concats.items():
        if name in index.outputs:
            for part, _, _ in parts:
                if part in width:
                    block(part, f"concatenated into graph output {name!r}")
    groups: dict[str, ChannelGroup] = {}
    for name in width:
        root = sets.find(name)
        channels, axis = width[name]
        group = groups.setdefault(root, ChannelGroup(channels, axis))
        group.tensors.append(name)
        if (channels, axis) != (group.channels, group.axis):
            group.blocked = group.blocked or f"{name!r} joins tensors of a different width"
        kind, producer = role[name]
        target = group.sources if kind == "source" else group.through
        if all(producer is not n for n in target):
            target.append(producer)
        if name in index.outputs:
            group.blocked = group.blocked or f"{name!r} is a graph output"
        if name in blocked:
            group.blocked = group.blocked or f"{name!r} is {blocked[name]}"
    for name, node in consumers:
        group = groups[sets.find(name)]
        if all(node is not n for n in group.consumers):
            group.consumers.append(node)
    for name, node in consumed:
        parts, total, _ = concats[name]
        for part, offset, _ in parts:
            if part not in width:
                continue
            group = groups[sets.find(part)]
            if any(node is n for n in group.consumers):
                group.blocked = group.blocked or f"{name!r} holds the channels of {part!r} twice"
                continue
            group.consumers.append(node)
            group.offsets[node.output[0]] = (offset, total)
            if name not in group.tensors:
                group.tensors.append(name)
    for group in groups.values():
        for node in [*group.sources, *group.consumers, *[n for n in group.through if n.op_type == "Conv"]]:
            if index.uses(node.input[1]) > 1:
                group.blocked = group.blocked or f"weight {node.input[1]!r} is shared with other nodes"
        if not group.consumers and not group.blocked:
            group.blocked = "no layer reads it"
    return list(groups.values())


def describe_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Return the known tensor types of the main graph (after best-effort shape inference)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # keep what the model declares
        inferred = model
    return tensor_types(inferred)
