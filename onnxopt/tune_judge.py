"""How ``onnxopt tune`` judges a candidate: one adapter over the harness.

:func:`judge_candidate` is the only place the search asks whether a candidate still does
the job. It judges with the harness's comparison (the same floors the gate's ``int8``
profile and the lossy passes' targets use: pooled cosine, SQNR, top-1 agreement on
score-like outputs, scoped to the outputs after ``@``) and adds an interval: a bootstrap
over samples of the target's first metric, since a figure from a few held-out samples is
an estimate. When the task-aware judge lands in the harness, this function calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.harness import Tolerance, compare_outputs
from onnxopt.tune_candidates import scoped_target_floors

__all__ = ["DEFAULT_TARGET", "Judgement", "judge_candidate", "pooled_metric"]

#: The gate's int8 signal floors on every float output: what the lossy presets hold by default.
DEFAULT_TARGET = "cosine>=0.995,sqnr>=20"

#: Bootstrap resamples for the interval (fixed seed: the same data give the same interval).
RESAMPLES = 400

Outputs = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Judgement:
    """A candidate's verdict: target met, the agreement figure with a 95 % interval, and why."""

    passed: bool
    metric: str
    agreement: float
    low: float
    high: float
    summary: str

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dictionary."""
        return {
            "passed": self.passed,
            "metric": self.metric,
            "agreement": _finite(self.agreement),
            "interval": [_finite(self.low), _finite(self.high)],
            "summary": self.summary,
        }


def _finite(value: float) -> float | str:
    return round(value, 6) if math.isfinite(value) else str(value)


def _sample_statistics(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Return per-sample (Σr·c, Σr², Σc², Σ(r−c)²) over finite values, shape (samples, 4)."""
    rows = []
    for r_in, c_in in zip(reference, candidate, strict=True):
        r = np.asarray(r_in, dtype=np.float64).ravel()
        c = np.asarray(c_in, dtype=np.float64).ravel()
        keep = np.isfinite(r) & np.isfinite(c)
        r, c = r[keep], c[keep]
        d = r - c
        rows.append((float(r @ c), float(r @ r), float(c @ c), float(d @ d)))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _top1_counts(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Return per-sample (agreeing rows, rows with a unique winner), shape (samples, 2)."""
    rows = []
    for r, c in zip(reference, candidate, strict=True):
        rows_r = np.asarray(r).reshape(-1, np.asarray(r).shape[-1])
        rows_c = np.asarray(c).reshape(-1, rows_r.shape[-1])
        top_two = -np.partition(-rows_r, 1, axis=-1)[:, :2]
        decided = top_two[:, 0] > top_two[:, 1]
        rows.append((int((rows_r.argmax(-1) == rows_c.argmax(-1))[decided].sum()), int(decided.sum())))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def pooled_metric(metric: str, sums: np.ndarray) -> float:
    """Return the pooled metric from summed statistics (as the harness pools over samples)."""
    if metric == "top1":
        return float(sums[0] / sums[1]) if sums[1] else math.nan
    dot, r2, c2, noise = sums
    if metric == "cosine":
        norm = math.sqrt(r2 * c2)
        return dot / norm if norm > 0 else (1.0 if noise == 0 else 0.0)
    return math.inf if noise == 0 else 10 * math.log10(max(r2, 1e-300) / noise)


def _interval(metric: str, per_sample: np.ndarray, seed: int) -> tuple[float, float]:
    n = len(per_sample)
    if n < 2:
        value = pooled_metric(metric, per_sample.sum(axis=0))
        return value, value
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(RESAMPLES, n))
    values = np.array([pooled_metric(metric, per_sample[p].sum(axis=0)) for p in picks])
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def judge_candidate(reference: Outputs, candidate: Outputs, target: str | None = None, *, seed: int = 0) -> Judgement:
    """Judge ``candidate`` outputs against the float model's under ``target`` (default :data:`DEFAULT_TARGET`).

    The verdict is the harness's (every floor on every judged output); the agreement is
    the target's first metric on the worst judged output, with a bootstrap 95 % interval.
    """
    text = target or DEFAULT_TARGET
    floors, scope = scoped_target_floors(text)
    names = [n for n in reference[0] if not scope or n in scope]
    missing = [n for n in scope if n not in reference[0]]
    if missing:
        raise ValueError(f"target {text!r} names output {missing[0]!r}; the model's outputs: {', '.join(reference[0])}")
    ref = [{n: r[n] for n in names} for r in reference]
    cand = [{n: c[n] for n in names if n in c} for c in candidate]
    tolerance = Tolerance(
        elementwise=False, min_cosine=floors.get("cosine"), min_sqnr_db=floors.get("sqnr"), min_top1=floors.get("top1")
    )
    result = compare_outputs(ref, cand, profile=tolerance)
    metric = next(iter(floors))
    worst: tuple[float, float, float, str] | None = None
    for comparison in result.outputs:
        if not comparison.elements:
            continue
        if metric == "top1":
            if comparison.top1 is None:
                continue
            per_sample = _top1_counts([r[comparison.name] for r in ref], [c[comparison.name] for c in cand])
        else:
            per_sample = _sample_statistics([r[comparison.name] for r in ref], [c[comparison.name] for c in cand])
        value = pooled_metric(metric, per_sample.sum(axis=0))
        if worst is None or value < worst[0]:
            worst = (value, *_interval(metric, per_sample, seed), comparison.name)
    if worst is None:
        return Judgement(result.passed, metric, math.nan, math.nan, math.nan, f"no output has a {metric} to judge")
    reasons = [reason for o in result.outputs for reason in o.reasons] + list(result.problems)
    summary = f"{metric} {worst[0]:.4f} on {worst[3]}" + (f"; {reasons[0]}" if reasons else "")
    return Judgement(result.passed, metric, worst[0], worst[1], worst[2], summary)
