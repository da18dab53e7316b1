"""Unstructured pruning: uniform per-layer L1 vs our calibration-aware pruning, side by side.

For each model, with 32 calibration samples of real inputs and held-out inputs distinct
from them, find by bisection the highest overall sparsity (of the prunable Conv /
ConvTranspose / Gemm / MatMul weights) at which held-out task agreement stays ≥ 0.99 for

* ``uniform L1``: every layer loses the same share of its smallest-magnitude weights;
* ``ours``: ``|W|·‖X‖`` scores, SparseGPT repair, per-layer sparsity allocated on error
  curves weighted by measured sensitivity (what ``prune_magnitude`` does with --calib);
* ``ours (one-shot, cv damping)``: the same with each layer's repair damping picked by
  4-fold cross-validation on the calibration samples (``prune_magnitude(damping="cv")``);

and report the file size with ``sparse_initializer`` storage and onnxruntime latency.
Encoder samples are single sentences tokenized *without* padding (each its own length),
so calibration statistics are not dominated by [PAD] rows.
Run ``python -m benchmarks.prune [model ...]``; ``--preset [model ...]`` re-measures only the
preset rows and merges them into ``benchmarks/results/prune.json``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnxopt.passes.prune.magnitude import FOLDS, PruneMagnitude
from onnxopt.passes.prune.plan import PrunePlan, build_plan
from onnxopt.passes.prune.sparse_storage import store_sparse

from benchmarks.lowrank import CALIBRATION, model_and_inputs
from onnxopt.data import Dataset
from onnxopt.model import serialized_size
from onnxopt.pipeline import Context, load_recipe
from onnxopt.runtime import Session, run_model

__all__ = ["run"]

TARGET = 0.99
MODELS = ("ppocr_cls", "ppocr_det", "encoder")
#: The methods run (``PRUNE_METHODS``: a ";"-separated subset; also "ours (sequential)", slow).
METHODS = os.environ.get(
    "PRUNE_METHODS",
    "uniform per-layer L1;ours (one-shot);ours (one-shot, cv damping);pass, default budget, margin 0.5;preset",
).split(";")
HELD_OUT = {"ppocr_det": 24, "ppocr_cls": 64, "encoder": 64}


def _highest(evaluate: Callable[[float], float], steps: int, high: float = 0.95) -> tuple[float, float]:
    """Bisect sparsity in [0, high] for the highest value whose agreement is ≥ TARGET."""
    low, best = 0.0, (0.0, 1.0)
    agreement = evaluate(high)
    if agreement >= TARGET:
        return high, agreement
    for _ in range(steps):
        middle = (low + high) / 2
        agreement = evaluate(middle)
        if agreement >= TARGET:
            low, best = middle, (middle, agreement)
        else:
            high = middle
    return best


def latency_ms(model: onnx.ModelProto, sample: dict, repeats: int = 20) -> float:
    """Return the median latency (ms) of one run under onnxruntime (all optimizations, 1 thread)."""
    with Session(model, optimization="default", threads=1) as session:
        for _ in range(3):
            session.run(sample)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(sample)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _matrices(plan: PrunePlan, counts: list[int]) -> list[np.ndarray | None]:
    return [plan.pruned(i, c) if c else None for i, c in enumerate(counts)]


def unpadded_encoder_inputs(n: int, offset: int = 0) -> list[dict]:
    """Return ``n`` sentences tokenized one at a time, unpadded (batch 1, their own length)."""
    from benchmarks.encoder import SENTENCES, encode_sentences

    return [encode_sentences([sentence]) for sentence in SENTENCES[offset : offset + n]]


PRESET = "preset `prune` (CLI defaults: fuse, then prune_magnitude)"


def _inputs(key: str) -> tuple[onnx.ModelProto, list, list]:
    model, calib, held = model_and_inputs(key, HELD_OUT[key])
    if key == "encoder":
        calib, held = unpadded_encoder_inputs(CALIBRATION), unpadded_encoder_inputs(HELD_OUT[key], CALIBRATION)
    return model, calib, held


def preset_row(key: str) -> dict:
    """Return the row of the ``prune`` preset exactly as the CLI runs it, judged on the unseen held-out inputs."""
    from benchmarks.inputs import task_agreement

    model, calib, held = _inputs(key)
    started = time.perf_counter()
    result = load_recipe("prune").build().run(model, Context(calibration=Dataset(calib)))
    record = next(r for r in result.records if r.name == "prune_magnitude")
    return {
        "model": key,
        "method": PRESET,
        "sparsity": round(float(record.stats.get("sparsity", 0.0)), 4),
        "agreement": round(task_agreement(key, run_model(model, held), run_model(result.model, held), held), 4),
        # what the pass says of itself (its cross-fitted judgement over the calibration samples)
        "reported_metric": record.stats.get("task_metric"),
        "reported_agreement": record.stats.get("task_agreement"),
        "reported_interval": record.stats.get("task_interval"),
        "search_seconds": round(time.perf_counter() - started, 1),
        "calibration_samples": len(calib),
        "unseen_samples": len(held),
    }


def run_one(key: str, steps: int = 7) -> list[dict]:
    """Return the rows of one model: baseline and ours."""
    from benchmarks.inputs import task_agreement

    model, calib, held = _inputs(key)
    reference = run_model(model, held)
    started = time.perf_counter()
    uniform = build_plan(model, scoring="magnitude", repair=False, exclude=(), min_size=4096, samples=None)
    ours = build_plan(model, scoring="activation", repair=True, exclude=(), min_size=4096, samples=calib)
    ours.measure_sensitivity(model, calib[:4])
    curves = ours.curves()
    prepare = time.perf_counter() - started
    tuned, tuned_curves = ours, curves
    if "ours (one-shot, cv damping)" in METHODS:
        tuned = build_plan(
            model, scoring="activation", repair=True, exclude=(), min_size=4096, samples=calib, folds=FOLDS
        )
        tuned.choose_damping()
        tuned.measure_sensitivity(model, calib[:4])
        tuned_curves = tuned.curves()

    def agreement(plan: PrunePlan, matrices: list[np.ndarray | None]) -> float:
        candidate = plan.apply(model, matrices)
        return task_agreement(key, reference, run_model(candidate, held), held)

    def sequential(sparsity: float) -> list[np.ndarray | None]:
        return ours.prune_sequentially(model, ours.counts_for(sparsity, "global", curves), calib)

    methods = {
        "uniform per-layer L1": (uniform, lambda s: _matrices(uniform, uniform.counts_for(s, "layer"))),
        "ours (one-shot)": (ours, lambda s: _matrices(ours, ours.counts_for(s, "global", curves))),
        "ours (one-shot, cv damping)": (tuned, lambda s: _matrices(tuned, tuned.counts_for(s, "global", tuned_curves))),
        "ours (sequential)": (ours, sequential),
    }
    base_latency = latency_ms(model, held[0])
    rows = []
    for method, (plan, matrices_at) in methods.items():
        if method not in METHODS:
            continue
        started = time.perf_counter()
        sparsity, agree = _highest(lambda s, plan=plan, at=matrices_at: agreement(plan, at(s)), steps)
        matrices = matrices_at(sparsity)
        pruned = plan.apply(model, matrices)
        dense_bytes = serialized_size(pruned)
        store_sparse(pruned)
        rows.append(
            {
                "model": key,
                "method": method,
                "sparsity": round(sparsity, 4),
                "agreement": round(agree, 4),
                "layers": len(plan.units),
                "prunable_weights": plan.total,
                "bytes_dense": dense_bytes,
                "bytes_sparse_storage": serialized_size(pruned),
                "latency_ms_before": round(base_latency, 2),
                "latency_ms_after": round(latency_ms(pruned, held[0]), 2),
                "search_seconds": round(time.perf_counter() - started, 1),
                "per_layer_sparsity": {
                    u.key: round(float(np.mean(u.matrix == 0 if m is None else m == 0)), 3)
                    for u, m in zip(plan.units, matrices, strict=True)
                },
            }
        )
    for margin in (1.0, 0.5):
        method = f"pass, default budget, margin {margin}"
        if method not in METHODS:
            continue
        started = time.perf_counter()
        result = PruneMagnitude(min_size=4096, margin=margin)(model, Context(calibration=Dataset(calib)))
        rows.append(
            {
                "model": key,
                "method": method,
                "sparsity": round(float(result.stats["sparsity"]), 4),
                "agreement": round(task_agreement(key, reference, run_model(result.model, held), held), 4),
                "search_seconds": round(time.perf_counter() - started, 1),
                "per_layer_sparsity": {},
            }
        )
    if PRESET in METHODS or "preset" in METHODS:
        rows.append(preset_row(key))
    for row in rows[1:]:
        row["ratio_vs_uniform"] = round(row["sparsity"] / max(rows[0]["sparsity"], 1e-9), 2)
    rows[-1]["prepare_seconds"] = round(prepare, 1)
    return rows


def run(models: tuple[str, ...] = MODELS, steps: int = 7) -> list[dict]:
    """Return one row per model and method (see the module docstring)."""
    return [row for key in models for row in run_one(key, steps)]


def table(rows: list[dict]) -> str:
    """Render the rows as a Markdown table (per-layer sparsity left out)."""
    columns = [
        "model",
        "method",
        "sparsity",
        "agreement",
        "ratio_vs_uniform",
        "search_seconds",
        "bytes_dense",
        "bytes_sparse_storage",
        "latency_ms_before",
        "latency_ms_after",
    ]
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(str(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--preset"]:  # only the preset rows, merged into benchmarks/results/prune.json
        from benchmarks.common import merge_saved_rows

        keys = tuple(sys.argv[2:]) or MODELS
        for key in keys:
            row = preset_row(key)
            print(row)
            merge_saved_rows("prune", [row], f"python -m benchmarks.prune --preset {key}")
        sys.exit(0)
    chosen = tuple(sys.argv[1:]) or MODELS
    result = run(chosen)
    print(table(result))
    print(f"(calibration: {CALIBRATION} samples; target agreement {TARGET})")
    for row in result:
        print(row["model"], row["method"], row["per_layer_sparsity"])
