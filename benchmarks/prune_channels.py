"""Structured channel pruning on PP-OCR det: MAC share removed, task agreement and measured speed-up.

With 32 calibration samples of real inputs, the highest share of the weight layers'
multiply-adds that ``prune_channels``'s plan can remove is found by bisection on a
*search* set of 16 further images (IoU of the text masks ≥ ``TARGET``), then reported on
24 held-out images never used before. Latency: onnxruntime with all graph optimizations,
1 intra-op thread, original and pruned sessions run interleaved (A/B), median of each.
Run ``python -m benchmarks.prune_channels [multiple]``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx
from onnxopt.passes._prune_channel_plan import build_channel_plan
from onnxopt.passes.prune import channel_report

from benchmarks.lowrank import CALIBRATION
from onnxopt.runtime import Session, run_model

__all__ = ["interleaved_latency", "run"]

TARGET = 0.98
SEARCH, HELD_OUT = 16, 24


def interleaved_latency(a: onnx.ModelProto, b: onnx.ModelProto, sample: dict, repeats: int = 40
                        ) -> tuple[float, float]:
    """Return the median latencies (ms) of ``a`` and ``b``, one run of each in turn, 1 thread."""
    with Session(a, optimization="default", threads=1) as first, Session(b, optimization="default",
                                                                           threads=1) as second:
        for _ in range(3):
            first.run(sample)
            second.run(sample)
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for session, bucket in ((first, times[0]), (second, times[1])):
                start = time.perf_counter()
                session.run(sample)
                bucket.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[0])), 1000 * float(np.median(times[1]))


def run(key: str = "ppocr_det", multiple: int = 8, steps: int = 7) -> dict:
    """Return the search result, held-out agreement, latency and channels removed per group."""
    from benchmarks import inputs
    from benchmarks.models import fetch
    from onnxopt.normalize import normalize

    model = normalize(onnx.load(str(fetch(key)))).model
    every = inputs.ppocr_det_inputs(CALIBRATION + SEARCH + HELD_OUT)
    calib, search, held = (every[:CALIBRATION], every[CALIBRATION:CALIBRATION + SEARCH],
                           every[CALIBRATION + SEARCH:])
    started = time.perf_counter()
    plan = build_channel_plan(model, calib, multiple=multiple)
    plan.measure_sensitivity(model, calib[:4])
    prepare = time.perf_counter() - started
    search_ref, held_ref = run_model(model, search), run_model(model, held)

    def agreement(fraction: float, feeds: list, reference: list) -> float:
        candidate = plan.apply(model, plan.counts_for(fraction))
        return inputs.task_agreement(key, reference, run_model(candidate, feeds), feeds)

    low, high = 0.0, 0.5
    for _ in range(steps):
        middle = (low + high) / 2
        if agreement(middle, search, search_ref) >= TARGET:
            low = middle
        else:
            high = middle
    counts = plan.counts_for(low)
    pruned = plan.apply(model, counts)
    before, after = interleaved_latency(model, pruned, held[0])
    stats, lines = channel_report(plan, counts)
    return {
        "model": key, "multiple": multiple, "macs_removed": stats["macs_removed"],
        "search_agreement": round(agreement(low, search, search_ref), 4),
        "held_out_agreement": round(inputs.task_agreement(key, held_ref, run_model(pruned, held), held), 4),
        "latency_ms_before": round(before, 2), "latency_ms_after": round(after, 2),
        "speedup": round(before / after, 3), "params_before": _params(model), "params_after": _params(pruned),
        "prepare_seconds": round(prepare, 1), "per_group": lines,
    }


def _params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


if __name__ == "__main__":
    result = run(multiple=int(sys.argv[1]) if len(sys.argv) > 1 else 8)
    for name, value in result.items():
        if name != "per_group":
            print(f"{name}: {value}")
    print("channels removed per group (group: removed of total (source layers)):")
    for line in result["per_group"]:
        print("  " + line)
