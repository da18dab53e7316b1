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
passes and a collapsed one fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import onnx

from onnxopt.data import Dataset, Sample, model_inputs
from onnxopt.errors import CalibrationDataError, OnnxoptError, UnsupportedModelError, VerificationError
from onnxopt.model import ModelSource, load_model, verify_external_data
from onnxopt.runtime import Session, expose_tensors

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "PROFILES",
    "LayerComparison",
    "LevelResult",
    "OutputComparison",
    "Report",
    "Tolerance",
    "Verifier",
    "check",
    "compare_arrays",
    "compare_layers",
    "load_golden",
    "load_tolerances",
    "save_golden",
    "synthesize_inputs",
]

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


# --------------------------------------------------------------------------- inputs


def synthesize_inputs(
    model: onnx.ModelProto,
    *,
    iterations: int = 3,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    float_range: tuple[float, float] = (-1.0, 1.0),
    int_range: tuple[int, int] = (0, 1),
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
    dynamic_dim: int = 64,
) -> Dataset:
    """Make ``iterations`` random samples that fit the model's inputs.

    Floats are uniform in ``float_range``; integers uniform in ``int_range`` (inclusive;
    per input in ``int_ranges``) so that index-like inputs stay in range; booleans are
    fair coin flips. A dynamic dimension takes its value from ``shapes``; otherwise an
    input's first unknown dimension (usually the batch) is 1 and later ones are
    ``dynamic_dim``; dimensions sharing a symbolic name get one value.
    """
    shapes = dict(shapes or {})
    int_ranges = dict(int_ranges or {})
    specs = model_inputs(model)
    unknown = [n for n in [*shapes, *int_ranges] if n not in {s.name for s in specs}]
    if unknown:
        raise CalibrationDataError(
            f"no model input named {unknown[0]!r}; inputs: {', '.join(s.describe() for s in specs)}"
        )
    symbols: dict[str, int] = {}
    resolved: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise CalibrationDataError(
                    f"--shape for {spec.name!r} has {len(shape)} dims, the model expects {spec.describe()}"
                )
            for dim, value in zip(spec.shape, shape, strict=True):
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
            resolved[spec.name] = shape
    for spec in specs:
        if spec.name in resolved:
            continue
        dims = []
        first_unknown = True
        for dim in spec.shape:
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                dims.append(symbols[dim])
                first_unknown = False
            else:
                value = 1 if first_unknown else dynamic_dim
                first_unknown = False
                if isinstance(dim, str):
                    symbols[dim] = value
                dims.append(value)
        resolved[spec.name] = tuple(dims)
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for _ in range(iterations):
        sample: Sample = {}
        for spec in specs:
            shape = resolved[spec.name]
            if spec.dtype == np.bool_:
                sample[spec.name] = np.asarray(rng.random(shape) < 0.5)
            elif np.issubdtype(spec.dtype, np.integer):
                low, high = int_ranges.get(spec.name, int_range)
                sample[spec.name] = np.asarray(rng.integers(low, high + 1, size=shape), dtype=spec.dtype)
            elif np.issubdtype(spec.dtype, np.floating):
                low_f, high_f = float_range
                sample[spec.name] = np.asarray(rng.uniform(low_f, high_f, size=shape), dtype=spec.dtype)
            else:
                raise CalibrationDataError(
                    f"cannot synthesize input {spec.describe()}; pass data with --data"
                )
        samples.append(sample)
    return Dataset(samples, source="synthesized")


