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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.timing import Slowdown, interleaved_times, slowdown

__all__ = ["SLOWER", "Slowdown", "latency_rounds", "latency_verdict", "not_slower_than", "slowdown"]

#: int8 up to 3 % slower than its reference still counts as "not slower" (timing resolution)
SLOWER = 1.03


def latency_rounds(models: Sequence[onnx.ModelProto], sample: Sample, *, threads: int | None) -> list[list[float]]:
    """Return every timed run's seconds, per model, interleaved: the int8 pass's timing policy.

    At least 15 rounds and, for fast models, as many as fill half a second; at most 20
    seconds (then at least 5 rounds, so the sign-test interval exists).
    """
    return interleaved_times(
        models, sample, threads=threads, rounds=15, min_seconds=0.5, budget_seconds=20.0, min_rounds=5
    )


def not_slower_than(
    reference: onnx.ModelProto, label: str, sample: Sample, threads: int | None
) -> Callable[[onnx.ModelProto], str | None]:
    """Return a check of a candidate: why it is slower than ``reference`` beyond the noise, or None."""

    def too_slow(candidate: onnx.ModelProto) -> str | None:
        reference_s, candidate_s = latency_rounds([reference, candidate], sample, threads=threads)
        measured = slowdown(reference_s, candidate_s)
        return f"{measured.describe()} as slow as {label}" if measured.slower(SLOWER) else None

    return too_slow


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
    if against.slower(SLOWER):
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
    if versus_input.slower(SLOWER) and reference is not None:
        notes.append(
            f"kept int8: {versus_input.describe()} the time of this pass's float input (the passes before "
            f"it made float faster) but not slower than {label}, at a smaller file; set "
            "latency_reference='input' to keep the faster float model instead"
        )
    return True
