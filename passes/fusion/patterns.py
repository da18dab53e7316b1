"""Sub-patterns of the fusions: GELU arguments, hard sigmoid and LayerNorm constants (private to ``onnxopt.passes``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.fusion.match import Matcher, NoMatch

from onnxopt.graph import node_attribute

__all__ = ["HardSigmoidMatch", "erf_argument", "hard_sigmoid_product", "normalized_constant", "tanh_argument"]

_SQRT2 = float(np.sqrt(2.0))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def erf_argument(m: Matcher, erf: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]]:
    """Return x for ``Erf(x / sqrt 2)`` (or ``x * (1/sqrt 2)``) and the nodes before Erf."""
    scaled = m.producer(erf.input[0], "Div", "Mul")
    if scaled.op_type == "Div":
        m.scalar(scaled.input[1], _SQRT2)
        x = scaled.input[0]
    else:
        x = next((n for n in scaled.input if not m.is_constant(n)), "")
        m.scalar(m.other_input(scaled, x), 1.0 / _SQRT2)
    m.private(scaled.output[0])
    return x, [scaled]


def tanh_argument(m: Matcher, tanh: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]]:
    """Return x for ``Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))`` and the nodes before Tanh."""
    outer = m.producer(tanh.input[0], "Mul")
    inner_sum = next((n for n in outer.input if not m.is_constant(n)), "")
    m.scalar(m.other_input(outer, inner_sum), _SQRT_2_OVER_PI)
    add = m.producer(inner_sum, "Add")
    for x in add.input:
        try:
            cubic = m.producer(m.other_input(add, x), "Mul")
            power = m.producer(next(n for n in cubic.input if not m.is_constant(n)), "Pow")
        except (NoMatch, StopIteration):
            continue
        m.scalar(m.other_input(cubic, power.output[0]), 0.044715)
        m.scalar(power.input[1], 3.0)
        if power.input[0] != x:
            continue
        for name in (outer.output[0], add.output[0], cubic.output[0], power.output[0]):
            m.private(name)
        return x, [outer, add, cubic, power]
    raise NoMatch("Tanh argument is not sqrt(2/pi) * (x + 0.044715 * x^3)")


def normalized_constant(value: np.ndarray, shape: tuple[int, ...], rank: int) -> np.ndarray:
    """Return gamma/beta broadcast to the normalized ``shape``; it may not vary over other axes."""
    if value.ndim > rank:
        raise NoMatch("LayerNorm constant has a higher rank than its input")
    lead = value.shape[: max(0, value.ndim - len(shape))]
    if any(d != 1 for d in lead):
        raise NoMatch("LayerNorm constant varies over non-normalized axes")
    try:
        return np.broadcast_to(value.reshape(value.shape[len(lead) :]), shape).copy()
    except ValueError as exc:
        raise NoMatch("LayerNorm constant does not broadcast to the normalized shape") from exc


@dataclass(frozen=True)
class HardSigmoidMatch:
    """``Clip(x + 3, 0, 6) / 6`` found around a Clip: its nodes in order, and the product by ``x`` if any."""

    x: str
    chain: tuple[onnx.NodeProto, ...]
    product: onnx.NodeProto | None


def _clip_bounds(m: Matcher, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
    if not any(a.name in ("min", "max") for a in clip.attribute):  # opset >= 11: bounds are inputs
        low = m.scalar(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
        high = m.scalar(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
        return low, high
    low_attr, high_attr = node_attribute(clip, "min"), node_attribute(clip, "max")
    return (None if low_attr is None else float(low_attr), None if high_attr is None else float(high_attr))


def _divided_by_six(m: Matcher, name: str) -> onnx.NodeProto:
    """Return the node computing ``name / 6`` or ``name * (1/6)`` (its sole reader)."""
    node = m.sole_consumer(name, "Div", "Mul")
    if node.op_type == "Div":
        if list(node.input[:1]) != [name]:
            raise NoMatch("Div does not divide the value")
        m.scalar(node.input[1], 6.0)
    else:
        m.scalar(m.other_input(node, name), 1.0 / 6.0)
    return node


def hard_sigmoid_product(m: Matcher, clip: onnx.NodeProto) -> HardSigmoidMatch:
    """Return ``Clip(x + 3, 0, 6) / 6`` around ``clip`` and, when present, its product by ``x``."""
    add = m.producer(clip.input[0], "Add")
    x = next((n for n in add.input if not m.is_constant(n)), "")
    m.scalar(m.other_input(add, x), 3.0)
    m.private(add.output[0])
    if _clip_bounds(m, clip) != (0.0, 6.0):
        raise NoMatch("Clip bounds are not 0 and 6")
    reader = m.sole_consumer(clip.output[0], "Div", "Mul")
    if reader.op_type == "Mul" and x in reader.input and m.other_input(reader, x) == clip.output[0]:
        scaled = _divided_by_six(m, reader.output[0])  # (x * clip) / 6
        return HardSigmoidMatch(x, (add, clip, reader, scaled), reader)
    gate = _divided_by_six(m, clip.output[0])  # clip / 6, then maybe x * gate
    try:
        product = m.sole_consumer(gate.output[0], "Mul")
        if m.other_input(product, gate.output[0]) == x:
            return HardSigmoidMatch(x, (add, clip, gate, product), product)
    except NoMatch:
        pass
    return HardSigmoidMatch(x, (add, clip, gate), None)
