"""The int8 pass's final latency check: keep int8 unless it is measurably slower (private).

"Measurably" means beyond the timing's own noise: the models run interleaved, round ``i``
of each back to back, and the per-round ratios ``int8_i / float_i`` give the median ratio
and a distribution-free 95 % interval for it (order statistics of the binomial
sign test). int8 is rejected only when the whole interval lies above the tolerance
(3 % slower). On a quiet machine the interval is a few percent wide and a real slowdown
is caught; on a loaded one, or for a model that runs in tens of microseconds, the interval
is wide and a noisy 1.05x no longer flips the result to float. The note gives the interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnxopt.passes.quantize.fallback import latency_rounds

__all__ = ["SLOWER", "Slowdown", "latency_verdict", "slowdown"]

#: int8 up to 3 % slower than its reference still counts as "not slower" (timing resolution)
SLOWER = 1.03


@dataclass(frozen=True)
class Slowdown:
    """A candidate's time over a reference's: the median per-round ratio and its 95 % interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    def slower(self, tolerance: float = SLOWER) -> bool:
        """Return True when the candidate is slower beyond ``tolerance`` and beyond the noise."""
        return self.low > tolerance

    def describe(self) -> str:
        """Return e.g. ``1.05x [0.97, 1.12] over 40 rounds``."""
        return f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}] over {self.rounds} rounds"


def slowdown(reference: Sequence[float], candidate: Sequence[float], z: float = 1.96) -> Slowdown:
    """Return the median of ``candidate_i / reference_i`` over paired rounds and its interval.

    The interval is the ``k``-th smallest to the ``k``-th largest ratio with
    ``k = floor((n - z·√n) / 2)``: the normal approximation of the sign test's confidence
    interval for a median, which assumes nothing about the noise's distribution.
    With fewer than 6 rounds ``k`` is 0 and the interval is the full range.
    """
    ratios = np.sort(np.asarray(candidate, np.float64) / np.maximum(np.asarray(reference, np.float64), 1e-12))
    n = len(ratios)
    if n == 0:
        return Slowdown(1.0, 0.0, math.inf, 0)
    k = max(math.floor((n - z * math.sqrt(n)) / 2), 0)
    return Slowdown(float(np.median(ratios)), float(ratios[k]), float(ratios[n - 1 - k]), n)


def latency_verdict(
    check_latency: bool,
    threads: int | None,
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    sample: dict[str, np.ndarray],
    reference: onnx.ModelProto | None,
    stats: dict[str, Any],
    notes: list[str],
) -> bool:
    """Time the models; return False when int8 is measurably slower than the model it must not lose to.

    That model is the pipeline's starting model (``latency_reference="source"``, when the
    pipeline kept it) or this pass's float input (``"input"``, e.g. after fusion).
    """
    if not check_latency:
        return True
    models = [float_model, quantized] + ([reference] if reference is not None else [])
    times = latency_rounds(models, sample, threads=threads)
    float_s, int8_s = float(np.median(times[0])), float(np.median(times[1]))
    stats["latency_float_ms"] = round(float_s * 1e3, 3)
    stats["latency_int8_ms"] = round(int8_s * 1e3, 3)
    versus_input = slowdown(times[0], times[1])
    text = (
        f"latency on the first calibration sample: float input of this pass {float_s * 1e3:.2f} ms, "
        f"int8 {int8_s * 1e3:.2f} ms ({versus_input.describe()})"
    )
    against, label = versus_input, "this pass's float input"
    if reference is not None:
        source_s = float(np.median(times[2]))
        against, label = slowdown(times[2], times[1]), "the pipeline's starting model"
        stats["latency_source_ms"] = round(source_s * 1e3, 3)
        text += f", pipeline's starting model {source_s * 1e3:.2f} ms ({against.describe()})"
    stats["latency_ratio"] = round(against.ratio, 3)
    stats["latency_ratio_interval"] = [round(against.low, 3), round(against.high, 3)]
    notes.append(text)
    if against.slower():
        notes.append(
            f"the int8 model is slower than {label} on this machine beyond the timing noise "
            f"({against.describe()}, all above {SLOWER}x); kept the float model "
            "(set check_latency=false to keep int8 anyway)"
        )
        return False
    if against.ratio > SLOWER:
        notes.append(
            f"kept int8: {against.describe()} of {label}'s time, but the interval reaches {SLOWER}x "
            "or below, so no slowdown was measured beyond the timing noise"
        )
    if versus_input.slower() and reference is not None:
        notes.append(
            f"kept int8: {versus_input.describe()} the time of this pass's float input (the passes before "
            f"it made float faster) but not slower than {label}, at a smaller file; set "
            "latency_reference='input' to keep the faster float model instead"
        )
    return True
