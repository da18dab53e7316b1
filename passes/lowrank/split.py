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

import onnx
from onnxopt.passes.common.budget import (
    SENSITIVITY_SAMPLES,
    BudgetSpec,
    HeldOutCheck,
    budget_tolerance,
    describe_budget,
    final_verdict,
    search_largest,
    search_smallest,
)
from onnxopt.passes.lowrank.heads import find_head_pairs, unmatched_score_matmuls
from onnxopt.passes.lowrank.plan import SplitPlan, apply_ranks, plan_lowrank
from onnxopt.passes.lowrank.ranks import allocate_ranks, rank_for_energy

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
        plan = plan_lowrank(
            model,
            ctx,
            whiten=self.whiten,
            min_params=self.min_params,
            include_conv1x1=self.include_conv1x1,
            min_saving=self.min_saving,
            samples=list(calibration) if calibration is not None else None,
            heads=self.heads and allocate,
        )
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
            return PassResult(
                model,
                False,
                {"layers_split": 0, **({"checks": check.evaluations} if check else {})},
                [*notes, "no split fits the budget and saves parameters"],
            )
        result = apply_ranks(model, plan, ranks)
        stats, lines = _layer_rows(plan, ranks)
        if check is not None:
            verdict, verdict_notes = final_verdict(check, result)
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

    def _choose(
        self, plan: SplitPlan, model: onnx.ModelProto, check: HeldOutCheck | None, notes: list[str]
    ) -> list[int]:
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
            log.info(
                "split_lowrank: price %.3g, %d layers split: %s (%s)",
                math.exp(log_price),
                sum(1 for r in ranks if r),
                passed,
                summary,
            )
            if passed and sum(c.params(r) for c, r in zip(candidates, ranks, strict=True)) < sum(
                c.params(r) for c, r in zip(candidates, best, strict=True)
            ):
                best = ranks
            return passed

        search_largest(fits, math.log(1e-5), math.log(10.0), steps=10)
        notes.append(f"ranks allocated by output-error curves under the budget ({describe_budget(check.budget)})")
        return best

    def _back_off(
        self, plan: SplitPlan, model: onnx.ModelProto, ranks: list[int], check: HeldOutCheck, notes: list[str]
    ) -> list[int]:
        """Restore the most sensitive layers to dense until the budget holds (bisection on the count)."""
        order = sorted(
            (i for i, r in enumerate(ranks) if r), key=lambda i: -float(plan.factorizations[i].relative_error[ranks[i]])
        )

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
