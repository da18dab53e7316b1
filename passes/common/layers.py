"""Weight layers: a Conv, ConvTranspose, Gemm or MatMul whose weight is a constant, and its canonical view.

A :class:`Layer`'s weight has a *canonical* view ``[groups, outputs, inputs]`` in which every
row maps one output of the layer from the ``inputs`` features it reads (for a Conv: input
channel, kernel row, kernel column, the im2col order), so the math modules see plain
matrices whatever the ONNX layout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.graph import (
    GraphIndex,
    NameGenerator,
    control_tensors,
    is_default_domain,
    nested_ops,
    node_attribute,
    set_initializer,
)

log = logging.getLogger(__name__)


def is_depthwise(node: onnx.NodeProto, index: GraphIndex, channels: int | None = None) -> bool:
    """Return True for a Conv whose every group reads one input channel (a depthwise convolution).

    With ``channels``: whether it has one filter per channel, ``channels`` groups and as
    many outputs (what pruning a channel through it needs; one channel counts).
    """
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    weight = index.constant(node.input[1])
    group = int(node_attribute(node, "group", 1))
    if weight is None or weight.ndim < 3 or weight.shape[1] != 1:
        return False
    return group > 1 if channels is None else group == channels and weight.shape[0] == channels


WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One weight layer of the main graph, keyed by its first output name."""

    key: str
    op_type: str
    activation: str
    weight: str
    shape: tuple[int, ...]
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def size(self) -> int:
        """Return the number of weights."""
        return int(np.prod(self.shape))

    @property
    def has_gram(self) -> bool:
        """Return True when the input second moment ``XᵀX`` can be collected for this layer."""
        return len(self.kernel) <= 2

    @property
    def signature(self) -> tuple:
        """Return what determines the rows built from the activation (layers sharing it share stats)."""
        return (
            self.activation,
            self.op_type == "Conv",
            self.trans_a,
            self.groups,
            self.kernel,
            self.strides,
            self.pads,
            self.dilations,
            self.auto_pad,
            self.shape[1:] if self.kernel else (),
        )


def find_layers(graph: onnx.GraphProto, op_types: Iterable[str] = WEIGHT_OPS) -> tuple[list[Layer], list[str]]:
    """Return the weight layers of ``graph`` (constant 2-D MatMul RHS, Gemm B, Conv W) and notes."""
    index = GraphIndex(graph)
    wanted = set(op_types)
    layers: list[Layer] = []
    notes: list[str] = []
    control = control_tensors(graph, index)
    deciding: list[str] = []
    for node in graph.node:
        if node.op_type not in wanted or not is_default_domain(node) or len(node.input) < 2:
            continue
        if node.output[0] in control:
            deciding.append(node.output[0])
            continue
        weight = node.input[1]
        value = index.constant(weight)
        if value is None:
            continue
        if value.dtype != np.float32:
            notes.append(f"{node.output[0]}: weight {weight!r} is {value.dtype}, only float32 is handled")
            continue
        shape = tuple(int(d) for d in value.shape)
        if node.op_type in ("MatMul", "Gemm"):
            if value.ndim != 2:
                notes.append(f"{node.output[0]}: {node.op_type} weight is {value.ndim}-D; left alone")
                continue
            layers.append(
                Layer(
                    node.output[0],
                    node.op_type,
                    node.input[0],
                    weight,
                    shape,
                    trans_a=bool(node_attribute(node, "transA", 0)),
                    trans_b=bool(node_attribute(node, "transB", 0)),
                )
            )
            continue
        spatial = value.ndim - 2
        if spatial < 1:
            continue
        auto_pad = node_attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        layers.append(
            Layer(
                node.output[0],
                node.op_type,
                node.input[0],
                weight,
                shape,
                groups=int(node_attribute(node, "group", 1)),
                kernel=shape[2:],
                strides=tuple(node_attribute(node, "strides", [1] * spatial)),
                pads=tuple(node_attribute(node, "pads", [0] * 2 * spatial)),
                dilations=tuple(node_attribute(node, "dilations", [1] * spatial)),
                auto_pad=auto_pad,
            )
        )
    if deciding:
        shown = ", ".join(deciding[:5]) + (" and more" if len(deciding) > 5 else "")
        notes.append(
            f"left {len(deciding)} layer(s) alone whose outputs decide an If/Loop condition (a small error "
            f"there switches branches): {shown}"
        )
    nested = nested_ops(graph, wanted)
    if nested:
        notes.append(
            f"left {nested} {'/'.join(sorted(wanted))} node(s) inside If/Loop/Scan bodies alone "
            "(only main-graph layers are handled)"
        )
    return layers, notes


