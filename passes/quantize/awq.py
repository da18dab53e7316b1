"""Activation-aware input scaling (AWQ-style) of the low-bit weights: plan the scales, then the graph surgery.

A layer computes ``y = x Wᵀ``; for any positive per-input-channel ``s`` [K] it equally
computes ``y = (x / s) (W·diag(s))ᵀ``. Rounding ``W·diag(s)`` instead of ``W`` gives the
input channels with large activations (large ``s``) a finer grid relative to their
weights, which is what their larger share of the output error asks for (Lin et al.,
2023). ``s = rms(x)^α`` with ``α`` chosen per activation by :func:`nbits_math.awq_search`
on the calibration inputs' ``H = E[x xᵀ]`` (``α = 0``, no scaling, is one candidate, so
the plan is never worse than RTN on those inputs).

Rules (:func:`plan_input_scales`):

1. the layers (MatMul/Gemm sites) that read one activation share one ``s``, since the
   input is divided once; a site is eligible when its weight has no other reader and its
   input statistics have a finite ``H``;
2. an activation is left alone unless its best ``α`` lowers that error by at least 10 %
   (``_MIN_GAIN``): an inserted ``Mul`` costs a pass over the activation, not worth the
   gains that 32 samples of i.i.d. inputs show by chance;
3. nor when its statistics hold fewer rows than it has features: ``H`` is then singular
   and the search fits those few rows rather than the layer.

Surgery (:func:`apply_input_scales`): the division by ``s`` is folded into the producer
when it is a ``Mul`` by a constant whose last axis is ``K`` or 1 (a norm's gamma, GELU's
``0.5``) and nothing but the scaled layers reads its output; otherwise a ``Mul`` by
``1/s`` is inserted before the first scaled layer and only the scaled layers read it
(AWQ's own ``ScaledActivation`` where no fold exists). The float model is unchanged by
the surgery together with the scaled weights, up to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.common.stats import InputStats
from onnxopt.passes.quantize.nbits_math import awq_search
from onnxopt.passes.quantize.nbits_rewrite import Site

from onnxopt.external import replace_initializer
from onnxopt.graph import GraphIndex, NameGenerator

__all__ = ["InputScale", "apply_input_scales", "plan_input_scales", "scaled_site", "scaled_stats"]

log = logging.getLogger(__name__)

_MIN_GAIN = 0.9  # the error ratio (with s / without) an activation's scale must reach to be applied


@dataclass(frozen=True)
class InputScale:
    """The scale ``s`` [K] of one activation and the sites (by key) whose weights become ``W·diag(s)``."""

    activation: str
    scale: np.ndarray
    readers: tuple[str, ...]
    alpha: float
    error_ratio: float  # summed RTN output error with s over that without

    def restricted(self, keys: Container[str]) -> InputScale | None:
        """Return the plan for the readers in ``keys`` only (the others stay float, unscaled), or None."""
        readers = tuple(key for key in self.readers if key in keys)
        return dataclasses.replace(self, readers=readers) if readers else None


def scaled_site(site: Site, scale: np.ndarray) -> Site:
    """Return ``site`` with its ``[N, K]`` matrix multiplied column-wise by ``scale``."""
    return dataclasses.replace(site, matrix=(site.matrix * scale[None, :]).astype(np.float32))


def scaled_stats(stats: InputStats, scale: np.ndarray) -> InputStats:
    """Return the statistics of ``x / scale`` from those of ``x`` (``H' = D⁻¹ H D⁻¹``)."""
    inverse = 1.0 / scale
    gram = None if stats.gram is None else stats.gram * inverse[None, :, None] * inverse[None, None, :]
    total = None if stats.total is None else stats.total * inverse[None, :]
    return InputStats(stats.rows, stats.sq_sum * inverse[None, :] ** 2, gram, total)


def plan_input_scales(
    sites: Sequence[Site],
    stats: Mapping[str, InputStats],
    bits_of: Mapping[str, int],
    block: int,
    *,
    symmetric: bool,
    shared_weights: set[str],
) -> list[InputScale]:
    """Return the input scales worth applying (rules 1-3 of the module docstring).

    ``bits_of`` gives each site's bit width (the search rounds at that width);
    ``shared_weights`` are weights with several readers, which cannot be rescaled for one.
    """
    groups: dict[str, list[Site]] = {}
    for site in sites:
        if site.op_type == "Gather" or not site.activation or site.weight in shared_weights:
            continue
        entry = stats.get(site.key)
        if entry is None or entry.mean_gram is None or not np.isfinite(entry.mean_gram).all():
            continue
        if entry.rows < entry.mean_gram.shape[-1]:
            continue
        groups.setdefault(site.activation, []).append(site)
    plans: list[InputScale] = []
    for activation, members in groups.items():
        by_bits: dict[int, list[Site]] = {}
        for site in members:
            by_bits.setdefault(bits_of[site.key], []).append(site)
        entry = stats[members[0].key]
        gram = entry.mean_gram[0]
        rms = entry.norms[0]
        # one s for the activation, scored by the summed error of every reader at its own width
        scale, alpha, ratio = _search_shared(by_bits, gram, rms, block, symmetric)
        if alpha == 0.0 or not ratio <= _MIN_GAIN:
            continue
        plans.append(InputScale(activation, scale, tuple(s.key for s in members), alpha, ratio))
    return plans


def _search_shared(
    by_bits: Mapping[int, list[Site]], gram: np.ndarray, rms: np.ndarray, block: int, symmetric: bool
) -> tuple[np.ndarray, float, float]:
    """Return ``awq_search``'s (s, α, ratio) over readers of several bit widths (the widest group decides)."""
    bits, members = max(by_bits.items(), key=lambda item: sum(s.matrix.size for s in item[1]))
    weights = [np.asarray(s.matrix, dtype=np.float32) for s in members]
    return awq_search(weights, [gram] * len(weights), rms, bits, block, symmetric=symmetric)


def _foldable_mul(node: onnx.NodeProto, index: GraphIndex, k: int) -> tuple[int, np.ndarray] | None:
    """Return (position, value) of a Mul's constant operand whose last axis is ``k`` or 1, or None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return None
    for position in (1, 0):
        name = node.input[position]
        value = index.constant(name)
        other = node.input[1 - position]
        if value is None or index.is_constant(other) or value.dtype != np.float32:
            continue
        fits = value.ndim == 0 or value.shape[-1] in (1, k)
        if fits and len(index.consumers.get(name, [])) == 1 and name not in index.outputs:
            return position, value
    return None


def apply_input_scales(model: onnx.ModelProto, plans: Sequence[InputScale]) -> dict[str, int]:
    """Divide each planned activation by its ``s`` for its scaled readers, in place; return counts.

    The readers' weights must be replaced by ``W·diag(s)`` (the rewrite does, from the
    scaled sites) for the model to compute what it did.
    """
    graph = model.graph
    counts = {"awq_folded": 0, "awq_inserted": 0}
    if not plans:
        return counts
    names = NameGenerator(model)
    index = GraphIndex(graph)
    by_output = {node.output[0]: node for node in graph.node if node.output}
    inserted: dict[int, list[onnx.NodeProto]] = {}  # position in graph.node -> Mul nodes to put before it
    positions = {id(node): i for i, node in enumerate(graph.node)}
    for plan in plans:
        readers = [by_output[key] for key in plan.readers if key in by_output]
        inverse = (1.0 / plan.scale).astype(np.float32)
        producer = index.producer.get(plan.activation)
        consumers = index.consumers.get(plan.activation, [])
        exclusive = plan.activation not in index.outputs and {id(n) for n in consumers} == {id(n) for n in readers}
        fold = _foldable_mul(producer, index, len(inverse)) if producer is not None and exclusive else None
        if fold is not None:
            position, value = fold
            folded = (value * inverse.reshape((1,) * max(value.ndim - 1, 0) + (-1,))).astype(np.float32)
            name = names.fresh(f"{producer.input[position]}_awq")  # type: ignore[union-attr]
            replace_initializer(graph, name, folded)
            producer.input[position] = name  # type: ignore[union-attr]
            counts["awq_folded"] += 1
            continue
        factor = names.fresh(f"{plan.activation}_awq_scale")
        scaled = names.fresh(f"{plan.activation}_awq")
        replace_initializer(graph, factor, inverse)
        first = min(positions[id(node)] for node in readers)
        inserted.setdefault(first, []).append(
            onnx.helper.make_node("Mul", [plan.activation, factor], [scaled], name=names.fresh("awq_input_scale"))
        )
        for node in readers:
            node.input[0] = scaled
        counts["awq_inserted"] += 1
    if inserted:
        nodes = list(graph.node)
        ordered: list[onnx.NodeProto] = []
        for i, node in enumerate(nodes):
            ordered.extend(inserted.get(i, []))
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)
    return counts