# --------------------------------------------------------------------------- comparison


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

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (infinities as strings)."""
        return {k: _json_number(v) for k, v in dataclasses.asdict(self).items()}


def _json_number(value: Any) -> Any:
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

    @property
    def passed(self) -> bool:
        """True when every output passed and nothing structural went wrong."""
        return not self.problems and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "level": self.level,
            "passed": self.passed,
            "problems": self.problems,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass
class Report:
    """The verdict of a check: per optimization level, per output."""

    reference: str
    candidate: str
    profile: str
    samples: int
    levels: list[LevelResult]
    notes: list[str] = field(default_factory=list)
    layers: list[LayerComparison] | None = None

    @property
    def passed(self) -> bool:
        """True when the candidate matched at every level checked."""
        return all(level.passed for level in self.levels)

    def failures(self) -> list[str]:
        """Return one line per failing output or problem."""
        lines: list[str] = []
        for level in self.levels:
            lines.extend(f"[{level.level}] {p}" for p in level.problems)
            for out in level.outputs:
                if not out.passed:
                    lines.append(f"[{level.level}] {out.name}: {'; '.join(out.reasons)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        data: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "profile": self.profile,
            "samples": self.samples,
            "passed": self.passed,
            "levels": [level.to_dict() for level in self.levels],
            "notes": self.notes,
        }
        if self.layers is not None:
            data["layers"] = [dataclasses.asdict(x) for x in self.layers]
        return json.loads(json.dumps(data, default=_json_number))

    def to_junit(self) -> str:
        """Return a JUnit XML document: one test case per output and level."""
        suite = ElementTree.Element(
            "testsuite", name="onnxopt.check", tests=str(sum(len(lv.outputs) for lv in self.levels))
        )
        failures = 0
        for level in self.levels:
            for problem in level.problems:
                case = ElementTree.SubElement(suite, "testcase", classname=f"check.{level.level}", name="structure")
                ElementTree.SubElement(case, "failure", message=problem)
                failures += 1
            for out in level.outputs:
                case = ElementTree.SubElement(suite, "testcase", classname=f"check.{level.level}", name=out.name)
                if not out.passed:
                    ElementTree.SubElement(case, "failure", message="; ".join(out.reasons))
                    failures += 1
        suite.set("failures", str(failures))
        return ElementTree.tostring(suite, encoding="unicode")


def _tolerance_for(
    name: str, profile: Tolerance, overrides: Mapping[str, Mapping[str, float]] | None
) -> Tolerance:
    if not overrides:
        return profile
    merged = dict(overrides.get("*", {}))
    merged.update(overrides.get(name, {}))
    return profile.replace(**merged) if merged else profile


def compare_outputs(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    *,
    profile: str | Tolerance = "exact",
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    level: str = "disabled",
) -> LevelResult:
    """Compare per-sample output dicts, matching outputs by name."""
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
    outputs = [
        compare_arrays(
            name,
            [r[name] for r in reference],
            [c[name] for c in candidate],
            _tolerance_for(name, base, overrides),
        )
        for name in ref_names
        if name in cand_names
    ]
    return LevelResult(level, outputs, problems)


# --------------------------------------------------------------------------- golden files


def save_golden(path: str | Path, samples: Sequence[Sample], outputs: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Save inputs and reference outputs so a later check needs no reference model."""
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, Any] = {"inputs": [], "outputs": []}
    for i, (sample, out) in enumerate(zip(samples, outputs, strict=True)):
        for kind, values in (("inputs", sample), ("outputs", out)):
            names = list(values)
            if i == 0:
                index[kind] = names
            for k, name in enumerate(names):
                arrays[f"{kind}_{i}_{k}"] = values[name]
    index["samples"] = len(samples)
    arrays["__index__"] = np.array(json.dumps(index))
    target = Path(path)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return target


def load_golden(path: str | Path) -> tuple[Dataset, list[dict[str, np.ndarray]]]:
    """Load what :func:`save_golden` wrote: (inputs, reference outputs)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            index = json.loads(str(npz["__index__"]))
            samples, outputs = [], []
            for i in range(index["samples"]):
                samples.append({n: npz[f"inputs_{i}_{k}"] for k, n in enumerate(index["inputs"])})
                outputs.append({n: npz[f"outputs_{i}_{k}"] for k, n in enumerate(index["outputs"])})
    except (OSError, KeyError, ValueError) as exc:
        raise CalibrationDataError(f"{path} is not a golden-outputs file written by --save-outputs ({exc})") from exc
    return Dataset(samples, source=str(path)), outputs


def load_tolerances(path: str | Path) -> dict[str, dict[str, float]]:
    """Read per-output tolerance overrides from TOML (``[outputs.NAME]``, ``[default]``)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CalibrationDataError(f"{path}: cannot read tolerances ({exc})") from exc
    valid = {f.name for f in dataclasses.fields(Tolerance)}
    result: dict[str, dict[str, float]] = {}
    tables = {"*": data.get("default", {}), **data.get("outputs", {})}
    for name, table in tables.items():
        bad = [k for k in table if k not in valid]
        if bad:
            raise CalibrationDataError(f"{path}: unknown tolerance {bad[0]!r}; valid: {', '.join(sorted(valid))}")
        result[name] = dict(table)
    return result


# --------------------------------------------------------------------------- check


