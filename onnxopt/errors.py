"""User-facing error types: each names what is wrong and what to do about it.

The CLI turns any :class:`OnnxoptError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "ExternalDataError",
    "ModelLoadError",
    "OnnxoptError",
    "OutputLocationError",
    "RecipeError",
    "UnsupportedModelError",
    "VerificationError",
]


class OnnxoptError(Exception):
    """Base class of every error a user can act on (exit code 2 in the CLI)."""

    exit_code = 2


class ModelLoadError(OnnxoptError):
    """The model file is missing, empty, truncated, corrupt or not ONNX."""


class ExternalDataError(ModelLoadError):
    """External tensor data is missing, unreadable or points outside the model's folder."""


class OutputLocationError(OnnxoptError):
    """An output (model, report, JUnit or golden file) cannot be written where it was asked."""


class UnsupportedModelError(OnnxoptError):
    """The model loads but uses something onnxopt or onnxruntime cannot run."""


class CalibrationDataError(OnnxoptError):
    """Calibration or check data does not fit the model's inputs."""


class RecipeError(OnnxoptError):
    """A pipeline recipe names an unknown pass or parameter, or has a bad value."""


class VerificationError(OnnxoptError):
    """A pass's output no longer matched under the harness; names the pass and output."""

    exit_code = 1

    def __init__(self, message: str, *, pass_name: str, report: object | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.report = report
