"""Rules that recognise nodes which return their input unchanged (private to ``onnxopt.passes``).

Each rule takes the node, a constant lookup and the inferred types and returns the
name of the input the node passes through, or a reason string prefixed ``"skip: "``
when it cannot prove the node is a no-op. A rule never guesses a dimension: a shape
it does not know statically is a reason to keep the node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnxopt.passes.common.graphs import TypeMap

from onnxopt.graph import node_attribute

__all__ = ["NOOP_RULES", "compose_perm", "merge_slices", "reshape_target"]

ConstantLookup = Callable[[str], "np.ndarray | None"]
Rule = Callable[[onnx.NodeProto, ConstantLookup, TypeMap, int], "str | None"]

_INT_MAX = 2**31 - 1


def reshape_target(input_shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...] | None:
    """Return the output shape of Reshape(input_shape, target), or None if invalid."""
    dims = [int(d) for d in target.reshape(-1)]
    if not allowzero:
        dims = [input_shape[i] if d == 0 and i < len(input_shape) else d for i, d in enumerate(dims)]
    total = int(np.prod(input_shape, dtype=np.int64))
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return tuple(dims) if int(np.prod(dims, dtype=np.int64)) == total else None


def compose_perm(first: list[int], second: list[int]) -> list[int]:
    """Return the perm of Transpose(second) applied after Transpose(first)."""
    return [first[axis] for axis in second]


def merge_slices(
    first: onnx.NodeProto, second: onnx.NodeProto, const: ConstantLookup, rank: int | None
) -> list[np.ndarray] | None:
    """Return (starts, ends, axes, steps) of one Slice doing ``second`` after ``first``, or None.

    Only for opset >= 10 Slices with constant bounds on disjoint axes (negative axes
    need the rank to compare).
    """
    parts = []
    for node in (first, second):
        if len(node.input) < 3:
            return None
        values = [const(n) if n else None for n in node.input[1:5]]
        if any(v is None for v, n in zip(values, node.input[1:5], strict=False) if n):
            return None
        starts, ends = values[0], values[1]
        if starts is None or ends is None:
            return None
        axes = values[2] if len(values) > 2 and values[2] is not None else np.arange(starts.size)
        steps = values[3] if len(values) > 3 and values[3] is not None else np.ones(starts.size, np.int64)
        axes = axes.reshape(-1).astype(np.int64)
        if np.any(axes < 0):
            if rank is None:
                return None
            axes = axes % rank
        parts.append(
            (
                starts.reshape(-1).astype(np.int64),
                ends.reshape(-1).astype(np.int64),
                axes,
                steps.reshape(-1).astype(np.int64),
            )
        )
    if set(parts[0][2].tolist()) & set(parts[1][2].tolist()):
        return None
    return [np.concatenate([parts[0][i], parts[1][i]]) for i in range(4)]


def _identity(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    return node.input[0]


def _dropout(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    if len(node.output) > 1 and node.output[1]:
        return "skip: its mask output is used"
    if len(node.input) > 2 and node.input[2]:
        training = const(node.input[2])
        if training is None or bool(training.reshape(-1)[0]):
            return "skip: training_mode is not a constant false"
    if opset < 7 and node_attribute(node, "is_test", 0) == 0:
        return "skip: is_test is not set (opset < 7)"
    return node.input[0]


def _cast(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    source = types.elem_type(node.input[0])
    if source is None:
        return "skip: input type unknown"
    return node.input[0] if source == node_attribute(node, "to") else None


def _reshape(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    shape = types.static_shape(node.input[0])
    target = const(node.input[1]) if len(node.input) > 1 else None
    if shape is None or target is None:
        return "skip: dynamic shape"
    result = reshape_target(shape, target, bool(node_attribute(node, "allowzero", 0)))
    return node.input[0] if result == shape else None


def _transpose(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    perm = node_attribute(node, "perm")
    if perm is None:
        rank = types.rank(node.input[0])
        return node.input[0] if rank is not None and rank <= 1 else None
    return node.input[0] if list(perm) == list(range(len(perm))) else None


def _pad(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    pads = node_attribute(node, "pads") if opset < 11 else (const(node.input[1]) if len(node.input) > 1 else None)
    if pads is None:
        return "skip: pads are not constant"
    return node.input[0] if not np.any(np.asarray(pads)) else None


def _slice(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    dims = types.dims(node.input[0])
    if opset < 10:
        starts, ends = node_attribute(node, "starts"), node_attribute(node, "ends")
        axes, steps = node_attribute(node, "axes"), None
    else:
        values = [const(n) if n else None for n in node.input[1:]] + [None] * 4
        if any(values[i] is None and len(node.input) > i + 1 and node.input[i + 1] for i in range(4)):
            return "skip: slice bounds are not constant"
        starts, ends, axes, steps = values[:4]
    if starts is None or ends is None or dims is None:
        return "skip: slice bounds or input rank unknown"
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else np.asarray(steps).reshape(-1)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = dims[int(axis)]
        if step != 1 or start not in (0, *((-dim,) if dim else ())):
            return None
        if end < _INT_MAX and (dim is None or end < dim):
            return None
    return node.input[0]


def _expand(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    shape = const(node.input[1])
    dims = types.dims(node.input[0])
    if shape is None or dims is None:
        return "skip: expand shape or input rank unknown"
    target = [int(d) for d in shape.reshape(-1)]
    if len(target) > len(dims):
        return None
    if all(d == 1 for d in target):
        return node.input[0]
    static = types.static_shape(node.input[0])
    if static is not None and tuple(np.broadcast_shapes(static, tuple(target))) == static:
        return node.input[0]
    return None


def _concat(node: onnx.NodeProto, const: ConstantLookup, types: TypeMap, opset: int) -> str | None:
    return node.input[0] if len(node.input) == 1 else None


NOOP_RULES: dict[str, Rule] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Concat": _concat,
}
