"""The plan of ``split_lowrank`` and its surgery: which layers split, their factorizations, the rewrite.

:func:`plan_lowrank` finds the splittable MatMul/Gemm layers and the attention head
pairs, collects their input statistics (two folds when ranks are allocated, so the
expected error is judged on statistics the factorization did not see) and factorizes
each weight; :func:`apply_ranks` writes a model with each layer split at a rank.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.budget import (
    Probe,
    measure_gains,
)
from onnxopt.passes.common.graphs import opset_version
from onnxopt.passes.common.layers import Layer, find_layers
from onnxopt.passes.common.stats import GramSpread, InputStats, collect_input_stats
from onnxopt.passes.lowrank.heads import (
    HeadPair,
    apply_head_ranks,
    find_head_pairs,
    head_error_curve,
    input_moment,
    set_statistics,
)
from onnxopt.passes.lowrank.ranks import (
    Factorization,
    RankCandidate,
    WidthCandidate,
    factorize,
    held_out_error,
    max_rank,
    shrinkage_intensity,
    split_factors,
)

from onnxopt.graph import GraphIndex, NameGenerator, node_attribute, remove_unused, set_initializer
from onnxopt.pipeline import Context
from onnxopt.progress import Progress

__all__ = ["SplitPlan", "apply_ranks", "plan_lowrank"]


@dataclass
class SplitPlan:
    """The splittable layers of a model with their weights (``k×n``) and factorizations.

    With :attr:`pairs` (attention heads whose query/key projections are narrowed
    jointly, :mod:`.heads`) a rank vector has one entry per layer then one
    head width per pair (0 = unchanged); the projections of a pair are not layers.
    """

    layers: list[Layer]
    weights: list[np.ndarray]
    factorizations: list[Factorization]
    limits: list[int]
    notes: list[str]

    gains: list[float] | None = None
    expected_errors: list[np.ndarray] | None = None
    pairs: list[HeadPair] = field(default_factory=list)
    pair_errors: list[np.ndarray] = field(default_factory=list)
    pair_limits: list[int] = field(default_factory=list)
    pair_expected: list[np.ndarray] | None = None

    def candidates(self) -> list[RankCandidate | WidthCandidate]:
        """Return the allocation view of every layer then pair (weighted by measured sensitivity if known).

        The error curves are the cross-validated ones when known: the calibration curves
        of a whitened split flatter it most where it overfits most.
        """
        gains = self.gains or [1.0] * (len(self.layers) + len(self.pairs))
        curves = self.expected_errors or [f.relative_error for f in self.factorizations]
        found: list[RankCandidate | WidthCandidate] = [
            RankCandidate(c, w.shape[0], w.shape[1], lim, g)
            for w, c, lim, g in zip(self.weights, curves, self.limits, gains[: len(self.layers)], strict=True)
        ]
        pair_curves = self.pair_expected or self.pair_errors
        found += [
            WidthCandidate(c, p.params_at(1), p.params, lim, g)
            for p, c, lim, g in zip(self.pairs, pair_curves, self.pair_limits, gains[len(self.layers) :], strict=True)
        ]
        return found

    def measure_sensitivity(
        self, model: onnx.ModelProto, samples: list, *, probe_error: float = 0.02, progress: Progress | None = None
    ) -> None:
        """Set :attr:`gains`: how much of each layer's output error reaches the model outputs.

        Each layer alone is split at the smallest rank losing at most ``probe_error`` of its
        output energy and the model outputs are compared on ``samples``.
        """
        probes: list[Probe] = []
        for i, (fact, limit) in enumerate(zip(self.factorizations, self.limits, strict=True)):
            errors = fact.relative_error[1 : limit + 1]
            if limit < 1:
                probes.append((0.0, lambda: model))
                continue
            rank = int(np.argmax(errors <= probe_error)) + 1 if (errors <= probe_error).any() else limit
            ranks = [0] * len(self.layers)
            ranks[i] = rank
            probes.append((float(fact.relative_error[rank]), functools.partial(apply_ranks, model, self, ranks)))
        for i, (curve, limit) in enumerate(zip(self.pair_errors, self.pair_limits, strict=True)):
            if limit < 1:
                probes.append((0.0, lambda: model))
                continue
            errors = curve[1 : limit + 1]
            width = int(np.argmax(errors <= probe_error)) + 1 if (errors <= probe_error).any() else limit
            ranks = [0] * (len(self.layers) + len(self.pairs))
            ranks[len(self.layers) + i] = width
            probes.append((float(curve[width]), functools.partial(apply_ranks, model, self, ranks)))
        self.gains = measure_gains(model, samples, probes, progress)


def _as_kn(layer: Layer, value: np.ndarray) -> np.ndarray:
    """Return the weight as ``k×n`` (``y = x·W``)."""
    if layer.op_type == "MatMul":
        return value
    if layer.op_type == "Gemm":
        return value.T if layer.trans_b else value
    return value[:, :, 0, 0].T  # 1×1 Conv [O, C, 1, 1]


def _eligible(layer: Layer, index: GraphIndex, min_params: int) -> str | None:
    """Return why ``layer`` must not be split, or None."""
    if layer.size < min_params:
        return f"{layer.size} weights < min_params {min_params}"
    if layer.op_type == "Conv" and (layer.groups != 1 or any(layer.pads) or layer.auto_pad not in ("NOTSET", "VALID")):
        return "only unpadded 1×1 Convs with group 1 are split"
    if len(index.consumers.get(layer.weight, [])) > 1 or layer.weight in index.outputs:
        return f"weight {layer.weight!r} is shared with other nodes"
    return None


def _fold_stats(
    model: onnx.ModelProto, ctx: Context, layers: list[Layer], samples: list
) -> list[dict[str, InputStats]]:
    """Return the input statistics (with ``XᵀX``) per layer for each of two interleaved halves of ``samples``."""
    folds = [samples[0::2], samples[1::2]] if len(samples) >= 4 else [samples]
    return [
        {
            key: s
            for key, s in collect_input_stats(
                model, layers, fold, gram=True, spread=True, seed=ctx.seed, progress=ctx.progress
            ).items()
            if s.gram is not None
        }
        for fold in folds
    ]


def _merged(parts: list[InputStats]) -> InputStats:
    """Return the statistics of the union of the folds."""
    first = parts[0]
    return InputStats(
        sum(p.rows for p in parts),
        sum(p.sq_sum for p in parts),
        sum(p.gram for p in parts),
        sum(p.total for p in parts) if first.total is not None else None,
        _summed_spread(parts),
    )


def _summed_spread(parts: list[InputStats]) -> GramSpread | None:
    """Return the gram spread of the union of ``parts``, or None when one lacks it."""
    spreads = [p.spread for p in parts]
    if any(s is None for s in spreads):
        return None
    return functools.reduce(operator.add, spreads)


def _whitening(stats: InputStats, shrinkage: float | None) -> tuple[np.ndarray, float]:
    """Return the layer's mean gram and the shrinkage to apply (estimated when ``shrinkage`` is None)."""
    assert stats.gram is not None
    rows = max(stats.rows, 1)
    s = shrinkage_intensity(stats.gram, rows, stats.spread) if shrinkage is None else shrinkage
    return stats.gram[0] / rows, s


