"""Numeric-equivalence harness: run two models on the same inputs and judge the outputs.

One module per concern: ``inputs`` (synthesized inputs), ``compare`` (tolerances,
profiles and the per-output comparison), ``report`` (the verdict and its table, JSON and
JUnit forms), ``golden`` (golden and tolerance files), ``check`` (the gate),
``layers`` (layer-wise comparison) and ``verify`` (the instrument the pass manager calls).
"""

from __future__ import annotations

from onnxopt.harness.check import check
from onnxopt.harness.compare import PROFILES, OutputComparison, Tolerance, compare_arrays, compare_outputs
from onnxopt.harness.golden import load_golden, load_tolerances, save_golden
from onnxopt.harness.inputs import synthesize_inputs
from onnxopt.harness.layers import LayerComparison, compare_layers
from onnxopt.harness.report import LevelResult, Report
from onnxopt.harness.verify import Verifier

__all__: list[str] = [
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
    "compare_outputs",
    "load_golden",
    "load_tolerances",
    "save_golden",
    "synthesize_inputs",
]
