"""onnxopt: optimize ONNX models and prove they still do the same job.

The Python API mirrors the CLI::

    import onnxopt
    model = onnxopt.load_model("model.onnx")
    result = onnxopt.load_recipe("fuse").build().run(model)
    onnxopt.save_model(result.model, "model.fused.onnx")
    report = onnxopt.check(model, result.model)
    assert report.passed
"""

from __future__ import annotations

from onnxopt.data import Dataset, load_dataset
from onnxopt.errors import (
    CalibrationDataError,
    ExternalDataError,
    ModelLoadError,
    OnnxoptError,
    RecipeError,
    UnsupportedModelError,
    VerificationError,
)
from onnxopt.harness import PROFILES, Report, Tolerance, Verifier, check, synthesize_inputs
from onnxopt.model import load_model, model_stats, save_model
from onnxopt.pipeline import (
    Context,
    Pass,
    PassManager,
    PassResult,
    PipelineSpec,
    Stage,
    available_passes,
    available_presets,
    create_pass,
    load_recipe,
    register_pass,
    register_preset,
)
from onnxopt.tune import CandidateResult, TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "PROFILES",
    "CalibrationDataError",
    "CandidateResult",
    "Context",
    "Dataset",
    "ExternalDataError",
    "ModelLoadError",
    "OnnxoptError",
    "Pass",
    "PassManager",
    "PassResult",
    "PipelineSpec",
    "RecipeError",
    "Report",
    "Stage",
    "Tolerance",
    "TuneResult",
    "UnsupportedModelError",
    "VerificationError",
    "Verifier",
    "available_passes",
    "available_presets",
    "check",
    "create_pass",
    "load_dataset",
    "load_model",
    "load_recipe",
    "model_stats",
    "register_pass",
    "register_preset",
    "save_model",
    "synthesize_inputs",
    "tune",
]
