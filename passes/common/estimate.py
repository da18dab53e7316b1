"""Cross-fitted checks: judge a lossy pass's candidates on every calibration sample, each unseen.

A pass that decided on a held-out part of the calibration data (a quarter) had few items
to estimate a 1 % decision rate from: PP-OCR cls pruned to 78 % passed 0.99 top-1 on its
8 held-out lines and agreed on 0.922 of 64 unseen ones. :class:`CrossFittedCheck` fits
the pass's statistics (its *plan*) ``folds`` times, each time without one fold; a
candidate is a function from a plan to a model (the same sparsity, ranks, placement or
fallback applied to that plan), and the check runs each fold's candidate on the fold it
did not see. The judge then scores all samples at once, so the decision and its
interval rest on every calibration sample while no sample is judged by a model fitted
on it. It estimates how the procedure generalizes; the shipped model is fitted on all
samples (:func:`plan_check` returns both). With fewer than two samples per fold the
check falls back to the held-out quarter (:class:`HeldOutPlanCheck`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import onnx
from onnxopt.passes.common.budget import Budget, HeldOutCheck, TaskBudget, TaskJudge, bind_budget, judge_outputs

from onnxopt.data import Dataset, Sample
from onnxopt.harness import Judgement
from onnxopt.runtime import Session

__all__ = [
    "DEFAULT_FOLDS",
    "CrossFittedCheck",
    "HeldOutPlanCheck",
    "PlanCheck",
    "cross_fitted_verdict",
    "estimate_notes",
    "fold_members",
    "plan_check",
]

log = logging.getLogger(__name__)

#: Folds of the cross-fitted estimate (each fits on three quarters, judges one).
DEFAULT_FOLDS = 4

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)


def fold_members(count: int, folds: int) -> list[list[int]]:
    """Return the sample indices of each fold, interleaved (sample ``i`` is in fold ``i % folds``)."""
    return [list(range(j, count, folds)) for j in range(folds)]


class PlanCheck(Protocol[P_co]):
    """Judges the candidate a function builds from a plan; what the lossy passes' searches call."""

    @property
    def label(self) -> str:
        """Which samples judge: ``held-out`` or ``K-fold cross-fitted``."""
        ...

    @property
    def budget(self) -> Budget:
        """The bound budget."""
        ...

    @property
    def last(self) -> Judgement | None:
        """The last verdict of task metrics (None for other budgets)."""
        ...

    @property
    def evaluations(self) -> int:
        """How many candidates were judged."""
        ...

    def __call__(self, build: Callable[[P_co], onnx.ModelProto], budget: Budget | None = None) -> tuple[bool, str]:
        """Return whether the candidate is within budget (or a stricter ``budget``), and a summary."""
        ...


class CrossFittedCheck(Generic[P]):
    """Judge candidates on every sample, each built from a plan fitted without that sample's fold.

    ``fit(samples)`` returns the pass's plan from those samples only; it is called once
    per fold, here. ``last`` holds the last verdict of task metrics (None for other budgets).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        samples: Sequence[Sample],
        fit: Callable[[Dataset], P],
        budget: Budget,
        folds: int = DEFAULT_FOLDS,
    ) -> None:
        self.samples = list(samples)
        if folds < 2 or len(self.samples) < 2 * folds:
            raise ValueError(f"{folds} folds need at least {2 * folds} samples, not {len(self.samples)}")
        self.folds = folds
        self.label = f"{folds}-fold cross-fitted"
        self.members = fold_members(len(self.samples), folds)
        with Session(model, label="input model") as session:
            self.reference = [session.run(s) for s in self.samples]
        self.budget = bind_budget(model, self.reference, budget)
        self.plans = [
            fit(Dataset([s for i, s in enumerate(self.samples) if i not in set(members)])) for members in self.members
        ]
        self.last: Judgement | None = None
        self.evaluations = 0

    def outputs(self, build: Callable[[P], onnx.ModelProto]) -> list[dict[str, Any]]:
        """Return every sample's outputs from the candidate built on the plan that did not see it."""
        outputs: list[dict[str, Any] | None] = [None] * len(self.samples)
        for plan, members in zip(self.plans, self.members, strict=True):
            # judged as it deploys: default optimizations, integer kernels (as HeldOutCheck does)
            with Session(build(plan), optimization="default", label="cross-fitted candidate") as session:
                for i in members:
                    outputs[i] = session.run(self.samples[i])
        return [o for o in outputs if o is not None]

    def __call__(self, build: Callable[[P], onnx.ModelProto], budget: Budget | None = None) -> tuple[bool, str]:
        """Return whether the candidates are within budget (or a stricter ``budget``) over all samples."""
        self.evaluations += 1
        chosen = self.budget if budget is None else budget
        outputs = self.outputs(build)
        if isinstance(chosen, TaskJudge):
            self.last = chosen.verdict(self.reference, outputs, self.samples)
            return self.last.passed, self.last.summary()
        return judge_outputs(self.reference, outputs, chosen, self.samples)


