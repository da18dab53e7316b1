"""The int8 pass's final latency check: keep int8 only when it is not slower (private)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnxopt.passes.quantize.fallback import measure_latency

__all__ = ["latency_verdict"]


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
    """Time the models; return False when int8 is slower than the model it must not lose to.

    That model is the pipeline's starting model (``latency_reference="source"``, when the
    pipeline kept it) or this pass's float input (``"input"``, e.g. after fusion).
    """
    if not check_latency:
        return True
    models = [float_model, quantized] + ([reference] if reference is not None else [])
    timings = measure_latency(models, sample, threads=threads)
    float_s, int8_s = timings[0], timings[1]
    stats["latency_float_ms"] = round(float_s * 1e3, 3)
    stats["latency_int8_ms"] = round(int8_s * 1e3, 3)
    text = (
        f"latency on the first calibration sample: float input of this pass {float_s * 1e3:.2f} ms, "
        f"int8 {int8_s * 1e3:.2f} ms ({int8_s / float_s:.2f}x)"
    )
    against, label = float_s, "this pass's float input"
    if reference is not None:
        source_s = timings[2]
        stats["latency_source_ms"] = round(source_s * 1e3, 3)
        text += f", pipeline's starting model {source_s * 1e3:.2f} ms ({int8_s / source_s:.2f}x)"
        against, label = source_s, "the pipeline's starting model"
    notes.append(text)
    if int8_s > 1.03 * against:
        notes.append(
            f"the int8 model is slower than {label} on this machine; kept the float model "
            "(set check_latency=false to keep int8 anyway)"
        )
        return False
    if int8_s > 1.03 * float_s:
        notes.append(
            f"kept int8: {int8_s / float_s:.2f}x the time of this pass's float input (the passes before "
            f"it made float faster) but {int8_s / against:.2f}x {label}'s, at a smaller file; set "
            "latency_reference='input' to keep the faster float model instead"
        )
    return True
