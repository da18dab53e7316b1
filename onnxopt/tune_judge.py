"""How ``onnxopt tune`` judges a candidate: one adapter over the harness's task judge.

:func:`judge_candidate` is the only place the search asks whether a candidate still does
the job, and it asks :func:`onnxopt.harness.judge` — the judge the gate and the lossy
passes' targets use. The target is

* ``"task"`` (the default): the metrics the judge infers for each output from the graph
  (top-1 of a classifier, mask IoU of a Sigmoid map, pooled embedding under an
  ``attention_mask``, CTC sequences, detections, signal floors elsewhere) at the
  ``target`` floors, the lossy passes' default target;
* signal floors ``"cosine>=0.995,sqnr>=20"``, optionally scoped with ``@out1|out2``: those
  metrics on every float output in scope (``top1`` on score-like ``[batch, classes]``
  outputs only);
* judge metrics ``"OUTPUT:NAME>=FLOOR"`` (``--metric`` syntax), several joined by ``;``.

The agreement reported is the weakest metric (nearest its floor, or furthest below), with
the judge's 95 % interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.harness import MetricSpec, infer_metrics, judge, parse_metric

__all__ = ["DEFAULT_TARGET", "Judgement", "judge_candidate", "target_kind", "target_metrics"]

#: The judge's task metrics at the lossy passes' target floors.
DEFAULT_TARGET = "task"

Outputs = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Judgement:
    """A candidate's verdict: target met, the weakest metric's value with a 95 % interval, and why."""

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


def target_kind(target: str | None) -> str:
    """Return ``"task"``, ``"floors"`` (signal floors, maybe scoped) or ``"metrics"`` (judge metric syntax)."""
    text = (target or DEFAULT_TARGET).strip()
    if text == "task":
        return "task"
    return "metrics" if ":" in text.partition("@")[0] else "floors"


def _signal_specs(target: str, reference: Outputs) -> list[MetricSpec]:
    from onnxopt.tune_candidates import scoped_target_floors

    floors, scope = scoped_target_floors(target)
    missing = [n for n in scope if n not in reference[0]]
    if missing:
        raise ValueError(
            f"target {target!r} names output {missing[0]!r}; the model's outputs: {', '.join(reference[0])}"
        )
    specs = []
    for name, value in reference[0].items():
        if (scope and name not in scope) or not np.issubdtype(np.asarray(value).dtype, np.floating):
            continue
        scores = np.asarray(value).ndim == 2 and np.asarray(value).shape[-1] > 1
        specs += [
            MetricSpec(name, metric, floor, reason=f"--target {target}")
            for metric, floor in floors.items()
            if metric != "top1" or scores
        ]
    return specs


def target_metrics(target: str | None, model: onnx.ModelProto, reference: Outputs) -> list[MetricSpec]:
    """Return the judge's metrics for ``target`` on ``model`` (whose outputs on the samples are ``reference``)."""
    text = (target or DEFAULT_TARGET).strip()
    kind = target_kind(text)
    if kind == "task":
        return infer_metrics(model, reference, profile="target")
    if kind == "metrics":
        return [parse_metric(part) for part in text.split(";") if part.strip()]
    return _signal_specs(text, reference)


def judge_candidate(
    reference: Outputs,
    candidate: Outputs,
    target: str | None = None,
    *,
    model: onnx.ModelProto | None = None,
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> Judgement:
    """Judge ``candidate`` outputs against the float model's under ``target`` (default: the task metrics).

    ``model`` (the float model; its graph is enough) is needed to infer task metrics;
    ``inputs`` are the samples' feeds (the pooled-embedding metric reads the mask).
    """
    if target_kind(target) == "task" and model is None:
        raise ValueError("judging by the task metrics needs the float model to infer them from")
    metrics = target_metrics(target, model if model is not None else onnx.ModelProto(), reference)
    verdict = judge(reference, candidate, inputs, metrics)
    worst = verdict.blocking() or min(verdict.results, key=lambda r: r.value - r.floor, default=None)
    if worst is None:
        return Judgement(verdict.passed, "none", math.nan, math.nan, math.nan, "no metric applies to these outputs")
    return Judgement(
        verdict.passed, f"{worst.output}:{worst.metric}", worst.value, worst.low, worst.high, verdict.summary()
    )
