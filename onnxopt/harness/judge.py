"""The judge: one verdict on reference vs candidate outputs, by the metrics the task reads.

Public API (the whole project judges through it):

* :class:`MetricSpec` — one metric on one output (or a slice of it) with a floor and the
  reason it was chosen; :func:`parse_metric` reads ``OUTPUT[SLICE]:NAME[@ARG]>=FLOOR``
  (``output0[:, 4:]:top1>=0.99``), :func:`load_metrics` a TOML file of ``[[metric]]``
  tables (keys ``output``, ``name``, ``arg``, ``floor``, ``slice``), and
  :func:`callable_metric` wraps a Python ``(reference_outputs, candidate_outputs, inputs)
  -> float``.
* :func:`~onnxopt.harness.inference.infer_metrics` — the metrics of every output, from the
  graph and the reference outputs, for outputs no declared metric covers.
* :func:`judge` — judge candidate outputs against reference outputs on the samples;
  returns a :class:`Judgement` of :class:`MetricResult` (output, metric, value, interval,
  floor, passed, reason, and whether the samples can resolve the floor).

Inference rules are in :mod:`onnxopt.harness.inference`. Floors come from :data:`FLOORS` by
profile: ``int8`` is the gate's, ``target`` the lossy passes' default target.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.errors import OnnxoptError
from onnxopt.harness.metrics import METRICS, Score

__all__ = [
    "FLOORS",
    "Judgement",
    "MetricError",
    "MetricResult",
    "MetricSpec",
    "callable_metric",
    "judge",
    "load_metrics",
    "parse_metric",
    "samples_needed",
    "wilson_interval",
]

log = logging.getLogger(__name__)

Outputs = Sequence[Mapping[str, np.ndarray]]
UserMetric = Callable[[Outputs, Outputs, Sequence[Mapping[str, np.ndarray]] | None], float]

#: Floors per profile and metric: ``int8`` is the gate (``check --profile int8``),
#: ``target`` the default accuracy target of the lossy passes.
FLOORS: dict[str, dict[str, float]] = {
    "int8": {
        "cosine": 0.995,
        "sqnr": 20.0,
        "top1": 0.98,
        "topk": 0.98,
        "ctc": 0.95,
        "iou": 0.95,
        "pooled": 0.99,
        "detection": 0.95,
        "equal": 0.98,
    },
    "target": {
        "cosine": 0.995,
        "sqnr": 20.0,
        "top1": 0.99,
        "topk": 0.99,
        "ctc": 0.99,
        "iou": 0.98,
        "pooled": 0.995,
        "detection": 0.99,
        "equal": 0.99,
    },
}

#: The z value of the two-sided 95 % intervals.
Z95 = 1.96


class MetricError(OnnxoptError):
    """A declared metric is malformed, unknown, or names an output or slice the model lacks."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric on one output (optionally a slice of it), with its floor and why it was chosen."""

    output: str
    name: str
    floor: float
    arg: str | None = None
    slice: str | None = None  # numpy index text, e.g. "[:, 4:]"
    reason: str = "declared"
    function: UserMetric | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """The metric as text, e.g. ``output0[:, 4:]:top1``."""
        arg = f"@{self.arg}" if self.arg else ""
        return f"{self.output}{self.slice or ''}:{self.name}{arg}"


_SPEC = re.compile(
    r"^\s*(?P<output>[^\[:]+?)\s*(?P<slice>\[[^\]]*\])?\s*:\s*(?P<name>[A-Za-z_]\w*)"
    r"(?:@(?P<arg>[^>\s]+))?\s*>=\s*(?P<floor>[-+0-9.eE]+)\s*$"
)


def parse_metric(text: str) -> MetricSpec:
    """Return the :class:`MetricSpec` of ``OUTPUT[SLICE]:NAME[@ARG]>=FLOOR``."""
    match = _SPEC.match(text)
    if not match:
        raise MetricError(
            f"metric {text!r}: expected OUTPUT[:SLICE]:NAME[@ARG]>=FLOOR, e.g. 'output0[:, 4:]:top1>=0.99'"
        )
    spec = MetricSpec(
        output=match["output"],
        name=match["name"],
        floor=float(match["floor"]),
        arg=match["arg"],
        slice=match["slice"],
        reason="declared",
    )
    _validate(spec)
    return spec


