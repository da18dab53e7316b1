"""Numeric-equivalence harness: run two models on the same inputs and judge the outputs.

Comparison is data, not code paths: a :class:`Tolerance` per output says how to judge
it, a profile (``exact``, ``fp16``, ``int8``) supplies the defaults, and every verdict
comes with the tolerance that *would* have passed, so a failure is actionable.

Element-wise rule (``exact``/``fp16``): ``|c - r| <= atol + rtol*|r| + range_tol*max|r|``.
The ``range_tol`` term scales with the output's own range, so values that are near zero
only through cancellation do not fail a legitimate reordering of float sums, while a
0.2 % change of an output fails on every element above a tenth of its range. ``atol``
(1e-6 for ``exact``, about eight float32 ulps at 1.0) covers outputs that are all tiny,
such as a sigmoid map that is ~0 everywhere.

Statistical rule (``int8``): cosine similarity, SQNR (dB) and, for score-like outputs,
top-1 agreement must each reach a floor; a quantized model that still does its job
passes and a collapsed one fails. When :func:`compare_outputs` is given metrics (the
judge's, :mod:`onnxopt.harness.judge`), they decide instead for the outputs they cover:
the statistics are still reported, the floors of the profile no longer apply there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxopt.harness.judge import MetricResult, MetricSpec, judge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How one output is judged.

    Element-wise bounds apply when ``elementwise`` is True; the ``min_*`` floors apply
    whenever they are set (``min_top1`` only to score-like outputs).
    """

    atol: float = 0.0
    rtol: float = 1e-3
    range_tol: float = 1e-4
    elementwise: bool = True
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None

    def replace(self, **changes: Any) -> Tolerance:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


#: Built-in profiles. ``exact`` admits float reassociation (fusions, onnxruntime's own
#: fused kernels); ``fp16`` admits half-precision rounding; ``int8`` judges by signal
#: quality so that a working quantized model passes and a collapsed one fails.
PROFILES: dict[str, Tolerance] = {
    "exact": Tolerance(atol=1e-6, rtol=1e-3, range_tol=1e-4),
    "fp16": Tolerance(atol=1e-4, rtol=1e-2, range_tol=2e-3, min_cosine=0.9999),
    "int8": Tolerance(elementwise=False, min_cosine=0.995, min_sqnr_db=20.0, min_top1=0.98),
}


@dataclass
class OutputComparison:
    """Statistics and verdict for one output over all samples."""

    name: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    max_abs: float = 0.0
    mean_abs: float = 0.0
    median_abs: float = 0.0
    max_rel: float = 0.0
    mean_rel: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1: float | None = None
    mismatched: float = 0.0
    min_atol: float = 0.0
    min_rtol: float = 0.0
    elements: int = 0
    metrics: list[MetricResult] = field(default_factory=list)  # the judge's verdicts on this output

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (infinities as strings)."""
        data = {k: json_number(v) for k, v in dataclasses.asdict(self).items() if k != "metrics"}
        data["metrics"] = [m.to_dict() for m in self.metrics]
        return data


def json_number(value: Any) -> Any:
    """Return ``value`` as JSON can hold it: a non-finite float becomes its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _looks_like_scores(array: np.ndarray) -> bool:
    """Return True for ``[batch, classes]`` float outputs, except rows of unit length.

    A row of L2 norm 1 is a normalized embedding (a direction): its arg-max means nothing.
    A top-1 floor failed a low-rank MiniLM on 24 sentences (top-1 0.958) whose sentence
    embedding kept cosine 0.9988 and SQNR 26.3 dB on them. Probabilities sum to 1 and
    are not of unit length unless one-hot, which stays judged.
    """
    if array.ndim != 2 or array.shape[-1] < 2 or not np.issubdtype(array.dtype, np.floating):
        return False
    norms = np.linalg.norm(np.asarray(array, dtype=np.float64), axis=-1)
    unit_length = bool(np.all(np.abs(norms - 1.0) < 1e-3))
    return not unit_length or bool(np.all(np.count_nonzero(array, axis=-1) <= 1))