def to_canonical(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """Return ``weight`` as ``[groups, outputs per group, input features]``."""
    if layer.op_type == "MatMul":
        return weight.T[None]
    if layer.op_type == "Gemm":
        return (weight if layer.trans_b else weight.T)[None]
    if layer.op_type == "Conv":
        out = weight.shape[0]
        return weight.reshape(layer.groups, out // layer.groups, -1)
    # ConvTranspose [C, O/g, k...]: a row per (output channel, kernel position), reading C/g channels
    return weight.reshape(layer.groups, weight.shape[0] // layer.groups, -1).transpose(0, 2, 1)


def from_canonical(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """Invert :func:`to_canonical`."""
    if layer.op_type == "MatMul":
        return np.ascontiguousarray(matrix[0].T)
    if layer.op_type == "Gemm":
        return np.ascontiguousarray(matrix[0] if layer.trans_b else matrix[0].T)
    if layer.op_type == "Conv":
        return np.ascontiguousarray(matrix.reshape(layer.shape))
    return np.ascontiguousarray(matrix.transpose(0, 2, 1).reshape(layer.shape))


def write_weight(
    graph: onnx.GraphProto, names: NameGenerator, weight: str, value: np.ndarray, readers: Sequence[onnx.NodeProto]
) -> str:
    """Store ``value`` as the weight read by ``readers``; return the tensor name used.

    An initializer nobody else reads is replaced in place; otherwise (other readers, or a
    Constant node's output) a new initializer is made and ``readers`` are rewired to it.
    """
    index = GraphIndex(graph)
    is_initializer = weight in index.initializers
    reader_ids = {id(n) for n in readers}
    others = [n for n in index.consumers.get(weight, []) if id(n) not in reader_ids]
    if is_initializer and not others and weight not in index.outputs:
        set_initializer(graph, weight, value.astype(np.float32))
        return weight
    new_name = names.fresh(weight)
    set_initializer(graph, new_name, value.astype(np.float32))
    for node in readers:
        for i, name in enumerate(node.input):
            if name == weight and i > 0:
                node.input[i] = new_name
    return new_name


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _conv_rows(layer: Layer, x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Return sampled im2col rows ``[P, groups, C/g·kh·kw]`` of a 1-D or 2-D Conv input."""
    if x.ndim == 3:
        x = x[:, :, None, :]
    kernel = (1, *layer.kernel) if len(layer.kernel) == 1 else layer.kernel
    strides = (1, *layer.strides) if len(layer.strides) == 1 else layer.strides
    dilations = (1, *layer.dilations) if len(layer.dilations) == 1 else layer.dilations
    pads = (0, layer.pads[0], 0, layer.pads[1]) if len(layer.pads) == 2 else layer.pads
    n, c, h, w = x.shape
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = layer.auto_pad == "SAME_UPPER"
        ph = _same_pads(h, kernel[0], strides[0], dilations[0], upper)
        pw = _same_pads(w, kernel[1], strides[1], dilations[1], upper)
        pads = (ph[0], pw[0], ph[1], pw[1])
    elif layer.auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (h + pads[0] + pads[2] - (kernel[0] - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - (kernel[1] - 1) * dilations[1] - 1) // strides[1] + 1
    total = n * out_h * out_w
    chosen = rng.choice(total, size=max_rows, replace=False) if total > max_rows else np.arange(total)
    b, rest = np.divmod(chosen, out_h * out_w)
    oh, ow = np.divmod(rest, out_w)
    rows_h = oh[:, None] * strides[0] + np.arange(kernel[0])[None] * dilations[0]
    rows_w = ow[:, None] * strides[1] + np.arange(kernel[1])[None] * dilations[1]
    patches = padded[
        b[:, None, None, None], np.arange(c)[None, :, None, None], rows_h[:, None, :, None], rows_w[:, None, None, :]
    ]
    return patches.reshape(len(chosen), layer.groups, -1)


def layer_rows(layer: Layer, x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Return the rows ``[P, groups, features]`` that ``layer``'s weight rows are applied to."""
    if layer.op_type == "Conv":
        return _conv_rows(layer, x, max_rows, rng)
    if layer.op_type == "ConvTranspose":
        rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    elif layer.op_type == "Gemm" and layer.trans_a:
        rows = x.T
    else:
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        rows = rows[rng.choice(rows.shape[0], size=max_rows, replace=False)]
    return rows.reshape(rows.shape[0], layer.groups, -1)
