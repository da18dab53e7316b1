"""Sub-patterns of the fusions: GELU arguments and LayerNorm constants (private to ``onnxopt.passes``)."""

from __future__ import annotations

import numpy as np
import onnx

from ._match import Matcher, NoMatch

__all__ = ["erf_argument", "normalized_constant", "tanh_argument"]

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
    lead = value.shape[:max(0, value.ndim - len(shape))]
    if any(d != 1 for d in lead):
        raise NoMatch("LayerNorm constant varies over non-normalized axes")
    try:
        return np.broadcast_to(value.reshape(value.shape[len(lead):]), shape).copy()
    except ValueError as exc:
        raise NoMatch("LayerNorm constant does not broadcast to the normalized shape") from exc