def _pair_limit(pair: HeadPair, min_saving: float) -> int:
    """Return the largest head width below the full one keeping at most ``1 - min_saving`` of the weights."""
    return max(0, min(pair.head_dim - 1, math.floor((1.0 - min_saving) * pair.head_dim + 1e-9)))


def _head_pairs(
    model: onnx.ModelProto, found: list[Layer], index: GraphIndex, min_params: int, notes: list[str]
) -> list[HeadPair]:
    """Return the query/key pairs whose projections are eligible layers (noting those that are not)."""
    by_key = {layer.key: layer for layer in found}
    pairs = []
    for pair in find_head_pairs(model):
        sides = [by_key.get(side.matmul) for side in (pair.query, pair.key)]
        reasons = [
            _eligible(layer, index, min_params) if layer is not None else "not a plain MatMul layer" for layer in sides
        ]
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            notes.append(f"heads {pair.query.matmul} / {pair.key.matmul}: head width kept ({reason})")
            continue
        pairs.append(pair)
    return pairs


def plan_lowrank(
    model: onnx.ModelProto,
    ctx: Context,
    *,
    whiten: bool,
    min_params: int,
    include_conv1x1: bool,
    min_saving: float,
    samples: list | None,
    shrinkage: float | None = None,
    heads: bool = False,
) -> SplitPlan:
    """Find the splittable layers and factorize them (whitened when ``samples`` are given).

    The whitening gram is shrunk towards its diagonal by ``shrinkage``, or, when None, by
    each layer's own :func:`shrinkage_intensity`. With four or more samples the whitened
    error curves are also cross-validated
    between two halves of them (:attr:`SplitPlan.expected_errors`). With ``heads`` and
    ``samples``, matched attention query/key pairs become :attr:`SplitPlan.pairs` (their
    score-error curves cross-validated likewise) and their projections are not layers.
    """
    graph = model.graph
    ops = ("MatMul", "Gemm", "Conv") if include_conv1x1 else ("MatMul", "Gemm")
    found, notes = find_layers(graph, ops)
    index = GraphIndex(graph)
    pairs = _head_pairs(model, found, index, min_params, notes) if heads and samples else []
    paired = {side.matmul for pair in pairs for side in (pair.query, pair.key)}
    layers: list[Layer] = []
    for layer in found:
        if (layer.op_type == "Conv" and layer.kernel != (1, 1)) or layer.key in paired:
            continue
        reason = _eligible(layer, index, min_params)
        if reason is not None:
            notes.append(f"{layer.key}: left dense ({reason})")
            continue
        layers.append(layer)
    weights = [_as_kn(layer, index.constant(layer.weight)) for layer in layers]  # type: ignore[arg-type]
    limits = [max_rank(w.shape[0], w.shape[1], min_saving) for w in weights]
    measured = (layers if whiten else []) + [layer for layer in found if layer.key in paired]
    folds = _fold_stats(model, ctx, measured, list(samples)) if samples and measured else []
    factorizations: list[Factorization] = []
    expected: list[np.ndarray] = []
    for layer, w in zip(layers, weights, strict=True):
        parts = [fold[layer.key] for fold in folds if layer.key in fold] if whiten else []
        if not parts:
            factorizations.append(factorize(w))
            continue
        factorizations.append(factorize(w, *_whitening(_merged(parts), shrinkage)))
        if len(parts) == 2:
            (g_a, s_a), (g_b, s_b) = (_whitening(p, shrinkage) for p in parts)
            curves = [
                held_out_error(w, factorize(w, g_a, s_a), g_b),
                held_out_error(w, factorize(w, g_b, s_b), g_a),
            ]
            expected.append((curves[0] + curves[1]) / 2)
    plan = SplitPlan(layers, weights, factorizations, limits, notes)
    if expected and len(expected) == len(layers):
        plan.expected_errors = expected
    if pairs:
        _plan_pairs(model, plan, pairs, folds, min_saving)
    return plan


