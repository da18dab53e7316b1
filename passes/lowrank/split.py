"""Low-rank splitting of MatMul/Gemm weights (the ``lowrank`` preset).

A weight ``W`` (``k×n``) is replaced by two thinner factors ``A`` (``k×r``) and ``B``
(``r×n``), so ``x·W`` becomes ``(x·A)·B``; the math lives in :mod:`.ranks`.
The query and key projections of attention heads are instead narrowed jointly to a
smaller head width (:mod:`.heads`), in the same budgeted allocation.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.budget import (
    BudgetSpec,
    HeldOutCheck,
    Probe,
    budget_tolerance,
    describe_budget,
    measure_gains,
    search_largest,
    search_smallest,
)
from onnxopt.passes.common.graphs import opset_version
from onnxopt.passes.common.layers import Layer, find_layers
from onnxopt.passes.common.stats import InputStats, collect_input_stats
from onnxopt.passes.lowrank.heads import (
    HeadPair,
    apply_head_ranks,
    find_head_pairs,
    head_error_curve,
    input_moment,
    set_statistics,
    unmatched_score_matmuls,
)
from onnxopt.passes.lowrank.ranks import (
    SHRINKAGE,
    Factorization,
    RankCandidate,
    WidthCandidate,
    allocate_ranks,
    factorize,
    held_out_error,
    max_rank,
    rank_for_energy,
    split_factors,
)

from onnxopt.errors import CalibrationDataError
from onnxopt.graph import GraphIndex, NameGenerator, node_attribute, remove_unused, set_initializer
from onnxopt.pipeline import Context, Pass, PassResult, register_pass
from onnxopt.progress import Progress

__all__ = ["SplitLowRank", "SplitPlan", "plan_lowrank"]
from onnxopt.passes.common.budget import SENSITIVITY_SAMPLES

log = logging.getLogger(__name__)



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
            for w, c, lim, g in zip(self.weights, curves, self.limits, gains[:len(self.layers)], strict=True)]
        pair_curves = self.pair_expected or self.pair_errors
        found += [WidthCandidate(c, p.params_at(1), p.params, lim, g)
                  for p, c, lim, g in zip(self.pairs, pair_curves, self.pair_limits, gains[len(self.layers):],
                                          strict=True)]
        return found

    def measure_sensitivity(self, model: onnx.ModelProto, samples: list, *, probe_error: float = 0.02,
                            progress: Progress | None = None) -> None:
        """Set :attr:`gains`: how much of each layer's output error reaches the model outputs.

        Each layer alone is split at the smallest rank losing at most ``probe_error`` of its
        output energy and the model outputs are compared on ``samples``.
        """
        probes: list[Probe] = []
        for i, (fact, limit) in enumerate(zip(self.factorizations, self.limits, strict=True)):
            errors = fact.relative_error[1:limit + 1]
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
            errors = curve[1:limit + 1]
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
    if layer.op_type == "Conv" and (layer.groups != 1 or any(layer.pads) or
                                    layer.auto_pad not in ("NOTSET", "VALID")):
        return "only unpadded 1×1 Convs with group 1 are split"
    if len(index.consumers.get(layer.weight, [])) > 1 or layer.weight in index.outputs:
        return f"weight {layer.weight!r} is shared with other nodes"
    return None


def _fold_stats(model: onnx.ModelProto, ctx: Context, layers: list[Layer],
                samples: list) -> list[dict[str, InputStats]]:
    """Return the input statistics (with ``XᵀX``) per layer for each of two interleaved halves of ``samples``."""
    folds = [samples[0::2], samples[1::2]] if len(samples) >= 4 else [samples]
    return [{key: s for key, s in collect_input_stats(model, layers, fold, gram=True, seed=ctx.seed,
                                                       progress=ctx.progress).items() if s.gram is not None}
            for fold in folds]


def _merged(parts: list[InputStats]) -> InputStats:
    """Return the statistics of the union of the folds."""
    first = parts[0]
    return InputStats(sum(p.rows for p in parts), sum(p.sq_sum for p in parts),
                      sum(p.gram for p in parts),
                      sum(p.total for p in parts) if first.total is not None else None)


def _pair_limit(pair: HeadPair, min_saving: float) -> int:
    """Return the largest head width below the full one keeping at most ``1 - min_saving`` of the weights."""
    return max(0, min(pair.head_dim - 1, math.floor((1.0 - min_saving) * pair.head_dim + 1e-9)))


def _head_pairs(model: onnx.ModelProto, found: list[Layer], index: GraphIndex, min_params: int,
                notes: list[str]) -> list[HeadPair]:
    """Return the query/key pairs whose projections are eligible layers (noting those that are not)."""
    by_key = {layer.key: layer for layer in found}
    pairs = []
    for pair in find_head_pairs(model):
        sides = [by_key.get(side.matmul) for side in (pair.query, pair.key)]
        reasons = [_eligible(layer, index, min_params) if layer is not None else "not a plain MatMul layer"
                   for layer in sides]
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            notes.append(f"heads {pair.query.matmul} / {pair.key.matmul}: head width kept ({reason})")
            continue
        pairs.append(pair)
    return pairs


def plan_lowrank(model: onnx.ModelProto, ctx: Context, *, whiten: bool, min_params: int,
                 include_conv1x1: bool, min_saving: float, samples: list | None,
                 shrinkage: float = SHRINKAGE, heads: bool = False) -> SplitPlan:
    """Find the splittable layers and factorize them (whitened when ``samples`` are given).

    With four or more samples the whitened error curves are also cross-validated
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
        rows = sum(p.rows for p in parts)
        factorizations.append(factorize(w, sum(p.gram[0] for p in parts) / max(rows, 1), shrinkage))
        if len(parts) == 2:
            g_a, g_b = (p.gram[0] / max(p.rows, 1) for p in parts)
            curves = [held_out_error(w, factorize(w, g_a, shrinkage), g_b),
                      held_out_error(w, factorize(w, g_b, shrinkage), g_a)]
            expected.append((curves[0] + curves[1]) / 2)
    plan = SplitPlan(layers, weights, factorizations, limits, notes)
    if expected and len(expected) == len(layers):
        plan.expected_errors = expected
    if pairs:
        _plan_pairs(model, plan, pairs, folds, min_saving)
    return plan


