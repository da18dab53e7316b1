"""Activation ranges for int8 from the calibration data (private).

Streaming observers (:mod:`onnxopt.calibration`) see one sample at a time; a tensor read
only by saturating activations is observed on its values clamped to what those readers
distinguish (``saturation``); a tensor holding non-finite values, or none, is blocked
(it stays float) with the reason. Calibration's own peak memory and time land in the stats.
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxopt.calibration import SaturatedObserver, choose_range, collect_statistics, make_observer
from onnxopt.data import Dataset
from onnxopt.progress import Progress

__all__ = ["RangeSettings", "calibrate_ranges"]


@dataclass(frozen=True)
class RangeSettings:
    """How ranges are chosen: the method, the activation type, and the methods' knobs."""

    method: str
    dtype: np.dtype
    percentile: float
    averaging_constant: float | None


def calibrate_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    data: Dataset,
    settings: RangeSettings,
    bounds: dict[str, tuple[float | None, float | None]],
    stats: dict[str, Any],
    *,
    progress: Progress | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Return the calibrated range of each tensor and the tensors blocked (tensor → reason)."""
    started = time.perf_counter()
    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()

    def observer(name: str) -> Any:
        inner = make_observer(settings.method, averaging_constant=settings.averaging_constant)
        return SaturatedObserver(inner, *bounds[name]) if name in bounds else inner

    try:
        observers = collect_statistics(model, tensors, data, observer, progress=progress)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if tracing:
            tracemalloc.stop()
    ranges, blocked = {}, {}
    for name, stats_of in observers.items():
        if stats_of.nonfinite:
            blocked[name] = f"holds {stats_of.nonfinite} non-finite values (e.g. an attention mask)"
        elif stats_of.empty():
            blocked[name] = "had no values during calibration"
        else:
            ranges[name] = choose_range(stats_of, settings.method, settings.dtype, percentile=settings.percentile)
    stats["calibration_seconds"] = round(time.perf_counter() - started, 3)
    stats["calibration_peak_bytes"] = int(peak)
    stats["calibration_samples"] = len(data)
    return ranges, blocked