def _as_model(source: ModelSource) -> tuple[onnx.ModelProto, onnx.ModelProto | str]:
    """Return (the model's graph for signatures, what a session is built from).

    A file is given to onnxruntime as is, with only its graph loaded here (external
    data checked, not read), so checking a large model holds no Python copy of it.
    """
    if isinstance(source, onnx.ModelProto):
        return source, source
    if isinstance(source, bytes | bytearray):
        model = load_model(source)
        return model, model
    model = load_model(source, load_external_data=False)
    verify_external_data(model, source)
    return model, str(source)


def _check_samples_fit(model: onnx.ModelProto, data: Dataset, label: str) -> None:
    from onnxopt.data import validate_dataset

    try:
        validate_dataset(data, model_inputs(model))
    except CalibrationDataError as exc:
        raise CalibrationDataError(f"data does not fit the {label}: {exc}") from exc


def check(
    reference: ModelSource | None,
    candidate: ModelSource,
    data: Dataset | None = None,
    *,
    profile: str = "exact",
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    levels: Sequence[str] = ("disabled", "default"),
    reference_outputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    synthesize: Mapping[str, Any] | None = None,
    layers: bool = False,
) -> Report:
    """Run reference and candidate on the same inputs and compare every output.

    ``data`` defaults to synthesized inputs (``synthesize`` passes options to
    :func:`synthesize_inputs`). ``reference_outputs`` replaces running the reference
    (golden outputs). The candidate runs at each of ``levels`` (onnxruntime
    optimization levels); the reference always runs with optimizations disabled.
    """
    if profile not in PROFILES:
        raise OnnxoptError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    cand_model, cand_source = _as_model(candidate)
    ref_model, ref_source = _as_model(reference) if reference is not None else (None, None)
    if data is None:
        if ref_model is None:
            raise CalibrationDataError("golden outputs need their inputs; pass --data or a golden file")
        data = synthesize_inputs(ref_model, **dict(synthesize or {}))
    if ref_model is not None:
        _check_samples_fit(ref_model, data, "reference")
    _check_samples_fit(cand_model, data, "candidate")
    notes: list[str] = []
    if reference_outputs is None:
        if ref_model is None:
            raise OnnxoptError("no reference: pass a reference model or --load-outputs")
        try:
            with Session(ref_source, optimization="disabled", label="reference") as session:  # type: ignore[arg-type]
                reference_outputs = [session.run(s) for s in data]
        except UnsupportedModelError as exc:
            if data.source != "synthesized":
                raise
            raise UnsupportedModelError(
                f"{exc} (the inputs were synthesized: pass real inputs with --data, or fit them to the model "
                "with --shape NAME:DIMS and --int-range NAME:LOW:HIGH)"
            ) from exc
    results: list[LevelResult] = []
    for level in levels:
        with Session(cand_source, optimization=level, label="candidate") as session:
            cand_outputs = [session.run(s) for s in data]
        results.append(compare_outputs(reference_outputs, cand_outputs, profile=profile,
                                       overrides=overrides, level=level))
    by_level = {r.level: r.passed for r in results}
    if by_level.get("disabled") and by_level.get("default") is False:
        notes.append(
            "the candidate matches with onnxruntime's graph optimizations disabled; the "
            "difference comes from onnxruntime's own rewrites at its default level"
        )
    report = Report(
        reference="<golden outputs>" if ref_model is None else _label(reference),
        candidate=_label(candidate), profile=profile, samples=len(data),
        levels=results, notes=notes,
    )
    if layers and ref_model is not None:
        report.layers = compare_layers(_in_memory(reference, ref_model), _in_memory(candidate, cand_model), data[0],
                                       profile=profile)
    return report


def _in_memory(source: ModelSource | None, graph_only: onnx.ModelProto) -> onnx.ModelProto:
    """Return the whole model (weights included) for rewriting, e.g. to expose tensors."""
    return load_model(source) if isinstance(source, str | Path) else graph_only


def _label(source: ModelSource | None) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "<in-memory model>"


# --------------------------------------------------------------------------- layers


@dataclass
class LayerComparison:
    """One intermediate tensor matched between the two models."""

    reference: str
    candidate: str
    op_type: str
    matched_by: str
    shape: list[int]
    max_abs: float
    cosine: float
    sqnr_db: float
    passed: bool