def _finite_values(r_in: np.ndarray, c_in: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Return one sample's float64 values where both are finite, and the two non-finite counts.

    The counts are: candidate NaN/Inf where the reference is finite, and non-finite
    reference values the candidate does not reproduce.
    """
    r = np.asarray(r_in, dtype=np.float64).ravel()
    c = np.asarray(c_in, dtype=np.float64).ravel()
    r_ok, c_ok = np.isfinite(r), np.isfinite(c)
    broken = int(np.count_nonzero(r_ok & ~c_ok))
    unreproduced = 0
    special = ~r_ok
    if special.any():
        same = (r[special] == c[special]) | (np.isnan(r[special]) & np.isnan(c[special]))
        unreproduced = int(np.count_nonzero(~same))
    keep = r_ok & c_ok
    if keep.all():
        return r, c, broken, unreproduced
    return r[keep], c[keep], broken, unreproduced


def _compare_floats(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    tolerance: Tolerance,
    reasons: list[str],
) -> OutputComparison:
    """Statistics over all samples, one sample's temporaries at a time.

    Two passes: the first finds the output's range and RMS (which the tolerance and the
    relative error depend on), the second accumulates everything else; only the
    absolute differences are kept whole (float32), for the median.
    """
    count = broken = unreproduced = 0
    scale = sum_r2 = 0.0
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, _, n_broken, n_unreproduced = _finite_values(r_in, c_in)
        broken += n_broken
        unreproduced += n_unreproduced
        count += r.size
        if r.size:
            scale = max(scale, float(np.max(np.abs(r))))
            sum_r2 += float(np.dot(r, r))
    if broken:
        reasons.append(f"{broken} NaN/Inf values where the reference is finite")
    if unreproduced:
        reasons.append(f"{unreproduced} non-finite reference values not reproduced")
    result = OutputComparison(name, True, elements=int(sum(np.asarray(r).size for r in reference)))
    if count == 0:
        return result
    rms = math.sqrt(sum_r2 / count)
    floor = max(0.01 * rms, 1e-12)
    sum_c2 = dot = noise = sum_abs = sum_rel = 0.0
    over_count = 0
    max_rel = min_atol = min_rtol = 0.0
    worst: tuple[float, float, float] | None = None  # (excess, diff, reference value)
    all_diffs = np.empty(count, dtype=np.float32)
    filled = 0
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, c, _, _ = _finite_values(r_in, c_in)
        if not r.size:
            continue
        diff = np.abs(c - r)
        abs_r = np.abs(r)
        all_diffs[filled : filled + diff.size] = diff
        filled += diff.size
        sum_c2 += float(np.dot(c, c))
        dot += float(np.dot(r, c))
        noise += float(np.dot(diff, diff))
        sum_abs += float(diff.sum())
        rel = diff / np.maximum(abs_r, floor)
        sum_rel += float(rel.sum())
        max_rel = max(max_rel, float(rel.max()))
        excess = diff - (tolerance.atol + tolerance.rtol * abs_r + tolerance.range_tol * scale)
        over_count += int(np.count_nonzero(excess > 0))
        i = int(np.argmax(excess))
        if worst is None or excess[i] > worst[0]:
            worst = (float(excess[i]), float(diff[i]), float(r[i]))
        min_atol = max(min_atol, float((excess + tolerance.atol).max()))
        residual = diff - tolerance.atol - tolerance.range_tol * scale
        needs = residual > 0
        if needs.any():
            if np.any(needs & (r == 0)):
                min_rtol = math.inf
            elif min_rtol != math.inf:
                min_rtol = max(min_rtol, float((residual[needs] / abs_r[needs]).max()))
    result.max_abs = float(all_diffs.max())
    result.mean_abs = sum_abs / count
    result.median_abs = float(np.median(all_diffs, overwrite_input=True))
    result.max_rel = max_rel
    result.mean_rel = sum_rel / count
    norm = math.sqrt(sum_r2 * sum_c2)
    result.cosine = dot / norm if norm > 0 else (1.0 if result.max_abs == 0 else 0.0)
    result.sqnr_db = math.inf if noise == 0 else 10 * math.log10(max(sum_r2, 1e-300) / noise)
    result.mismatched = over_count / count
    result.min_atol = max(0.0, min_atol)
    result.min_rtol = min_rtol
    if tolerance.elementwise and over_count and worst is not None:
        reasons.append(
            f"{over_count} of {count} values out of tolerance (worst |diff| {worst[1]:.3g} "
            f"at reference {worst[2]:.3g}); passes with atol>={result.min_atol:.3g} or "
            f"rtol>={result.min_rtol:.3g}"
        )
    return result


def _top1_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float | None:
    """Return how often the arg-max of the last axis agrees, over rows with a unique winner.

    Rows whose reference has a tie at the top (all-zero ReLU rows, say) have no
    meaningful top-1 and are left out; None when no row has a winner.
    """
    agree = total = 0
    for r, c in zip(reference, candidate, strict=True):
        rows_r = r.reshape(-1, r.shape[-1])
        rows_c = c.reshape(-1, c.shape[-1])
        top_two = -np.partition(-rows_r, 1, axis=-1)[:, :2]
        decided = top_two[:, 0] > top_two[:, 1]
        total += int(decided.sum())
        agree += int((np.argmax(rows_r, -1) == np.argmax(rows_c, -1))[decided].sum())
    return agree / total if total else None


def compare_arrays(
    name: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    tolerance: Tolerance,
) -> OutputComparison:
    """Compare one output across samples (reference first) under ``tolerance``."""
    reasons: list[str] = []
    for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        if r.shape != c.shape:
            return OutputComparison(name, False, [f"shape {c.shape} != reference {r.shape} (sample {i})"])
        if r.dtype != c.dtype:
            return OutputComparison(name, False, [f"dtype {c.dtype} != reference {r.dtype}"])
    if not reference:
        return OutputComparison(name, True)
    dtype = reference[0].dtype
    if not np.issubdtype(dtype, np.floating):
        ref = np.concatenate([np.asarray(r).ravel() for r in reference])
        cand = np.concatenate([np.asarray(c).ravel() for c in candidate])
        same = float(np.mean(ref == cand)) if ref.size else 1.0
        result = OutputComparison(name, True, elements=int(ref.size), mismatched=1.0 - same)
        floor = tolerance.min_top1 if not tolerance.elementwise and tolerance.min_top1 else 1.0
        if same < floor:
            result.passed = False
            result.reasons.append(f"{(1 - same):.2%} of {dtype} values differ")
        return result
    result = _compare_floats(name, reference, candidate, tolerance, reasons)
    if _looks_like_scores(reference[0]):
        result.top1 = _top1_agreement(reference, candidate)
    if tolerance.min_cosine is not None and result.cosine < tolerance.min_cosine:
        reasons.append(f"cosine {result.cosine:.6f} < {tolerance.min_cosine}")
    if tolerance.min_sqnr_db is not None and result.sqnr_db < tolerance.min_sqnr_db:
        reasons.append(f"SQNR {result.sqnr_db:.1f} dB < {tolerance.min_sqnr_db} dB")
    if tolerance.min_top1 is not None and result.top1 is not None and result.top1 < tolerance.min_top1:
        reasons.append(f"top-1 agreement {result.top1:.4f} < {tolerance.min_top1}")
    result.reasons = reasons
    result.passed = not reasons
    return result


@dataclass
class LevelResult:
    """The comparison at one onnxruntime optimization level of the candidate."""

    level: str
    outputs: list[OutputComparison]
    problems: list[str] = field(default_factory=list)
    metrics: list[MetricResult] = field(default_factory=list)  # every verdict of the judge, all outputs

    @property
    def passed(self) -> bool:
        """True when every output and every metric passed and nothing structural went wrong."""
        return not self.problems and all(o.passed for o in self.outputs) and all(m.passed for m in self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "level": self.level,
            "passed": self.passed,
            "problems": self.problems,
            "outputs": [o.to_dict() for o in self.outputs],
            "metrics": [m.to_dict() for m in self.metrics],
        }


def _tolerance_for(name: str, profile: Tolerance, overrides: Mapping[str, Mapping[str, float]] | None) -> Tolerance:
    if not overrides:
        return profile
    merged = dict(overrides.get("*", {}))
    merged.update(overrides.get(name, {}))
    return profile.replace(**merged) if merged else profile


_FLOOR_FIELDS = ("min_cosine", "min_sqnr_db", "min_top1")


def _judged_tolerance(
    tolerance: Tolerance, name: str, overrides: Mapping[str, Mapping[str, float]] | None
) -> Tolerance:
    """Drop the profile's signal floors on an output the judge covers, keeping floors the user set."""
    explicit = {**dict((overrides or {}).get("*", {})), **dict((overrides or {}).get(name, {}))}
    return tolerance.replace(**{f: explicit.get(f) for f in _FLOOR_FIELDS})


