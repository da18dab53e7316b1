"""Numeric-equivalence harness: run two models on the same inputs and judge the outputs.

One module per concern: ``inputs`` (synthesized inputs), ``compare`` (tolerances,
profiles and the per-output comparison), ``report`` (the verdict and its table, JSON and
JUnit forms), ``golden`` (golden and tolerance files), ``check`` (the gate),
``layers`` (layer-wise comparison), ``verify`` (the instrument the pass manager calls),
``metrics`` (task metrics as pure numpy functions), ``judge`` (declared metrics and the
verdict with intervals) and ``inference`` (the metrics inferred from the graph).
"""

from __future__ import annotations

from onnxopt.harness.check import check
from onnxopt.harness.compare import PROFILES, OutputComparison, Tolerance, compare_arrays, compare_outputs
from onnxopt.harness.golden import load_golden, load_tolerances, save_golden
from onnxopt.harness.inference import infer_metrics
from onnxopt.harness.inputs import synthesize_inputs
from onnxopt.harness.judge import (
    Judgement,
    MetricError,
    MetricResult,
    MetricSpec,
    callable_metric,
    judge,
    load_metrics,
    parse_metric,
)
from onnxopt.harness.layers import LayerComparison, compare_layers
from onnxopt.harness.report import LevelResult, Report
from onnxopt.harness.verify import Verifier

__all__: list[str] = [
    "PROFILES",
    "Judgement",
    "LayerComparison",
    "LevelResult",
    "MetricError",
    "MetricResult",
    "MetricSpec",
    "OutputComparison",
    "Report",
    "Tolerance",
    "Verifier",
    "callable_metric",
    "check",
    "compare_arrays",
    "compare_layers",
    "compare_outputs",
    "infer_metrics",
    "judge",
    "load_golden",
    "load_metrics",
    "load_tolerances",
    "parse_metric",
    "save_golden",
    "synthesize_inputs",
]
