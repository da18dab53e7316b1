"""Saturation bounds for int8 calibration: the interval a tensor's readers can tell apart (private).

A tensor read only by saturating activations needs no resolution beyond what they
distinguish, so calibration chooses its range on values clamped to that interval
(``onnxopt.calibration.SaturatedObserver``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnxopt.passes.quantize.facts import GraphFacts

from onnxopt.graph import is_default_domain, node_attribute

__all__ = ["saturation_bounds"]


def _hard_swish_bounds(node: onnx.NodeProto, tensor: str, g: GraphFacts) -> tuple[float | None, float | None] | None:
    """Return the bounds of ``x * HardSigmoid(x)`` read as ``Mul`` ``node`` (x = ``tensor``), or None.

    HardSwish written below opset 14 (``fuse_hardswish`` keeps the model's opset): the
    product is 0 wherever the HardSigmoid is, i.e. for every x <= -beta/alpha, and x
    itself above the ramp, so it distinguishes nothing below -beta/alpha and has no upper bound.
    """
    others = [name for name in node.input if name != tensor]
    if len(node.input) != 2 or len(others) != 1:
        return None
    gate = g.index.producer.get(others[0])
    if gate is None or gate.op_type != "HardSigmoid" or not is_default_domain(gate) or list(gate.input) != [tensor]:
        return None
    alpha = float(node_attribute(gate, "alpha", 0.2))
    beta = float(node_attribute(gate, "beta", 0.5))
    return (-beta / alpha, None) if alpha > 0 else None


def _reader_bounds(node: onnx.NodeProto, tensor: str, g: GraphFacts) -> tuple[float | None, float | None] | None:
    """Return the input interval outside which ``node``'s output no longer changes; None: no such bound."""
    if not is_default_domain(node):
        return None
    if node.op_type == "Mul":
        return _hard_swish_bounds(node, tensor, g)
    if node.op_type == "Relu":
        return 0.0, None
    if node.op_type == "HardSwish":
        return -3.0, None
    if node.op_type == "HardSigmoid":
        alpha = float(node_attribute(node, "alpha", 0.2))
        beta = float(node_attribute(node, "beta", 0.5))
        return (-beta / alpha, (1.0 - beta) / alpha) if alpha > 0 else None
    if node.op_type == "Clip":
        bounds: list[float | None] = []
        for position, attribute in ((1, "min"), (2, "max")):
            name = node.input[position] if len(node.input) > position else ""
            value = g.index.constant(name) if name else node_attribute(node, attribute)
            if name and value is None:
                return None
            bounds.append(None if value is None else float(np.asarray(value).reshape(-1)[0]))
        return bounds[0], bounds[1]
    return None


def saturation_bounds(model: onnx.ModelProto, tensors: Iterable[str]) -> dict[str, tuple[float | None, float | None]]:
    """Return, per tensor read only by saturating activations, the interval those readers distinguish.

    HardSwish (also written ``x * HardSigmoid(x)``) reads every x <= -3 as 0, Relu every
    x <= 0, HardSigmoid(alpha, beta) is constant outside [-beta/alpha, (1-beta)/alpha],
    Clip outside its constant bounds; with several readers the union of their intervals.
    A graph output or a tensor with any other reader gets no entry.
    """
    g = GraphFacts(model)
    result = {}
    for tensor in tensors:
        readers = g.index.consumers.get(tensor, ())
        if not readers or tensor in g.outputs:
            continue
        bounds = [_reader_bounds(r, tensor, g) for r in readers]
        if any(b is None for b in bounds):
            continue
        lows = [b[0] for b in bounds if b is not None]
        highs = [b[1] for b in bounds if b is not None]
        low = None if any(v is None for v in lows) else min(v for v in lows if v is not None)
        high = None if any(v is None for v in highs) else max(v for v in highs if v is not None)
        if low is not None or high is not None:
            result[tensor] = (low, high)
    return result