def _plan_pairs(
    model: onnx.ModelProto,
    plan: SplitPlan,
    pairs: list[HeadPair],
    folds: list[dict[str, InputStats]],
    min_saving: float,
) -> None:
    """Set the pairs of ``plan`` with their statistics, score-error curves and width limits."""
    keys = [side.matmul for pair in pairs for side in (pair.query, pair.key)]
    set_statistics(model, pairs, {key: _merged([fold[key] for fold in folds]) for key in keys})
    plan.pairs = pairs
    plan.pair_limits = [_pair_limit(pair, min_saving) for pair in pairs]
    plan.pair_errors = [head_error_curve(p.tq, p.tk, p.gram_q, p.gram_k, p.heads) for p in pairs]
    if len(folds) != 2:
        return
    expected = []
    for pair in pairs:
        (q_a, q_b), (k_a, k_b) = (
            [input_moment(fold[side.matmul]) for fold in folds] for side in (pair.query, pair.key)
        )
        curves = [
            head_error_curve(pair.tq, pair.tk, q_a, k_a, pair.heads, q_b, k_b),
            head_error_curve(pair.tq, pair.tk, q_b, k_b, pair.heads, q_a, k_a),
        ]
        expected.append((curves[0] + curves[1]) / 2)
    plan.pair_expected = expected