def _plan_pairs(model: onnx.ModelProto, plan: SplitPlan, pairs: list[HeadPair],
                folds: list[dict[str, InputStats]], min_saving: float) -> None:
    """Set the pairs of ``plan`` with their statistics, score-error curves and width limits."""
    keys = [side.matmul for pair in pairs for side in (pair.query, pair.key)]
    set_statistics(model, pairs, {key: _merged([fold[key] for fold in folds]) for key in keys})
    plan.pairs = pairs
    plan.pair_limits = [_pair_limit(pair, min_saving) for pair in pairs]
    plan.pair_errors = [head_error_curve(p.tq, p.tk, p.gram_q, p.gram_k, p.heads)
                        for p in pairs]
    if len(folds) != 2:
        return
    expected = []
    for pair in pairs:
        (q_a, q_b), (k_a, k_b) = ([input_moment(fold[side.matmul]) for fold in folds]
                                  for side in (pair.query, pair.key))
        curves = [head_error_curve(pair.tq, pair.tk, q_a, k_a, pair.heads, q_b, k_b),
                  head_error_curve(pair.tq, pair.tk, q_b, k_b, pair.heads, q_a, k_a)]
        expected.append((curves[0] + curves[1]) / 2)
    plan.pair_expected = expected


def apply_ranks(model: onnx.ModelProto, plan: SplitPlan, ranks: list[int]) -> onnx.ModelProto:
    """Return a copy of ``model`` with each planned layer split at its rank (0 = dense).

    Entries after the layers' are the head widths of :attr:`SplitPlan.pairs` (0 = unchanged).
    """
    widths = list(ranks[len(plan.layers):])
    ranks = list(ranks[:len(plan.layers)])
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
        a_name, b_name, mid = names.fresh(f"{layer.weight}_lowrank_a"), names.fresh(f"{layer.weight}_lowrank_b"), \
            names.fresh(f"{layer.key}_lowrank")
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
            first = helper.make_node("Gemm", inputs, [mid], name=names.fresh(f"{base}_a"),
                                     transA=int(layer.trans_a))
            attrs = {k: node_attribute(node, k) for k in ("alpha", "beta") if node_attribute(node, k) is not None}
            second = helper.make_node("Gemm", [mid, b_name, *node.input[2:]], list(node.output),
                                      name=names.fresh(f"{base}_b"), **attrs)
        else:
            set_initializer(graph, a_name, a.T[:, :, None, None])
            set_initializer(graph, b_name, b.T[:, :, None, None])
            strides = node_attribute(node, "strides")
            first = helper.make_node("Conv", [node.input[0], a_name], [mid], name=names.fresh(f"{base}_a"),
                                     kernel_shape=[1, 1], **({"strides": strides} if strides else {}))
            second = helper.make_node("Conv", [mid, b_name, *node.input[2:]], list(node.output),
                                      name=names.fresh(f"{base}_b"), kernel_shape=[1, 1])
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


