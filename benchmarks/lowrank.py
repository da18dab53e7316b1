"""Low-rank splitting: plain truncated SVD (uniform rank fraction) vs ours, side by side.

For each model, with 32 calibration samples of real inputs and held-out inputs distinct
from them, find the largest share of MatMul/Gemm parameters saved while the held-out
task agreement stays ≥ 0.99 for

* ``plain``: truncated SVD of every weight at one rank fraction (bisection on it);
* ``ours``: activation-aware (whitened) SVD, ranks allocated across layers by measured
  sensitivity (bisection on the price of parameters);
* ``ours-default``: the ``split_lowrank`` pass as the CLI runs it (no rank, default
  harness budget checked on its own held-out quarter of the 32 calibration samples).

Latency is onnxruntime's (all graph optimizations, 2 threads), median of repeated runs.
Run ``python -m benchmarks.lowrank``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import onnx

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from onnxopt.runtime import Session, run_model
from passes._lowrank_math import allocate_ranks
from passes.lowrank import SplitPlan, apply_ranks, plan_lowrank, split_lowrank

__all__ = ["run"]

TARGET = 0.99
CALIBRATION = 32


def model_and_inputs(key: str, held_out: int) -> tuple[onnx.ModelProto, list, list]:
    """Return the normalized model, its calibration samples and distinct held-out samples."""
    from benchmarks import inputs

    if key == "encoder":
        from benchmarks.encoder import encoder_model_path

        path = encoder_model_path()
        calib, held = inputs.encoder_inputs(CALIBRATION), inputs.encoder_inputs(held_out, offset=CALIBRATION)
    else:
        from benchmarks.models import fetch

        path = fetch(key)
        make = inputs.ppocr_det_inputs if key == "ppocr_det" else inputs.ppocr_cls_inputs
        every = make(CALIBRATION + held_out)
        calib, held = every[:CALIBRATION], every[CALIBRATION:]
    return normalize(onnx.load(str(path))).model, calib, held


def latency_ms(model: onnx.ModelProto, sample: dict, repeats: int = 30) -> float:
    """Return the median latency of one run under onnxruntime with all optimizations."""
    with Session(model, optimization="default", threads=2) as session:
        for _ in range(3):
            session.run(sample)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(sample)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _saved(plan: SplitPlan, ranks: list[int]) -> int:
    return sum(w.size - (r * sum(w.shape) if r else w.size) for w, r in zip(plan.weights, ranks, strict=True))


def _best(evaluate: Callable[[float], tuple[float, list[int]]], low: float, high: float,
          steps: int) -> tuple[float, list[int]]:
    """Bisect a monotone knob for the largest value whose agreement is ≥ TARGET."""
    best: tuple[float, list[int]] = (1.0, [])
    agreement, ranks = evaluate(high)
    if agreement >= TARGET:
        return agreement, ranks
    for _ in range(steps):
        middle = (low + high) / 2
        agreement, ranks = evaluate(middle)
        if agreement >= TARGET:
            low, best = middle, (agreement, ranks)
        else:
            high = middle
    return best


def run_one(key: str, held_out: int = 64, steps: int = 8) -> list[dict]:
    """Return the rows of one model: plain SVD, ours, and the pass with its default budget."""
    from benchmarks.inputs import task_agreement

    model, calib, held = model_and_inputs(key, held_out)
    reference = run_model(model, held)
    plain = plan_lowrank(model, Context(), whiten=False, min_params=16384, include_conv1x1=False,
                         min_saving=0.1, samples=None)
    if not plain.layers:
        return [{"model": key, "method": "-", "note": "no MatMul/Gemm layer large enough to pay"}]
    ours = plan_lowrank(model, Context(), whiten=True, min_params=16384, include_conv1x1=False,
                        min_saving=0.1, samples=calib)
    ours.measure_sensitivity(model, calib[:4])
    total = sum(w.size for w in plain.weights)
    base_latency = latency_ms(model, held[0])

    def agreement(plan: SplitPlan, ranks: list[int]) -> float:
        if not any(ranks):
            return 1.0
        return task_agreement(key, reference, run_model(apply_ranks(model, plan, ranks), held), held)

    def eval_plain(knob: float) -> tuple[float, list[int]]:
        wanted = [max(1, round((1.0 - knob) * min(w.shape))) for w in plain.weights]
        ranks = [r if r <= limit else 0 for r, limit in zip(wanted, plain.limits, strict=True)]
        return agreement(plain, ranks), ranks

    def eval_ours(knob: float) -> tuple[float, list[int]]:
        ranks = allocate_ranks(ours.candidates(), math.exp(knob))
        return agreement(ours, ranks), ranks

    results = {
        "plain SVD, uniform rank fraction": (plain, _best(eval_plain, 0.0, 0.99, steps)),
        "ours (whitened, sensitivity-allocated)": (ours, _best(eval_ours, math.log(1e-3), math.log(3.0), steps)),
    }
    rows = []
    for method, (plan, (agree, ranks)) in results.items():
        split = apply_ranks(model, plan, ranks) if any(ranks) else model
        saved = _saved(plan, ranks) if ranks else 0
        rows.append({
            "model": key, "method": method, "agreement": round(agree, 4),
            "layers_split": sum(1 for r in ranks if r), "layers": len(plan.layers),
            "params_saved": saved, "matmul_params": total, "saved_pct": round(100 * saved / total, 1),
            "latency_ms_before": round(base_latency, 2), "latency_ms_after": round(latency_ms(split, held[0]), 2),
            "ranks": {layer.key: r for layer, r in zip(plan.layers, ranks, strict=False) if r},
        })
    started = time.perf_counter()
    result = split_lowrank()(model, Context(calibration=Dataset(list(calib))))
    saved = int(result.stats.get("params_saved", 0))
    rows.append({
        "model": key, "method": "ours-default (pass, harness budget)",
        "agreement": round(task_agreement(key, reference, run_model(result.model, held), held), 4),
        "layers_split": int(result.stats.get("layers_split", 0)), "layers": len(plain.layers),
        "params_saved": saved, "matmul_params": total, "saved_pct": round(100 * saved / total, 1),
        "latency_ms_before": round(base_latency, 2), "latency_ms_after": round(latency_ms(result.model, held[0]), 2),
        "pass_seconds": round(time.perf_counter() - started, 1),
    })
    return rows


def run(models: tuple[str, ...] = ("encoder", "ppocr_cls"), held_out: int = 64, steps: int = 8) -> list[dict]:
    """Return one row per model and method: parameters saved at agreement ≥ 0.99, latency."""
    return [row for key in models for row in run_one(key, held_out, steps)]


def _table(rows: list[dict]) -> str:
    columns = ["model", "method", "agreement", "layers_split", "params_saved", "saved_pct",
               "latency_ms_before", "latency_ms_after", "note"]
    shown = [c for c in columns if any(c in r for r in rows)]
    lines = [" | ".join(shown), " | ".join("---" for _ in shown)]
    lines += [" | ".join(str(r.get(c, "")) for c in shown) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    rows = run()
    print(_table(rows))
    for row in rows:
        if row.get("ranks"):
            print(row["model"], row["method"], row["ranks"])
