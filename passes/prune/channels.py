"""Structured pruning (the ``prune_channels`` preset): whole channels removed.

The graph really shrinks and runs faster.

Groups of channels that must go together live in :mod:`.channel_groups`, their removal
order and the readers' re-fit in :mod:`.channel_math`, costs and the plan in
:mod:`.channel_plan`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx
from onnxopt.passes.common.budget import (
    SENSITIVITY_SAMPLES,
    BudgetSpec,
    budget_tolerance,
    describe_budget,
    final_verdict,
    search_largest,
)
from onnxopt.passes.common.estimate import DEFAULT_FOLDS, PlanCheck, plan_check
from onnxopt.passes.prune.channel_plan import ChannelPlan, build_channel_plan

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

log = logging.getLogger(__name__)


@register_pass
class PruneChannels(Pass):
    """Remove whole channels of Conv / ConvTranspose / MatMul / Gemm layers (structured pruning).

    Rules:

    1. Matches *channel groups* (see :mod:`.channel_groups`): the output channels of
       weight layers followed through BatchNormalization, element-wise activations, pools,
       depthwise Convs and element-wise Add/Mul with constants or with each other
       (residuals and gates join groups, which lose the same channels), up to the layers
       that read them.
    2. Produces a smaller graph: the sources lose output rows (and biases), BatchNormalization,
       depthwise Convs and per-channel constants lose the channels, and every consumer loses
       the matching input channels, its kept weights and bias re-fitted by least squares on
       calibration statistics (a removed channel's mean moves into the bias; MatMul
       consumers get an ``Add``). Channels go in OBS order; groups keep a multiple of
       ``multiple`` channels and at least ``1 − max_ratio`` of them.
    3. Needs calibration data. ``ratio`` is the share of the weight layers' multiply-adds
       to remove; without it the highest share within ``budget`` (as for
       ``prune_magnitude``) is searched, spread over groups by their measured
       sensitivity. Each share is judged ``folds``-fold cross-fitted (every calibration
       sample judged by a plan fitted without it, see ``passes/common/estimate.py``;
       with fewer than ``2·folds`` samples, on the held-out quarter); the shipped plan is
       fitted on every sample.
    4. Must not fire on groups with a graph output, a reader it does not know (Reshape,
       Flatten, Softmax, a Resize of the channel axis, a channel Concat read by anything
       but a weight layer, nested graphs…), a tensor of unknown width, a weight shared with
       other nodes, fewer than ``2·multiple`` channels, or matching ``exclude``; each is
       named in the notes. A reader that saw fewer than 4 calibration rows per input
       feature (squeeze-excitation convs) is not re-fitted across channels: a removed
       channel's mean moves into its bias, nothing more.
    """

    name = "prune_channels"
    exact = False
    profile = "int8"

    def __init__(
        self,
        *,
        ratio: float | None = None,
        multiple: int = 8,
        max_ratio: float = 0.75,
        exclude: Sequence[str] = (),
        budget: BudgetSpec = None,
        folds: int = DEFAULT_FOLDS,
    ) -> None:
        if ratio is not None and not 0 <= ratio < 1:
            raise ValueError("ratio must be in [0, 1)")
        if multiple < 1 or not 0 < max_ratio < 1:
            raise ValueError("multiple must be ≥ 1 and max_ratio in (0, 1)")
        self.ratio = ratio
        self.multiple = multiple
        self.max_ratio = max_ratio
        self.exclude = exclude
        self.budget = budget
        self.folds = folds

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Find groups, order channels, choose counts under the budget, rewrite the graph."""
        if ctx.calibration is None or not len(ctx.calibration):
            raise CalibrationDataError(
                "prune_channels needs calibration data (--calib) to re-fit the layers that read pruned channels"
            )
        budget = budget_tolerance(self.budget, ctx.budget)

        def fit(samples: Dataset) -> ChannelPlan:
            plan = build_channel_plan(
                model,
                list(samples),
                multiple=self.multiple,
                max_ratio=self.max_ratio,
                exclude=list(self.exclude),
                seed=ctx.seed,
                progress=ctx.progress,
            )
            if plan.groups:
                plan.measure_sensitivity(model, list(samples)[:SENSITIVITY_SAMPLES], progress=ctx.progress)
            return plan

        # a graph without prunable groups fits no statistics (build_channel_plan stops first), so folds cost nothing
        plan, check = plan_check(model, ctx.calibration, fit, budget, self.folds)
        notes = list(plan.notes)
        if not plan.groups:
            return PassResult(model, False, {"macs_removed": 0.0}, [*notes, "no channel group to prune"])
        best = self._choose(model, check, notes)
        counts = plan.counts_for(best)
        if not any(counts):
            return PassResult(model, False, {"macs_removed": 0.0}, [*notes, "no channel removal fits the budget"])
        result = plan.apply(model, counts)
        stats, lines = channel_report(plan, counts)
        verdict, verdict_notes = final_verdict(check, lambda p: p.apply(model, p.counts_for(best)))
        stats.update(verdict, checks=check.evaluations)
        return PassResult(result, True, stats, notes + lines + verdict_notes)

    def _choose(self, model: onnx.ModelProto, check: PlanCheck[ChannelPlan], notes: list[str]) -> float:
        """Return the share of multiply-adds to remove: ``ratio`` if it fits, else the largest that does."""

        def fits(fraction: float) -> bool:
            passed, summary = check(lambda p: p.apply(model, p.counts_for(fraction)))
            log.info("prune_channels: MAC share %.4f: %s (%s)", fraction, passed, summary)
            return passed

        if self.ratio is not None:
            if fits(self.ratio):
                return self.ratio
            best = search_largest(fits, 0.0, self.ratio, steps=6)
            notes.append(f"ratio {self.ratio} breaks the budget; backed off to {best:.3f}")
        else:
            best = search_largest(fits, 0.0, 0.5, steps=7)
            notes.append(
                f"highest MAC share within the budget ({describe_budget(check.budget)}, {check.label}): {best:.3f}"
            )
        return best


def channel_report(plan: ChannelPlan, counts: Sequence[int]) -> tuple[dict[str, int | float], list[str]]:
    """Return totals and one note per pruned group (channels removed, source layers)."""
    lines = []
    for group_plan, count in zip(plan.groups, counts, strict=True):
        if count:
            group = group_plan.group
            layers = ", ".join(n.output[0] for n in group.sources)
            lines.append(f"{group.key}: removed {count} of {group.channels} channels ({layers})")
    stats: dict[str, int | float] = {
        "macs_removed": round(plan.removed_macs(counts) / max(plan.total_macs, 1.0), 6),
        "channels_removed": int(sum(counts)),
        "groups_pruned": sum(1 for c in counts if c),
        "groups": len(plan.groups),
    }
    return stats, lines