def _producers(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """Return (tensor, op_type, occurrence of that op type) for main-graph node outputs."""
    seen: dict[str, int] = {}
    result = []
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        for slot, out in enumerate(node.output):
            if out:
                result.append((out, node.op_type, n * 16 + slot))
    return result


def compare_layers(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    sample: Sample,
    *,
    profile: str = "exact",
) -> list[LayerComparison]:
    """Compare intermediate tensors of two models on one sample, in reference order.

    Tensors are matched by name where the name survived, otherwise by producer (the
    same op type at the same position among nodes of that type, with equal shape).
    """
    ref_prod = _producers(reference)
    cand_prod = _producers(candidate)
    with Session(expose_tensors(reference, [t for t, _, _ in ref_prod]), label="reference") as s:
        ref_values = s.run(sample)
    with Session(expose_tensors(candidate, [t for t, _, _ in cand_prod]), label="candidate") as s:
        cand_values = s.run(sample)
    cand_by_slot = {(op, pos): t for t, op, pos in cand_prod}
    tolerance = PROFILES[profile]
    rows = []
    for tensor, op_type, pos in ref_prod:
        ref = ref_values.get(tensor)
        if ref is None or not np.issubdtype(ref.dtype, np.floating):
            continue
        if tensor in cand_values:
            other, how = tensor, "name"
        elif (op_type, pos) in cand_by_slot:
            other, how = cand_by_slot[(op_type, pos)], "producer"
        else:
            continue
        cand = cand_values.get(other)
        if cand is None or cand.shape != ref.shape or cand.dtype != ref.dtype:
            continue
        result = compare_arrays(tensor, [ref], [cand], tolerance)
        rows.append(LayerComparison(tensor, other, op_type, how, list(ref.shape), result.max_abs,
                                    result.cosine, result.sqnr_db, result.passed))
    return rows


# --------------------------------------------------------------------------- verify


class Verifier:
    """PassManager instrument: check the model after every pass that changed it.

    An exact pass is compared with the model before it under the ``exact`` profile; a
    lossy pass (``exact = False``) with the original model under its own ``profile``
    attribute (default ``int8``). A failure raises :class:`VerificationError` naming the
    pass and the output. One Verifier serves one pipeline run at a time.
    """

    def __init__(
        self,
        data: Dataset | None = None,
        *,
        lossy_profile: str = "int8",
        iterations: int = 2,
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        synthesize: Mapping[str, Any] | None = None,
    ) -> None:
        self.data = data
        self.lossy_profile = lossy_profile
        self.iterations = iterations
        self.overrides = overrides
        self.synthesize = dict(synthesize or {})
        self._samples: Dataset | None = None
        self._original: list[dict[str, np.ndarray]] = []
        self._previous: list[dict[str, np.ndarray]] = []

    def before_pipeline(self, model: onnx.ModelProto, ctx: Any) -> None:
        """Run the model as it enters the pipeline; its outputs are the references."""
        samples = self.data
        if samples is None and getattr(ctx, "calibration", None) is not None:
            samples = ctx.calibration.split()[1]
        if samples is None:
            samples = synthesize_inputs(model, **{"iterations": self.iterations, **self.synthesize})
        self._samples = samples
        with Session(model, label="input model") as session:
            self._original = [session.run(s) for s in samples]
        self._previous = self._original

    def after_pass(self, pass_: Any, record: Any, model: onnx.ModelProto, ctx: Any) -> None:
        """Compare the pass's output; raise VerificationError if it broke equivalence."""
        if not record.changed or self._samples is None:
            return
        with Session(model, label=f"output of pass {pass_.name!r}") as session:
            outputs = [session.run(s) for s in self._samples]
        exact = bool(getattr(pass_, "exact", True))
        profile = "exact" if exact else getattr(pass_, "profile", self.lossy_profile)
        against = self._previous if exact else self._original
        result = compare_outputs(against, outputs, profile=profile, overrides=self.overrides)
        record.checks["verify"] = {
            "profile": profile,
            "passed": result.passed,
            "outputs": {o.name: {"max_abs": o.max_abs, "cosine": o.cosine, "sqnr_db": _json_number(o.sqnr_db)}
                        for o in result.outputs},
        }
        if not result.passed:
            failing = result.problems + [f"{o.name}: {'; '.join(o.reasons)}" for o in result.outputs if not o.passed]
            raise VerificationError(
                f"pass {pass_.name!r} broke equivalence ({profile} profile): {failing[0]}",
                pass_name=pass_.name, report=result,
            )
        self._previous = outputs


def parse_named_values(items: Iterable[str], what: str) -> dict[str, str]:
    """Parse ``name:value`` options (``--atol out0:1e-3``); the name may contain colons."""
    parsed = {}
    for item in items:
        match = re.match(r"^(.*):([^:]+)$", item)
        if not match or not match.group(1):
            raise CalibrationDataError(f"{what} {item!r}: expected NAME:VALUE")
        parsed[match.group(1)] = match.group(2)
    return parsed
