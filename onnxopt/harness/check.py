"""``check``: run a reference and a candidate on the same inputs and judge every output."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.data import Dataset, model_inputs
from onnxopt.errors import CalibrationDataError, OnnxoptError, UnsupportedModelError
from onnxopt.harness.compare import PROFILES, LevelResult, compare_outputs
from onnxopt.harness.inference import infer_metrics
from onnxopt.harness.inputs import synthesize_inputs
from onnxopt.harness.judge import MetricSpec
from onnxopt.harness.layers import compare_layers
from onnxopt.harness.report import Report
from onnxopt.harness.vacuous import vacuous_outputs, vacuous_warning
from onnxopt.model import ModelSource, load_model, verify_external_data
from onnxopt.runtime import Session

log = logging.getLogger(__name__)


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
    metrics: Sequence[MetricSpec] = (),
    infer: bool | None = None,
) -> Report:
    """Run reference and candidate on the same inputs and compare every output.

    ``data`` defaults to synthesized inputs (``synthesize`` passes options to
    :func:`synthesize_inputs`). ``reference_outputs`` replaces running the reference
    (golden outputs). The candidate runs at each of ``levels`` (onnxruntime
    optimization levels); the reference always runs with optimizations disabled.

    ``metrics`` are declared task metrics; ``infer`` (default: for the ``int8``
    profile) adds the judge's inferred metrics for every output no declared one covers,
    from the reference model's graph (the candidate's with golden outputs).
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
    if infer is None:
        infer = profile == "int8"
    judged = list(metrics)
    if infer:
        judged = infer_metrics(ref_model if ref_model is not None else cand_model, reference_outputs, declared=judged)
    synthesized = data.source == "synthesized"
    for name, what in vacuous_outputs(reference_outputs).items():
        notes.append(f"warning: {vacuous_warning(name, what, synthesized)}")
    results: list[LevelResult] = []
    for level in levels:
        with Session(cand_source, optimization=level, label="candidate") as session:
            cand_outputs = [session.run(s) for s in data]
        results.append(
            compare_outputs(
                reference_outputs,
                cand_outputs,
                profile=profile,
                overrides=overrides,
                level=level,
                metrics=judged,
                inputs=list(data),
            )
        )
    by_level = {r.level: r.passed for r in results}
    if by_level.get("disabled") and by_level.get("default") is False:
        notes.append(
            "the candidate matches with onnxruntime's graph optimizations disabled; the "
            "difference comes from onnxruntime's own rewrites at its default level"
        )
    report = Report(
        reference="<golden outputs>" if ref_model is None else _label(reference),
        candidate=_label(candidate),
        profile=profile,
        samples=len(data),
        levels=results,
        notes=notes,
        metrics=judged,
    )
    if layers and ref_model is not None:
        report.layers = compare_layers(
            _in_memory(reference, ref_model), _in_memory(candidate, cand_model), data[0], profile=profile
        )
    return report


def _in_memory(source: ModelSource | None, graph_only: onnx.ModelProto) -> onnx.ModelProto:
    """Return the whole model (weights included) for rewriting, e.g. to expose tensors."""
    return load_model(source) if isinstance(source, str | Path) else graph_only


def _label(source: ModelSource | None) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "<in-memory model>"