def _validate(spec: MetricSpec) -> None:
    if spec.function is None and spec.name not in METRICS:
        raise MetricError(f"metric {spec.label!r}: unknown metric {spec.name!r}; choose one of {', '.join(METRICS)}")
    if spec.slice:
        _index(spec.slice)


def load_metrics(path: str | Path) -> list[MetricSpec]:
    """Return the metrics of a TOML file's ``[[metric]]`` tables."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MetricError(f"cannot read metrics from {path}: {exc}") from exc
    specs = []
    for i, table in enumerate(document.get("metric", [])):
        unknown = set(table) - {"output", "name", "arg", "floor", "slice"}
        if unknown or not {"output", "name", "floor"} <= set(table):
            raise MetricError(f"{path}: [[metric]] #{i + 1} needs output, name, floor (and optional arg, slice)")
        spec = MetricSpec(
            output=str(table["output"]),
            name=str(table["name"]),
            floor=float(table["floor"]),
            arg=None if table.get("arg") is None else str(table["arg"]),
            slice=table.get("slice"),
            reason=f"declared in {Path(path).name}",
        )
        _validate(spec)
        specs.append(spec)
    return specs


def callable_metric(function: UserMetric, floor: float, output: str = "*", name: str | None = None) -> MetricSpec:
    """Return a spec for a Python metric ``(reference_outputs, candidate_outputs, inputs) -> float``."""
    return MetricSpec(
        output, str(name or getattr(function, "__name__", "user")), floor, reason="declared (Python)", function=function
    )


def _index(text: str) -> tuple[Any, ...]:
    """Parse numpy index text like ``[:, 4:]`` or ``[..., 0]`` (no fancy indexing)."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise MetricError(f"slice {text!r}: expected e.g. [:, 4:]")
    parts: list[Any] = []
    for part in body[1:-1].split(","):
        part = part.strip()
        try:
            if part == "...":
                parts.append(Ellipsis)
            elif ":" in part:
                bounds = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError(part)
                parts.append(slice(*bounds))
            else:
                parts.append(int(part))
        except ValueError as exc:
            raise MetricError(f"slice {text!r}: {part!r} is not an integer, a:b[:c] or ...") from exc
    return tuple(parts)


# --------------------------------------------------------------------------- results


