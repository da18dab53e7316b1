"""Low-rank splitting of MatMul/Gemm weights (the ``lowrank`` preset).

A weight ``W`` (``k×n``) is replaced by two thinner factors ``A`` (``k×r``) and ``B``
(``r×n``), so ``x·W`` becomes ``(x·A)·B``; the math lives in :mod:`.ranks`, the plan
(layers, statistics, factorizations) and the rewrite in :mod:`.plan`.
The query and key projections of attention heads are instead narrowed jointly to a
smaller head width (:mod:`.heads`), in the same budgeted allocation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import onnx
from onnxopt.passes.common.budget import (
    SENSITIVITY_SAMPLES,
    BudgetSpec,
    budget_tolerance,
    describe_budget,
    final_verdict,
    search_largest,
    search_smallest,
)
from onnxopt.passes.common.estimate import DEFAULT_FOLDS, PlanCheck, plan_check
from onnxopt.passes.lowrank.heads import find_head_pairs, unmatched_score_matmuls
from onnxopt.passes.lowrank.plan import SplitPlan, apply_ranks, plan_lowrank
from onnxopt.passes.lowrank.ranks import allocate_ranks, rank_for_energy

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

__all__ = ["SplitLowRank"]

log = logging.getLogger(__name__)


def _layer_rows(plan: SplitPlan, ranks: list[int]) -> tuple[dict[str, int | float], list[str]]:
    """Return totals and one note per changed layer (rank, params and MACs per row, output error) and pair."""
    before = after = 0
    lines = []
    widths = ranks[len(plan.layers) :]
    ranks = ranks[: len(plan.layers)]
    for layer, w, fact, rank in zip(plan.layers, plan.weights, plan.factorizations, ranks, strict=True):
        k, n = w.shape
        kept = rank * (k + n) if rank else k * n
        before += k * n
        after += kept
        if rank:
            error = float(fact.relative_error[rank])
            kind = "output" if fact.whitened else "weight"
            lines.append(
                f"{layer.key}: rank {rank} of {min(k, n)}, params/MACs per row {k * n} -> {kept}, "
                f"relative {kind} error {error:.2e}"
            )
    curves = plan.pair_expected or plan.pair_errors
    for pair, curve, width in zip(plan.pairs, curves, widths, strict=True):
        kept = pair.params_at(width) if width else pair.params
        before += pair.params
        after += kept
        head = f"heads {pair.query.matmul} / {pair.key.matmul}"
        if width:
            lines.append(
                f"{head}: query/key head width {width} of {pair.head_dim} ({pair.heads} heads), "
                f"params/MACs per row {pair.params} -> {kept}, expected relative score error "
                f"{float(curve[width]):.2e}"
            )
        else:
            lines.append(f"{head}: head width {pair.head_dim} kept ({pair.heads} heads, {pair.params} params)")
    stats: dict[str, int | float] = {
        "layers_split": sum(1 for r in ranks if r),
        "layers_considered": len(ranks),
        "params_before": before,
        "params_after": after,
        "params_saved": before - after,
    }
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
       output cosine, a table sets Tolerance fields), each price judged ``folds``-fold
       cross-fitted over every calibration sample (``passes/common/estimate.py``; the
       held-out quarter with fewer than ``2·folds`` samples).
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

    def __init__(
        self,
        *,
        rank: int | None = None,
        energy: float | None = None,
        budget: BudgetSpec = None,
        whiten: bool = True,
        min_params: int = 16384,
        include_conv1x1: bool = False,
        min_saving: float = 0.1,
        heads: bool = True,
        folds: int = DEFAULT_FOLDS,
    ) -> None:
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
        self.folds = folds

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Plan, choose ranks, judge them cross-fitted, and rewrite."""
        if self.rank is None and self.energy is None and ctx.calibration is None:
            raise CalibrationDataError(
                "split_lowrank needs calibration data (--calib) to choose ranks under its error budget, "
                "or an explicit --rank or --energy"
            )
        calibrated = ctx.calibration is not None and len(ctx.calibration) > 0
        allocate = self.rank is None and self.energy is None and calibrated

        def fit(samples: Dataset | None) -> SplitPlan:
            plan = plan_lowrank(
                model,
                ctx,
                whiten=self.whiten,
                min_params=self.min_params,
                include_conv1x1=self.include_conv1x1,
                min_saving=self.min_saving,
                samples=list(samples) if samples is not None else None,
                heads=self.heads and allocate,
            )
            if allocate and samples is not None and (plan.layers or plan.pairs):
                plan.measure_sensitivity(model, list(samples)[:SENSITIVITY_SAMPLES], progress=ctx.progress)
            return plan

        check: PlanCheck[SplitPlan] | None = None
        if calibrated:
            assert ctx.calibration is not None
            plan, check = plan_check(model, ctx.calibration, fit, budget_tolerance(self.budget, ctx.budget), self.folds)
        else:
            plan = fit(None)
        notes = list(plan.notes)
        notes += self._head_notes(model, plan, allocate)
        if not plan.layers and not plan.pairs:
            return PassResult(model, False, {"layers_split": 0}, [*notes, "no layer worth splitting"])
        choice = self._choose(plan, model, check, notes)
        ranks = choice(plan)
        if not any(ranks):
            return PassResult(
                model,
                False,
                {"layers_split": 0, **({"checks": check.evaluations} if check else {})},
                [*notes, "no split fits the budget and saves parameters"],
            )
        result = apply_ranks(model, plan, ranks)
        stats, lines = _layer_rows(plan, ranks)
        if check is not None:
            verdict, verdict_notes = final_verdict(check, lambda p: apply_ranks(model, p, choice(p)))
            stats.update(verdict, checks=check.evaluations)
            lines += verdict_notes
        return PassResult(result, True, stats, notes + lines)

    def _head_notes(self, model: onnx.ModelProto, plan: SplitPlan, allocate: bool) -> list[str]:
        """Return notes on attention heads left to the ordinary path, where there are any."""
        if not self.heads:
            return []
        if not allocate:
            found = find_head_pairs(model)
            return (
                [
                    f"{len(found)} attention query/key pair(s) split as ordinary layers: head widths are "
                    "narrowed only when ranks are allocated under the budget (calibration data, no rank/energy)"
                ]
                if found
                else []
            )
        return [
            f"attention scores {name}: query/key projections not matched as heads, split as ordinary layers"
            for name in unmatched_score_matmuls(model, plan.pairs)
        ]

    def _fixed_ranks(self, plan: SplitPlan, notes: list[str] | None = None) -> list[int]:
        """Return the ranks an explicit ``rank`` or ``energy`` asks of ``plan``'s layers (0: dense)."""
        ranks = []
        for layer, fact, limit in zip(plan.layers, plan.factorizations, plan.limits, strict=True):
            wanted = self.rank if self.rank is not None else rank_for_energy(fact.energy, self.energy or 1.0)
            if wanted > limit:
                if notes is not None:
                    notes.append(f"{layer.key}: left dense (rank {wanted} would not save {self.min_saving:.0%})")
                wanted = 0
            ranks.append(wanted)
        return ranks

    def _choose(
        self, plan: SplitPlan, model: onnx.ModelProto, check: PlanCheck[SplitPlan] | None, notes: list[str]
    ) -> Choice:
        """Return the chosen ranks as a function of a plan (the shipped one or a fold's)."""
        if self.rank is not None or self.energy is not None:
            self._fixed_ranks(plan, notes)
            return self._fixed_ranks if check is None else _back_off(plan, model, self._fixed_ranks, check, notes)
        assert check is not None
        shipped = plan.candidates()
        best: tuple[int, float] | None = None  # (parameters of the shipped plan's ranks, price)

        def fits(log_price: float) -> bool:
            nonlocal best
            price = math.exp(log_price)
            ranks = allocate_ranks(shipped, price)
            if not any(ranks):
                return True
            passed, summary = check(lambda p: apply_ranks(model, p, allocate_ranks(p.candidates(), price)))
            log.info(
                "split_lowrank: price %.3g, %d layers split: %s (%s)",
                price,
                sum(1 for r in ranks if r),
                passed,
                summary,
            )
            params = sum(c.params(r) for c, r in zip(shipped, ranks, strict=True))
            if passed and (best is None or params < best[0]):
                best = (params, price)
            return passed

        search_largest(fits, math.log(1e-5), math.log(10.0), steps=10)
        notes.append(
            f"ranks allocated by output-error curves under the budget ({describe_budget(check.budget)}, {check.label})"
        )
        if best is None:
            return lambda p: [0] * len(p.candidates())
        price = best[1]
        return lambda p: allocate_ranks(p.candidates(), price)


#: Ranks as a function of the plan they are allocated on: one per candidate (0: dense).
Choice = Callable[[SplitPlan], list[int]]


def _back_off(
    plan: SplitPlan, model: onnx.ModelProto, chosen: Choice, check: PlanCheck[SplitPlan], notes: list[str]
) -> Choice:
    """Restore the most sensitive layers to dense until the budget holds (bisection on the count).

    Each plan restores its own layers of largest relative error, the same count.
    """

    def with_dense(count: int) -> Choice:
        def restored(p: SplitPlan) -> list[int]:
            ranks = chosen(p)
            order = sorted(
                (i for i, r in enumerate(ranks) if r),
                key=lambda i: -float(p.factorizations[i].relative_error[ranks[i]]),
            )
            dense = set(order[:count])
            return [0 if i in dense else r for i, r in enumerate(ranks)]

        return restored

    def fits(count: int) -> bool:
        return check(lambda p: apply_ranks(model, p, with_dense(count)(p)))[0]

    if fits(0):
        return chosen
    total = sum(1 for r in chosen(plan) if r)
    count = search_smallest(fits, 0, total)  # all restored passes; the fewest restored that passes
    notes.append(f"kept {count} of {total} layers dense to stay within the budget")
    return with_dense(count)