def compare_outputs(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    *,
    profile: str | Tolerance = "exact",
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    level: str = "disabled",
    metrics: Sequence[MetricSpec] = (),
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> LevelResult:
    """Compare per-sample output dicts, matching outputs by name.

    ``metrics`` (the judge's) decide for the outputs they name; ``inputs`` are the
    samples' feeds, which some metrics read (an attention mask).
    """
    base = PROFILES[profile] if isinstance(profile, str) else profile
    ref_names = list(reference[0]) if reference else []
    cand_names = list(candidate[0]) if candidate else []
    problems = []
    missing = [n for n in ref_names if n not in cand_names]
    extra = [n for n in cand_names if n not in ref_names]
    if missing:
        problems.append(f"candidate lacks output(s) {missing}")
    if extra:
        problems.append(f"candidate has extra output(s) {extra}")
    shared = [n for n in ref_names if n in cand_names]
    outputs = []
    for name in shared:
        tolerance = _tolerance_for(name, base, overrides)
        judged = any(m.output == name for m in metrics)
        if judged and not tolerance.elementwise:
            tolerance = _judged_tolerance(tolerance, name, overrides)
        outputs.append(compare_arrays(name, [r[name] for r in reference], [c[name] for c in candidate], tolerance))
    results: list[MetricResult] = []
    structural = {o.name for o in outputs if any("shape" in r or "dtype" in r for r in o.reasons)}
    usable = [m for m in metrics if m.output == "*" or (m.output in shared and m.output not in structural)]
    if usable and not missing:
        results = list(judge(reference, candidate, inputs, usable).results)
    for out in outputs:
        out.metrics = [r for r in results if r.output == out.name]
        failing = [r for r in out.metrics if not r.passed]
        out.reasons.extend(r.describe() for r in failing)
        out.passed = out.passed and not failing
    return LevelResult(level, outputs, problems, results)