def apply_ranks(model: onnx.ModelProto, plan: SplitPlan, ranks: list[int]) -> onnx.ModelProto:
    """Return a copy of ``model`` with each planned layer split at its rank (0 = dense).

    Entries after the layers' are the head widths of :attr:`SplitPlan.pairs` (0 = unchanged).
    """
    widths = list(ranks[len(plan.layers) :])
    ranks = list(ranks[: len(plan.layers)])
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    names = NameGenerator(result)
    opset = opset_version(result)
    by_output = {node.output[0]: i for i, node in enumerate(graph.node) if node.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for layer, w, fact, rank in zip(plan.layers, plan.weights, plan.factorizations, ranks, strict=True):
        if rank <= 0:
            continue
        a, b = split_factors(w, fact, rank)
        position = by_output[layer.key]
        node = graph.node[position]
        a_name, b_name, mid = (
            names.fresh(f"{layer.weight}_lowrank_a"),
            names.fresh(f"{layer.weight}_lowrank_b"),
            names.fresh(f"{layer.key}_lowrank"),
        )
        base = node.name or layer.key
        if layer.op_type == "MatMul":
            set_initializer(graph, a_name, a)
            set_initializer(graph, b_name, b)
            first = helper.make_node("MatMul", [node.input[0], a_name], [mid], name=names.fresh(f"{base}_a"))
            second = helper.make_node("MatMul", [mid, b_name], list(node.output), name=names.fresh(f"{base}_b"))
        elif layer.op_type == "Gemm":
            set_initializer(graph, a_name, a)
            set_initializer(graph, b_name, b)
            inputs = [node.input[0], a_name]
            if opset < 11:
                zero = names.fresh(f"{layer.key}_lowrank_zero")
                set_initializer(graph, zero, np.zeros(rank, dtype=np.float32))
                inputs.append(zero)
            first = helper.make_node("Gemm", inputs, [mid], name=names.fresh(f"{base}_a"), transA=int(layer.trans_a))
            attrs = {k: node_attribute(node, k) for k in ("alpha", "beta") if node_attribute(node, k) is not None}
            second = helper.make_node(
                "Gemm", [mid, b_name, *node.input[2:]], list(node.output), name=names.fresh(f"{base}_b"), **attrs
            )
        else:
            set_initializer(graph, a_name, a.T[:, :, None, None])
            set_initializer(graph, b_name, b.T[:, :, None, None])
            strides = node_attribute(node, "strides")
            first = helper.make_node(
                "Conv",
                [node.input[0], a_name],
                [mid],
                name=names.fresh(f"{base}_a"),
                kernel_shape=[1, 1],
                **({"strides": strides} if strides else {}),
            )
            second = helper.make_node(
                "Conv",
                [mid, b_name, *node.input[2:]],
                list(node.output),
                name=names.fresh(f"{base}_b"),
                kernel_shape=[1, 1],
            )
        replacements[position] = [first, second]
    if replacements:
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacements.get(i, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        remove_unused(graph)
    if any(widths):
        result = apply_head_ranks(result, plan.pairs, widths + [0] * (len(plan.pairs) - len(widths)))
    return result