class HeldOutPlanCheck(Generic[P]):
    """The fallback for few samples: one plan fitted on the calibration part, judged on the held-out part."""

    def __init__(self, inner: HeldOutCheck, plan: P) -> None:
        self.inner = inner
        self.plan = plan
        self.label = "held-out"

    @property
    def budget(self) -> Budget:
        """The bound budget."""
        return self.inner.budget

    @property
    def last(self) -> Judgement | None:
        """The last verdict of task metrics."""
        return self.inner.last

    @property
    def evaluations(self) -> int:
        """How many candidates were judged."""
        return self.inner.evaluations

    def __call__(self, build: Callable[[P], onnx.ModelProto], budget: Budget | None = None) -> tuple[bool, str]:
        """Judge the candidate built on the one plan."""
        return self.inner(build(self.plan), budget)


def plan_check(
    model: onnx.ModelProto,
    calibration: Dataset,
    fit: Callable[[Dataset], P],
    budget: Budget,
    folds: int = DEFAULT_FOLDS,
) -> tuple[P, PlanCheck[P]]:
    """Return the plan to ship and the check that judges candidates built from plans.

    With at least two samples per fold: the plan fitted on every calibration sample and
    a :class:`CrossFittedCheck`. Otherwise the plan fitted on the first three quarters,
    judged on the last quarter and (in-sample) on the rest.
    """
    if folds >= 2 and len(calibration) >= 2 * folds:
        check: CrossFittedCheck[P] = CrossFittedCheck(model, list(calibration), fit, budget, folds)
        return fit(calibration), check
    fitted, held = calibration.split()
    plan = fit(fitted)
    return plan, HeldOutPlanCheck(HeldOutCheck(model, list(held), budget, fitted=list(fitted)), plan)


def cross_fitted_verdict(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    refit: Callable[[Dataset], onnx.ModelProto],
    budget: TaskBudget | TaskJudge,
    folds: int = DEFAULT_FOLDS,
) -> Judgement | None:
    """Return the judge's verdict over all ``samples``, each judged by a model ``refit`` without it.

    ``refit(fit_samples)`` returns the pass's chosen model built from statistics of
    ``fit_samples`` only. None when there are fewer than two samples per fold.
    """
    if folds < 2 or len(samples) < 2 * folds:
        return None
    check = CrossFittedCheck(model, samples, refit, budget, folds)
    check(lambda candidate: candidate)
    return check.last


def estimate_notes(verdict: Judgement | None, folds: int) -> tuple[dict[str, object], list[str]]:
    """Return stats and notes of a cross-fitted verdict (empty when there is none)."""
    if verdict is None or not verdict.results:
        return {}, []
    worst = min(verdict.results, key=lambda r: r.value - r.floor)
    stats: dict[str, object] = {
        "cross_fitted_metric": f"{worst.output}:{worst.metric}",
        "cross_fitted_agreement": worst.value,
        "cross_fitted_interval": [worst.low, worst.high],
        "cross_fitted_met": int(verdict.passed),
    }
    notes = []
    for r in verdict.results:
        line = (
            f"{folds}-fold cross-fitted estimate, every calibration sample unseen by the model judging it: "
            f"{r.output}:{r.metric} {r.value:.4f}, 95 % interval [{r.low:.4f}, {r.high:.4f}] on {r.items} items "
            f"(floor {r.floor:g}: {'met' if r.passed else 'NOT met'})"
        )
        if not r.resolved:
            line += "; the data cannot resolve the floor" + (f" (about {r.needed} items would)" if r.needed else "")
        notes.append(line)
    return stats, notes
