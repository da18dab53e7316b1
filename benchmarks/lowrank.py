"""Low-rank splitting: plain truncated SVD (uniform rank fraction) vs ours, side by side.

For each model, with 32 calibration samples of real inputs and held-out inputs distinct
from them, find the largest share of MatMul/Gemm parameters saved while the held-out
task agreement stays ≥ 0.99 for

* ``plain``: truncated SVD of every weight at one rank fraction (bisection on it);
* ``ours``: activation-aware (whitened, shrunk ``XᵀX``) SVD, ranks allocated across
  layers by cross-validated error curves weighted by measured sensitivity (bisection on
  the price of parameters);
* ``ours-default``: the ``split_lowrank`` pass as the CLI runs it (no rank, default
  harness budget checked on its own held-out quarter of the 32 calibration samples).

Encoder samples are single sentences tokenized to their own length (no [PAD] rows:
padding to 64 made ~75 % of the calibration rows padding, which the pooled embedding
ignores). Latency: onnxruntime with all graph optimizations and 1 intra-op thread, the
input and the split model run alternately on the held-out sentences, median per model.
Run ``python -m benchmarks.lowrank``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnxopt.passes._lowrank_math import allocate_ranks
from onnxopt.passes.lowrank import SplitPlan, apply_ranks, plan_lowrank, split_lowrank

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from onnxopt.runtime import Session, run_model

__all__ = ["run"]

TARGET = 0.99
CALIBRATION = 32


def model_and_inputs(key: str, held_out: int) -> tuple[onnx.ModelProto, list, list]:
    """Return the normalized model, its calibration samples and distinct held-out samples."""
    from benchmarks import inputs

    if key == "encoder":
        from benchmarks.encoder import SENTENCES, encode_sentences, encoder_model_path

        path = encoder_model_path()
        unpadded = [encode_sentences([s]) for s in SENTENCES[:CALIBRATION + held_out]]
        calib, held = unpadded[:CALIBRATION], unpadded[CALIBRATION:]
    else:
        from benchmarks.models import fetch

        path = fetch(key)
        make = inputs.ppocr_det_inputs if key == "ppocr_det" else inputs.ppocr_cls_inputs
        every = make(CALIBRATION + held_out)
        calib, held = every[:CALIBRATION], every[CALIBRATION:]
    return normalize(onnx.load(str(path))).model, calib, held


def latency_ms(base: onnx.ModelProto, split: onnx.ModelProto, samples: list, rounds: int = 40) -> tuple[float, float]:
    """Return the median latency (ms) of ``base`` and ``split``, run alternately (1 thread, all optimizations)."""
    with Session(base, optimization="default", threads=1) as first, \
            Session(split, optimization="default", threads=1) as second:
        times: tuple[list[float], list[float]] = ([], [])
        for round_ in range(rounds + 2):
            for sample in samples:
                for session, spent in ((first, times[0]), (second, times[1])):
                    start = time.perf_counter()
                    session.run(sample)
                    if round_ >= 2:  # warm-up rounds
                        spent.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[0])), 1000 * float(np.median(times[1]))


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
    timed = held[:8]

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
            **_latency(model, split, timed),
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
        **_latency(model, result.model, timed),
        "pass_seconds": round(time.perf_counter() - started, 1),
    })
    return rows


def _latency(model: onnx.ModelProto, split: onnx.ModelProto, samples: list) -> dict[str, float]:
    before, after = latency_ms(model, split, samples)
    return {"latency_ms_before": round(before, 3), "latency_ms_after": round(after, 3)}


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
