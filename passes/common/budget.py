"""The error budget of the lossy passes.

Resolving a pass's ``budget`` parameter, judging candidates on held-out and fitted
samples, measuring layer sensitivity, and the one back-off search. Candidates run as
they deploy, at onnxruntime's default optimizations (an int8 model on its integer
kernels, which can differ from the same QDQ graph computed in float: see
``passes/quantize/kernels.py``); the reference runs with optimizations off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import onnx

from onnxopt.data import Dataset, Sample
from onnxopt.harness import (
    PROFILES,
    Judgement,
    MetricError,
    MetricSpec,
    Tolerance,
    compare_outputs,
    infer_metrics,
    judge,
    parse_metric,
)
from onnxopt.progress import NullProgress, Progress
from onnxopt.runtime import Session

log = logging.getLogger(__name__)

#: Calibration samples used to measure how much of each layer's error reaches the outputs.
SENSITIVITY_SAMPLES = 4


Outputs = list[dict[str, np.ndarray]]


Acceptance = Callable[[Outputs, Outputs], bool]


BudgetSpec = Union[float, str, Mapping[str, float], Acceptance, None]  # noqa: UP007  (runtime alias, py3.10)


@runtime_checkable
class Judge(Protocol):
    """Anything that judges candidate outputs against reference outputs with a summary (int8's ``Target``)."""

    def judge(self, reference: Outputs, candidate: Outputs) -> tuple[bool, str]:
        """Return (within the budget, a one-line summary)."""
        ...


@dataclass(frozen=True)
class TaskBudget:
    """The default budget: the judge's task metrics, inferred from the input model, at the passes' target floors.

    :class:`HeldOutCheck` binds it to the model (the metrics are inferred from its graph
    and its outputs on the held-out samples) as a :class:`TaskJudge`. ``declared``
    metrics replace the inferred ones on the outputs they name.
    """

    declared: tuple[MetricSpec, ...] = ()
    profile: str = "target"


@dataclass(frozen=True)
class TaskJudge:
    """Task metrics bound to one model: judges candidate outputs with :func:`onnxopt.harness.judge`."""

    metrics: tuple[MetricSpec, ...]

    def judge(self, reference: Outputs, candidate: Outputs, inputs: Sequence[Sample] | None = None) -> tuple[bool, str]:
        """Return (every metric reached its floor, the blocking or weakest metric as text)."""
        verdict = self.verdict(reference, candidate, inputs)
        return verdict.passed, verdict.summary()

    def verdict(self, reference: Outputs, candidate: Outputs, inputs: Sequence[Sample] | None = None) -> Judgement:
        """Return the full :class:`~onnxopt.harness.Judgement`."""
        return judge(reference, candidate, inputs, self.metrics)

    def tightened(self, margin: float) -> TaskJudge:
        """Return the judge with only ``margin`` of each floor's distance from lossless left."""
        if margin >= 1:
            return self

        def closer(spec: MetricSpec) -> MetricSpec:
            if spec.name == "sqnr":
                return replace(spec, floor=spec.floor - 10 * math.log10(margin))
            return replace(spec, floor=1 - (1 - spec.floor) * margin) if spec.floor <= 1 else spec

        return TaskJudge(tuple(closer(s) for s in self.metrics))

    def describe(self) -> str:
        """Return the metrics and floors as text, e.g. ``y:top1 ≥ 0.99``."""
        return ", ".join(f"{s.label} ≥ {s.floor:g}" for s in self.metrics)


Budget = Union[Tolerance, Acceptance, Judge, TaskBudget]  # noqa: UP007  (runtime alias, py3.10)


#: The signal floors a float or mapping budget starts from: the harness's ``int8``
#: profile (floors on every output's cosine similarity and SQNR against the input model,
#: and on top-1 agreement of score-like outputs).
DEFAULT_BUDGET: Tolerance = PROFILES["int8"]

#: The default budget of the lossy passes: the task metrics the judge infers for each
#: output (top-1, CTC sequences, mask IoU, pooled embeddings, detections, or signal floors
#: where no task structure shows), at the ``target`` floors, which are at or above the
#: gate's (the verifier's) so a pass never hands the verifier a failing model.
TASK_BUDGET = TaskBudget()


def declared_budget(text: str) -> TaskBudget:
    """Return the task budget of metric specs joined by ``;`` (see :func:`onnxopt.harness.parse_metric`)."""
    specs = tuple(parse_metric(part) for part in text.split(";") if part.strip())
    if not specs:
        raise MetricError(f"budget {text!r}: expected OUTPUT[SLICE]:NAME[@ARG]>=FLOOR, joined by ';'")
    return TaskBudget(declared=specs)


def budget_tolerance(
    budget: BudgetSpec, overrides: Mapping[str, float] | None = None
) -> Tolerance | Acceptance | TaskBudget:
    """Resolve a pass's ``budget`` parameter (and ``ctx.budget`` overrides) to a check.

    ``None``: :data:`TASK_BUDGET` (unless ``overrides`` set :class:`Tolerance` fields);
    a string: declared task metrics ``OUTPUT[SLICE]:NAME[@ARG]>=FLOOR`` joined by ``;``
    (inferred ones judge the other outputs);
    a float: that minimum output cosine on top of the int8 signal floors; a mapping:
    :class:`Tolerance` fields replacing those floors; a callable ``(reference outputs,
    candidate outputs) -> bool``: a task-level check (Python API only).
    """
    if callable(budget):
        return budget
    fields_given = {k for k in (overrides or {}) if k in Tolerance.__dataclass_fields__}
    if budget is None and not fields_given:
        return TASK_BUDGET
    if isinstance(budget, str):
        return declared_budget(budget)
    tolerance = DEFAULT_BUDGET
    fields = set(Tolerance.__dataclass_fields__)
    if isinstance(budget, Mapping):
        unknown = [k for k in budget if k not in fields]
        if unknown:
            raise ValueError(f"budget has no field {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
        tolerance = tolerance.replace(**dict(budget))
    elif budget is not None:
        tolerance = tolerance.replace(min_cosine=float(budget))
    extra = {k: v for k, v in (overrides or {}).items() if k in fields}
    return tolerance.replace(**extra) if extra else tolerance


#: At most this many fitted samples (evenly spaced) are judged besides the held-out ones,
#: so a large calibration set does not multiply the cost of every check.
FITTED_SAMPLES = 32


def bind_budget(model: onnx.ModelProto, reference: Outputs, budget: Budget) -> Budget:
    """Return ``budget`` with task metrics bound to ``model`` (inferred from its graph and ``reference`` outputs).

    A :class:`TaskBudget` (or int8's ``Target`` carrying one) becomes a :class:`TaskJudge`;
    any other budget is returned as is.
    """
    task = getattr(budget, "task", None) if not isinstance(budget, TaskBudget) else budget
    if isinstance(task, TaskBudget):
        return TaskJudge(tuple(infer_metrics(model, reference, profile=task.profile, declared=task.declared)))
    return budget


class HeldOutCheck:
    """Judge candidate models against the input model on held-out samples, under a budget.

    ``fitted`` are the samples the pass fitted its statistics on: a candidate must also
    stay within the budget itself (not a stricter one) on them. The held-out samples
    estimate how the change generalizes; they are few, so without this a model could pass
    them and fail on inputs the pass had seen (silero_vad_half pruned to 70 %: within
    budget on its 6 held-out chunks, outside the int8 profile on all 24).
    """

    def __init__(
        self, model: onnx.ModelProto, samples: Sequence[Sample], budget: Budget, fitted: Sequence[Sample] = ()
    ) -> None:
        self.samples = list(samples)
        self.fitted = list(Dataset(list(fitted)).spaced(FITTED_SAMPLES))
        with Session(model, label="input model") as session:
            self.reference: Outputs = [session.run(s) for s in self.samples]
            self.fitted_reference: Outputs = [session.run(s) for s in self.fitted]
        self.budget = bind_budget(model, self.reference + self.fitted_reference, budget)
        #: the last held-out verdict of the task metrics (None for other budgets)
        self.last: Judgement | None = None
        self.label = "held-out"
        self.evaluations = 0

    def __call__(self, candidate: onnx.ModelProto, budget: Budget | None = None) -> tuple[bool, str]:
        """Return whether ``candidate`` is within budget (or a stricter ``budget``), and a one-line summary."""
        self.evaluations += 1
        chosen = self.budget if budget is None else budget
        with Session(candidate, optimization="default", label="candidate") as session:
            outputs = [session.run(s) for s in self.samples]
            if isinstance(chosen, TaskJudge):
                self.last = chosen.verdict(self.reference, outputs, self.samples)
                passed, summary = self.last.passed, self.last.summary()
            else:
                passed, summary = judge_outputs(self.reference, outputs, chosen, self.samples)
            if passed and self.fitted:
                fitted_passed, fitted_summary = judge_outputs(
                    self.fitted_reference, [session.run(s) for s in self.fitted], self.budget, self.fitted
                )
                if not fitted_passed:
                    return False, f"held-out passed; on the calibration samples {fitted_summary}"
        return passed, summary


def judge_outputs(
    reference: Outputs, outputs: Outputs, budget: Budget, inputs: Sequence[Sample] = ()
) -> tuple[bool, str]:
    """Return whether ``outputs`` are within a bound ``budget`` of ``reference``, and a one-line summary."""
    if isinstance(budget, TaskJudge):
        return budget.judge(reference, outputs, list(inputs))
    if isinstance(budget, Judge):
        return budget.judge(reference, outputs)
    if callable(budget):
        passed = bool(budget(reference, outputs))
        return passed, "task check " + ("passed" if passed else "failed")
    assert isinstance(budget, Tolerance), f"unbound budget {budget!r}"
    result = compare_outputs(reference, outputs, profile=budget)
    floats = [o for o in result.outputs if o.elements]
    summary = ", ".join(f"{o.name}: cosine {o.cosine:.5f} SQNR {o.sqnr_db:.1f} dB" for o in floats[:3])
    return result.passed, summary


def judgement_notes(check: Any) -> list[str]:
    """Return notes on the task metrics of ``check``'s last verdict: what judged, interval, resolution.

    ``check`` is a :class:`HeldOutCheck` or a cross-fitted one (its ``label`` says which).
    """
    if check.last is None:
        return []
    label = getattr(check, "label", "held-out")
    items = "held-out items" if label == "held-out" else f"items ({label}: each judged by a model fitted without it)"
    notes = []
    for r in check.last.results:
        line = (
            f"task metric {r.output}:{r.metric} ({r.reason}): {r.value:.4f}, 95 % interval "
            f"[{r.low:.4f}, {r.high:.4f}] on {r.items} {items}, floor {r.floor:g}"
        )
        if not r.resolved:
            line += "; these samples cannot resolve the floor" + (
                f" (about {r.needed} items would)" if r.needed else ""
            )
        notes.append(line)
    return notes


def final_verdict(check: Any, candidate: Any) -> tuple[dict[str, Any], list[str]]:
    """Judge the pass's result once more; return its stats (worst task metric) and notes (every metric).

    ``candidate`` is the model (a :class:`HeldOutCheck`) or the function building it from
    a plan (a cross-fitted check: the estimate is of the procedure at the chosen setting).
    """
    passed, summary = check(candidate)
    stats: dict[str, Any] = {"within_budget": int(passed)}
    if check.last is not None and check.last.results:
        worst = min(check.last.results, key=lambda r: r.value - r.floor)
        stats.update(task_metric=f"{worst.output}:{worst.metric}", task_agreement=worst.value)
        stats.update(task_interval=[worst.low, worst.high], task_items=worst.items)
    label = getattr(check, "label", "held-out")
    return stats, [f"result on the {label} samples: {summary}", *judgement_notes(check)]


def relative_output_error(reference: Outputs, candidate: Outputs) -> float:
    """Return the mean over float outputs of ``Σ‖c − r‖² / Σ‖r‖²`` across samples."""
    errors = []
    for name, first in reference[0].items():
        if not np.issubdtype(np.asarray(first).dtype, np.floating):
            continue
        noise = sum(
            float(np.sum((np.asarray(c[name], np.float64) - r[name]) ** 2))
            for r, c in zip(reference, candidate, strict=True)
        )
        signal = sum(float(np.sum(np.asarray(r[name], np.float64) ** 2)) for r in reference)
        errors.append(noise / max(signal, 1e-30))
    return float(np.mean(errors)) if errors else 0.0


Probe = tuple[float, Callable[[], onnx.ModelProto]]


def measure_gains(
    model: onnx.ModelProto, samples: Sequence[Sample], probes: Sequence[Probe], progress: Progress | None = None
) -> list[float]:
    """Return, per probe ``(predicted layer error, build model)``, model output error / layer error.

    Each probe changes one layer by a known relative output error; the ratio says how
    much of a layer's error reaches the model outputs (its measured sensitivity).
    """
    with Session(model, label="input model") as session:
        reference = [session.run(s) for s in samples]
    gains = []
    with (progress or NullProgress()).task("measuring layer sensitivity", len(probes)) as task:
        for layer_error, build in probes:
            if layer_error <= 0:
                gains.append(1.0)
            else:
                with Session(build(), label="probe") as session:
                    outputs = [session.run(s) for s in samples]
                gains.append(relative_output_error(reference, outputs) / layer_error)
            task.advance()
    return gains


def search_largest(passes: Callable[[float], bool], low: float, high: float, steps: int) -> float:
    """Return the largest ``x`` in ``[low, high]`` with ``passes(x)`` (monotone), by bisection.

    ``low`` is assumed to pass; ``high`` is tried first.
    """
    if passes(high):
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def search_smallest(passes: Callable[[int], bool], low: int, high: int) -> int:
    """Return the smallest ``n`` in ``(low, high]`` with ``passes(n)`` (monotone), by bisection.

    ``high`` is assumed to pass and ``low`` to fail; neither is tried. The back-off
    searches use it for the fewest layers to restore (or nodes to return to float).
    """
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def describe_budget(budget: Tolerance | Acceptance | Any) -> str:
    """Return a short description of a resolved budget for notes."""
    if isinstance(budget, Tolerance):
        parts = [
            f"cosine ≥ {budget.min_cosine}" if budget.min_cosine is not None else "",
            f"SQNR ≥ {budget.min_sqnr_db} dB" if budget.min_sqnr_db is not None else "",
            f"top-1 ≥ {budget.min_top1}" if budget.min_top1 is not None else "",
        ]
        return "held-out " + ", ".join(p for p in parts if p)
    if isinstance(budget, TaskJudge):
        return "held-out task metrics: " + budget.describe()
    return "held-out task check"
