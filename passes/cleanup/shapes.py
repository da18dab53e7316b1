"""Track the values of small shape tensors element by element (private to ``onnxopt.passes``).

An element is either a number or ``(tensor, axis)``: "the size of ``tensor`` along
``axis``", which may be dynamic. Shape, Gather, Slice, Unsqueeze, Squeeze, Concat and
integer Cast propagate elements, so ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])`` is
known to be ``[(x, 0), -1]`` even when x's batch size is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.common.graphs import TypeMap

from onnxopt.graph import node_attribute

__all__ = ["ShapeValue", "output_dtype", "propagate", "shape_value"]

Element = int | tuple[str, int]
_INTS = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


@dataclass(frozen=True)
class ShapeValue:
    """The elements of a 0-D (``scalar``) or 1-D integer tensor."""

    elements: tuple[Element, ...]
    scalar: bool = False


def _shape(node: onnx.NodeProto, types: TypeMap) -> ShapeValue | None:
    dims = types.dims(node.input[0])
    if dims is None:
        return None
    rank = len(dims)
    start = int(node_attribute(node, "start", 0))
    end = node_attribute(node, "end")
    stop = rank if end is None else int(end)
    axes = range(rank)[start:stop]
    return ShapeValue(tuple(dims[a] if dims[a] is not None else (node.input[0], a) for a in axes))


def propagate(node: onnx.NodeProto, known: dict[str, ShapeValue], constant, types: TypeMap) -> ShapeValue | None:
    """Return the element-wise value of ``node``'s output, or None when it cannot be tracked."""
    op = node.op_type

    def value(name: str) -> ShapeValue | None:
        if name in known:
            return known[name]
        array = constant(name)
        if array is None or array.ndim > 1 or array.dtype.kind != "i" or array.size > 16:
            return None
        return ShapeValue(tuple(int(v) for v in array.reshape(-1)), array.ndim == 0)

    if op == "Shape":
        return _shape(node, types)
    source = value(node.input[0]) if node.input else None
    if source is None:
        return None
    if op == "Cast":
        return source if node_attribute(node, "to") in _INTS else None
    if op == "Gather" and int(node_attribute(node, "axis", 0)) == 0:
        indices = constant(node.input[1])
        if indices is None or indices.ndim > 1 or source.scalar:
            return None
        n = len(source.elements)
        if np.any(indices >= n) or np.any(indices < -n):
            return None
        picked = tuple(source.elements[int(i)] for i in indices.reshape(-1))
        return ShapeValue(picked, indices.ndim == 0)
    if op == "Unsqueeze" and source.scalar:
        axes = node_attribute(node, "axes")
        if axes is None and len(node.input) > 1:
            axes = constant(node.input[1])
        return ShapeValue(source.elements) if axes is not None and list(np.reshape(axes, -1)) in ([0], [-1]) else None
    if op == "Squeeze" and len(source.elements) == 1 and not source.scalar:
        return ShapeValue(source.elements, True)
    if op == "Concat" and int(node_attribute(node, "axis", 0)) in (0, -1):
        parts = [value(n) for n in node.input]
        if any(p is None or p.scalar for p in parts):
            return None
        return ShapeValue(tuple(e for p in parts for e in p.elements))  # type: ignore[union-attr]
    if op == "Slice" and len(node.input) >= 3 and not source.scalar:
        bounds = [constant(n) if n else None for n in node.input[1:5]]
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 else None
        steps = bounds[3] if len(bounds) > 3 else None
        if starts is None or ends is None or starts.size != 1:
            return None
        if (axes is not None and int(axes.reshape(-1)[0]) not in (0, -1)) or (
            steps is not None and int(steps.reshape(-1)[0]) != 1
        ):
            return None
        n = len(source.elements)
        start = int(np.clip(starts.reshape(-1)[0], -n, n))
        end = int(np.clip(ends.reshape(-1)[0], -n - 1, n))
        return ShapeValue(source.elements[slice(start, end)])
    return None


def shape_value(node: onnx.NodeProto, types: TypeMap) -> np.ndarray | None:
    """Return the value of a Shape/Size node when every dim it reports is static."""
    dims = types.dims(node.input[0])
    if dims is None:
        return None
    if node.op_type == "Size":
        known = [d for d in dims if d is not None]
        return None if len(known) != len(dims) else np.array(int(np.prod(known, dtype=np.int64)), np.int64)
    start = int(node_attribute(node, "start", 0))
    end = node_attribute(node, "end")
    selected = dims[start:] if end is None else dims[start : int(end)]
    return None if any(d is None for d in selected) else np.array(selected, dtype=np.int64)


def output_dtype(node: onnx.NodeProto, types: TypeMap) -> np.dtype | None:
    """Return the integer dtype of a shape op's output, None when unknown."""
    if node.op_type in ("Shape", "Size"):
        return np.dtype(np.int64)
    elem = types.elem_type(node.output[0])
    return None if elem not in _INTS else np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