def wilson_interval(successes: float, count: int, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion ``successes / count``."""
    if count == 0:
        return 0.0, 1.0
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def _ratio_error(score: Score) -> float | None:
    """Return the standard error of a weighted score's ratio ``Σ w·x / Σ w`` (None: too few items).

    The ratio estimator's linearized variance, ``n/(n−1) · Σ w²(x − R)² / (Σ w)²`` over
    the items of nonzero weight: the samples are the independent draws, not the pixels.
    """
    assert score.weights is not None
    keep = score.weights > 0
    weights, items = score.weights[keep], score.items[keep]
    n = int(weights.size)
    if n < 2 or not np.all(np.isfinite(items)):
        return None
    residual = weights * (items - score.value)
    return math.sqrt(n / (n - 1) * float(np.sum(residual * residual))) / float(np.sum(weights))


def _interval(score: Score) -> tuple[float, float]:
    if score.weights is not None:
        error = _ratio_error(score)
        if error is None:
            return score.value, score.value
        return score.value - Z95 * error, min(1.0, score.value + Z95 * error)
    if score.binary:
        return wilson_interval(float(score.items.sum()), score.count)
    finite = score.items[np.isfinite(score.items)]
    if finite.size != score.count or score.count < 2:
        return score.value, score.value
    half = Z95 * float(np.std(finite, ddof=1)) / math.sqrt(finite.size)
    return score.value - half, score.value + half


def samples_needed(score: Score, floor: float) -> int | None:
    """Return about how many items would put the 95 % interval on one side of ``floor`` (None: no number will)."""
    value = score.value
    if score.weights is not None:
        error = _ratio_error(score)
        if error is None or value == floor:
            return None
        return math.ceil(score.count * (Z95 * error / abs(value - floor)) ** 2)
    if score.binary:
        gap = value - floor
        if gap == 0:
            return None
        if value >= 1.0:  # no failure seen: the rule of three
            return math.ceil(3.0 / max(1.0 - floor, 1e-12))
        return math.ceil(Z95 * Z95 * value * (1 - value) / (gap * gap))
    finite = score.items[np.isfinite(score.items)]
    if finite.size < 2 or value == floor:
        return None
    return math.ceil((Z95 * float(np.std(finite, ddof=1)) / abs(value - floor)) ** 2)


@dataclass(frozen=True)
class MetricResult:
    """One metric's verdict on one output."""

    output: str
    metric: str
    value: float
    low: float
    high: float
    floor: float
    passed: bool
    reason: str
    items: int = 0
    near_ties: int = 0
    resolved: bool = True  # False: the interval straddles the floor
    needed: int | None = None  # items that would resolve it, when not resolved

    def describe(self) -> str:
        """One line: the metric, value, interval, floor and, if unresolved, how many items would resolve it."""
        relation = ">=" if self.passed else "<"
        text = f"{self.metric} {self.value:.4f} [{self.low:.4f}, {self.high:.4f}] {relation} {self.floor}"
        if self.near_ties:
            text += f" ({self.near_ties} near-ties)"
        if not self.resolved:
            more = f"; about {self.needed} would" if self.needed else ""
            text += f" (unresolved: {self.items} items cannot place it against the floor{more})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (non-finite figures as strings)."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Judgement:
    """Every metric's verdict; passed when all passed."""

    results: tuple[MetricResult, ...]

    @property
    def passed(self) -> bool:
        """True when every metric reached its floor."""
        return all(r.passed for r in self.results)

    def for_output(self, name: str) -> list[MetricResult]:
        """Return the results judging output ``name``."""
        return [r for r in self.results if r.output == name]

    def blocking(self) -> MetricResult | None:
        """Return the failing metric furthest below its floor (relative), or None."""
        failing = [r for r in self.results if not r.passed]
        return min(failing, key=lambda r: r.value - r.floor, default=None)

    def summary(self) -> str:
        """One line naming the blocking metric, or the weakest one when all passed."""
        worst = self.blocking() or min(self.results, key=lambda r: r.value - r.floor, default=None)
        return "no metrics" if worst is None else f"{worst.output}: {worst.describe()}"


def _select(spec: MetricSpec, arrays: list[np.ndarray]) -> list[np.ndarray]:
    if not spec.slice:
        return arrays
    index = _index(spec.slice)
    try:
        return [np.asarray(a[index]) for a in arrays]
    except IndexError as exc:
        raise MetricError(f"metric {spec.label!r}: slice does not fit the output ({exc})") from exc


def _score(
    spec: MetricSpec, reference: Outputs, candidate: Outputs, inputs: Sequence[Mapping[str, np.ndarray]] | None
) -> Score:
    if spec.function is not None:
        return Score(np.array([float(spec.function(reference, candidate, inputs))]))
    if not reference or spec.output not in reference[0]:
        names = sorted(reference[0]) if reference else []
        raise MetricError(f"metric {spec.label!r}: the model has no output {spec.output!r}; outputs are {names}")
    ref = _select(spec, [r[spec.output] for r in reference])
    cand = _select(spec, [c[spec.output] for c in candidate])
    metric = METRICS[spec.name]
    arg = spec.arg if spec.name != "top1" else (spec.arg or "1")
    return metric(ref, cand, inputs, arg)


def judge(
    reference: Outputs,
    candidate: Outputs,
    inputs: Sequence[Mapping[str, np.ndarray]] | None,
    metrics: Sequence[MetricSpec],
) -> Judgement:
    """Judge ``candidate`` outputs against ``reference`` outputs (one mapping per sample) by ``metrics``.

    ``inputs`` are the samples' feeds (metrics such as ``pooled`` read an input mask).
    A metric passes when its value reaches its floor; the interval is a 95 % interval
    over the metric's items, and ``resolved`` says whether it lies on one side of the floor.
    """
    results = []
    for spec in metrics:
        score = _score(spec, reference, candidate, inputs)
        low, high = _interval(score)
        resolved = not (low < spec.floor <= high) or spec.function is not None
        passed = bool(score.value >= spec.floor) and not math.isnan(score.value)
        results.append(
            MetricResult(
                output=spec.output,
                metric=f"{spec.slice or ''}{':' if spec.slice else ''}{spec.name}{'@' + spec.arg if spec.arg else ''}",
                value=score.value,
                low=low,
                high=high,
                floor=spec.floor,
                passed=passed,
                reason=spec.reason,
                items=score.count,
                near_ties=score.near_ties,
                resolved=resolved,
                needed=None if resolved else samples_needed(score, spec.floor),
            )
        )
    return Judgement(tuple(results))