def _layer_rows(plan: SplitPlan, ranks: list[int]) -> tuple[dict[str, int | float], list[str]]:
    """Return totals and one note per changed layer (rank, params and MACs per row, output error) and pair."""
    before = after = 0
    lines = []
    widths = ranks[len(plan.layers):]
    ranks = ranks[:len(plan.layers)]
    for layer, w, fact, rank in zip(plan.layers, plan.weights, plan.factorizations, ranks, strict=True):
        k, n = w.shape
        kept = rank * (k + n) if rank else k * n
        before += k * n
        after += kept
        if rank:
            error = float(fact.relative_error[rank])
            kind = "output" if fact.whitened else "weight"
            lines.append(f"{layer.key}: rank {rank} of {min(k, n)}, params/MACs per row {k * n} -> {kept}, "
                         f"relative {kind} error {error:.2e}")
    curves = plan.pair_expected or plan.pair_errors
    for pair, curve, width in zip(plan.pairs, curves, widths, strict=True):
        kept = pair.params_at(width) if width else pair.params
        before += pair.params
        after += kept
        head = f"heads {pair.query.matmul} / {pair.key.matmul}"
        if width:
            lines.append(f"{head}: query/key head width {width} of {pair.head_dim} ({pair.heads} heads), "
                         f"params/MACs per row {pair.params} -> {kept}, expected relative score error "
                         f"{float(curve[width]):.2e}")
        else:
            lines.append(f"{head}: head width {pair.head_dim} kept ({pair.heads} heads, {pair.params} params)")
    stats: dict[str, int | float] = {"layers_split": sum(1 for r in ranks if r), "layers_considered": len(ranks),
                                     "params_before": before, "params_after": after, "params_saved": before - after}
    if plan.pairs:
        stats |= {"head_pairs": len(plan.pairs), "head_pairs_narrowed": sum(1 for w in widths if w)}
    return stats, lines


