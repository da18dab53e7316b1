"""Cross-fitted estimates: judge a lossy pass's procedure on every calibration sample, each unseen.

A pass decides on a held-out part of the calibration data (a quarter), which leaves few
items to estimate a 1 % decision rate from. :func:`cross_fitted_verdict` refits the
pass's statistics ``folds`` times, each time without one fold, builds the model the pass
chose (the same placement, fallback and ranks) from those statistics, and runs it on
the fold it did not see; the judge then scores all samples at once, so the interval rests
on every calibration sample while no sample is judged by a model fitted on it. It
estimates how the procedure generalizes, not the one shipped model exactly (that one is
fitted on the larger part).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import onnx
from onnxopt.passes.common.budget import TaskBudget, TaskJudge

from onnxopt.data import Dataset, Sample
from onnxopt.harness import Judgement, infer_metrics, judge
from onnxopt.runtime import Session

__all__ = ["DEFAULT_FOLDS", "cross_fitted_verdict", "estimate_notes", "fold_members"]

log = logging.getLogger(__name__)

#: Folds of the cross-fitted estimate (each fits on three quarters, judges one).
DEFAULT_FOLDS = 4


def fold_members(count: int, folds: int) -> list[list[int]]:
    """Return the sample indices of each fold, interleaved (sample ``i`` is in fold ``i % folds``)."""
    return [list(range(j, count, folds)) for j in range(folds)]


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
    samples = list(samples)
    if folds < 2 or len(samples) < 2 * folds:
        return None
    with Session(model, label="input model") as session:
        reference = [session.run(s) for s in samples]
    if isinstance(budget, TaskBudget):
        metrics = tuple(infer_metrics(model, reference, profile=budget.profile, declared=budget.declared))
    else:
        metrics = budget.metrics
    outputs: list[dict | None] = [None] * len(samples)
    for members in fold_members(len(samples), folds):
        chosen = set(members)
        candidate = refit(Dataset([s for i, s in enumerate(samples) if i not in chosen]))
        with Session(candidate, optimization="default", label="cross-fitted candidate") as session:
            for i in members:
                outputs[i] = session.run(samples[i])
    complete = [o for o in outputs if o is not None]
    return judge(reference, complete, samples, metrics)


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