@register_pass
class SplitLowRank(Pass):
    """Split MatMul/Gemm (optionally 1×1 Conv) weights into two low-rank factors.

    Rules:

    1. Matches MatMul with a constant 2-D right-hand side (any batch dims on the left),
       Gemm with a constant B (any transA/transB/alpha/beta/bias) and, with
       ``include_conv1x1``, unpadded 1×1 Conv with group 1. Weights may be initializers
       or Constant nodes.
    2. Produces ``MatMul(MatMul(x, A), B)`` (Gemm: a Gemm without bias, then a Gemm with
       the original alpha, beta and bias; Conv: two 1×1 Convs, the bias on the second).
    3. Ranks: ``rank`` for every layer, or the smallest rank keeping ``energy`` of Σσ²
       (of the whitened spectrum when calibration data is present and ``whiten``), or,
       with calibration data and neither given, ranks allocated across layers by their
       output-error curves (cross-validated between two halves of the calibration
       samples, ``XᵀX`` shrunk towards its diagonal) and measured sensitivities under
       ``budget`` (default: the harness's ``int8`` profile; a float sets the minimum
       output cosine, a table sets Tolerance fields), searched on held-out calibration
       samples.
    4. With ``heads`` (default) and budgeted ranks, the query and key projections of
       each attention block (``MatMul [→ Add] → Reshape(.., H, d) → Transpose`` on both
       sides of the score MatMul) are not split: both are narrowed to a head width
       ``r < d`` by the joint low rank of each head's ``q·kᵀ`` form (no extra layer).
       Each pair is one more candidate of the same allocation (its cross-validated
       score-error curve weighted by its measured sensitivity) and the held-out check
       judges the whole model. ``heads=False``: the projections are ordinary layers.
    5. Must not fire: layers under ``min_params`` weights; weights shared with other
       nodes; ranks whose factors would not save at least ``min_saving`` of the layer's
       parameters (and multiply-adds); layers in nested graphs. An explicit rank or energy
       that breaks the budget backs off, most sensitive layers first, to dense.
    """

    name = "split_lowrank"
    exact = False
    profile = "int8"

    def __init__(self, *, rank: int | None = None, energy: float | None = None, budget: BudgetSpec = None,
                 whiten: bool = True, min_params: int = 16384, include_conv1x1: bool = False,
                 min_saving: float = 0.1, heads: bool = True) -> None:
        if rank is not None and rank < 1:
            raise ValueError("rank must be at least 1")
        if energy is not None and not 0 < energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        if not 0 <= min_saving < 1:
            raise ValueError("min_saving must be in [0, 1)")
        self.rank = rank
        self.energy = energy
        self.budget = budget
        self.whiten = whiten
        self.min_params = min_params
        self.include_conv1x1 = include_conv1x1
        self.min_saving = min_saving
        self.heads = heads

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Plan, choose ranks, check them on held-out samples, and rewrite."""
        if self.rank is None and self.energy is None and ctx.calibration is None:
            raise CalibrationDataError(
                "split_lowrank needs calibration data (--calib) to choose ranks under its error budget, "
                "or an explicit --rank or --energy"
            )
        calibration = held_out = None
        if ctx.calibration is not None and len(ctx.calibration):
            calibration, held_out = ctx.calibration.split()
        allocate = self.rank is None and self.energy is None and bool(held_out)
        plan = plan_lowrank(model, ctx, whiten=self.whiten, min_params=self.min_params,
                            include_conv1x1=self.include_conv1x1, min_saving=self.min_saving,
                            samples=list(calibration) if calibration is not None else None,
                            heads=self.heads and allocate)
        notes = list(plan.notes)
        notes += self._head_notes(model, plan, allocate)
        if not plan.layers and not plan.pairs:
            return PassResult(model, False, {"layers_split": 0}, [*notes, "no layer worth splitting"])
        budget = budget_tolerance(self.budget, ctx.budget)
        check = HeldOutCheck(model, held_out, budget, fitted=list(calibration or ())) if held_out else None
        if check is not None and calibration is not None and allocate:
            plan.measure_sensitivity(model, list(calibration)[:SENSITIVITY_SAMPLES], progress=ctx.progress)
        ranks = self._choose(plan, model, check, notes)
        if not any(ranks):
            return PassResult(model, False, {"layers_split": 0, **({"checks": check.evaluations} if check else {})},
                              [*notes, "no split fits the budget and saves parameters"])
        result = apply_ranks(model, plan, ranks)
        stats, lines = _layer_rows(plan, ranks)
        if check is not None:
            stats["checks"] = check.evaluations
        return PassResult(result, True, stats, notes + lines)

    def _head_notes(self, model: onnx.ModelProto, plan: SplitPlan, allocate: bool) -> list[str]:
        """Return notes on attention heads left to the ordinary path, where there are any."""
        if not self.heads:
            return []
        if not allocate:
            found = find_head_pairs(model)
            return [f"{len(found)} attention query/key pair(s) split as ordinary layers: head widths are "
                    "narrowed only when ranks are allocated under the budget (calibration data, no rank/energy)"
                    ] if found else []
        return [f"attention scores {name}: query/key projections not matched as heads, split as ordinary layers"
                for name in unmatched_score_matmuls(model, plan.pairs)]

    def _choose(self, plan: SplitPlan, model: onnx.ModelProto, check: HeldOutCheck | None,
                notes: list[str]) -> list[int]:
        candidates = plan.candidates()
        if self.rank is not None or self.energy is not None:
            ranks = []
            for layer, fact, limit in zip(plan.layers, plan.factorizations, plan.limits, strict=True):
                wanted = self.rank if self.rank is not None else rank_for_energy(fact.energy, self.energy or 1.0)
                if wanted > limit:
                    notes.append(f"{layer.key}: left dense (rank {wanted} would not save {self.min_saving:.0%})")
                    wanted = 0
                ranks.append(wanted)
            return ranks if check is None else self._back_off(plan, model, ranks, check, notes)
        assert check is not None
        best: list[int] = [0] * len(candidates)

        def fits(log_price: float) -> bool:
            nonlocal best
            ranks = allocate_ranks(candidates, math.exp(log_price))
            if not any(ranks):
                return True
            passed, summary = check(apply_ranks(model, plan, ranks))
            log.info("split_lowrank: price %.3g, %d layers split: %s (%s)", math.exp(log_price),
                     sum(1 for r in ranks if r), passed, summary)
            if passed and sum(c.params(r) for c, r in zip(candidates, ranks, strict=True)) < sum(
                    c.params(r) for c, r in zip(candidates, best, strict=True)):
                best = ranks
            return passed

        search_largest(fits, math.log(1e-5), math.log(10.0), steps=10)
        notes.append(f"ranks allocated by output-error curves under the budget ({describe_budget(check.budget)})")
        return best

    def _back_off(self, plan: SplitPlan, model: onnx.ModelProto, ranks: list[int], check: HeldOutCheck,
                  notes: list[str]) -> list[int]:
        """Restore the most sensitive layers to dense until the budget holds (bisection on the count)."""
        order = sorted((i for i, r in enumerate(ranks) if r),
                       key=lambda i: -float(plan.factorizations[i].relative_error[ranks[i]]))

        def with_dense(count: int) -> list[int]:
            restored = set(order[:count])
            return [0 if i in restored else r for i, r in enumerate(ranks)]

        def fits(count: int) -> bool:
            return check(apply_ranks(model, plan, with_dense(count)))[0]

        if fits(0):
            return ranks
        count = search_smallest(fits, 0, len(order))  # all restored passes; the fewest restored that passes
        notes.append(f"kept {count} of {len(order)} layers dense to stay within the budget")
        return with_dense(count)
