"""How far training-free pruning and low rank can go on the MiniLM encoder, and whether data limits it.

The ``prune`` and ``lowrank`` benchmarks find what our passes reach at held-out
agreement ≥ 0.99 with 32 calibration sentences; this script asks what bounds those
figures. It reports, for 32 and for 240 calibration sentences (real sentences, one per
sample, unpadded; the same 64 held-out sentences as the benchmarks):

* pruning (our one-shot plan: ``|W|·‖X‖`` scores, SparseGPT repair, sensitivity-weighted
  allocation) at fixed global sparsities: held-out agreement and agreement on the first
  32 calibration sentences (in-sample);
* low rank (whitened splits + joint QKᵀ head narrowing, as the pass): the most MatMul
  parameters saved at held-out agreement ≥ 0.99, and the agreement when every layer is
  split at the rank saving 20 % of its own parameters;
* value/output head narrowing (the QKᵀ trick applied to ``Wv·Wo`` per head, not built):
  the held-out relative error of each attention output projection at head widths 28 and
  24 of 32, from the optimal per-head whitened truncation.

Run ``python -m benchmarks.ceilings`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.encoder import SENTENCES, encode_sentences
from benchmarks.lowrank import TARGET, _best, _saved, model_and_inputs
from onnxopt.graph import GraphIndex
from onnxopt.pipeline import Context
from onnxopt.runtime import run_model

__all__ = ["run"]

SPARSITIES = (0.3, 0.4, 0.5)
SIZES = (32, 240)
HELD_OUT = 64


def _calibration(n: int, calib32: list) -> list:
    """Return ``n`` calibration sentences: the benchmarks' 32, then sentences after the held-out ones."""
    start = 32 + HELD_OUT
    return calib32 + [encode_sentences([s]) for s in SENTENCES[start : start + n - 32]]


def _pruning(model, calib: list, held: list, reference: list) -> list[dict]:
    from onnxopt.passes.prune.plan import build_plan

    from benchmarks.inputs import task_agreement

    plan = build_plan(model, scoring="activation", repair=True, exclude=(), min_size=4096, samples=calib)
    plan.measure_sensitivity(model, calib[:4])
    curves = plan.curves()
    fitted, fitted_ref = calib[:32], run_model(model, calib[:32])
    rows = []
    for sparsity in SPARSITIES:
        matrices = [plan.pruned(i, c) if c else None for i, c in enumerate(plan.counts_for(sparsity, "global", curves))]
        pruned = plan.apply(model, matrices)
        rows.append(
            {
                "sparsity": sparsity,
                "held_out": round(task_agreement("encoder", reference, run_model(pruned, held), held), 4),
                "in_sample": round(task_agreement("encoder", fitted_ref, run_model(pruned, fitted), fitted), 4),
            }
        )
    return rows


def _lowrank(model, calib: list, held: list, reference: list) -> dict:
    from onnxopt.passes.lowrank.plan import apply_ranks, plan_lowrank
    from onnxopt.passes.lowrank.ranks import allocate_ranks

    from benchmarks.inputs import task_agreement

    plan = plan_lowrank(
        model,
        Context(),
        whiten=True,
        min_params=16384,
        include_conv1x1=False,
        min_saving=0.1,
        samples=calib,
        heads=True,
    )
    plan.measure_sensitivity(model, calib[:4])
    total = sum(w.size for w in plan.weights) + sum(p.params for p in plan.pairs)

    def agreement(ranks: list[int]) -> float:
        return task_agreement("encoder", reference, run_model(apply_ranks(model, plan, ranks), held), held)

    def evaluate(knob: float) -> tuple[float, list[int]]:
        ranks = allocate_ranks(plan.candidates(), math.exp(knob))
        return (agreement(ranks) if any(ranks) else 1.0), ranks

    best, ranks = _best(evaluate, math.log(1e-3), math.log(3.0), 8)
    uniform = []
    for weight, limit in zip(plan.weights, plan.limits, strict=True):
        k, n = weight.shape
        rank = int(0.8 * k * n / (k + n))
        uniform.append(rank if rank <= limit else 0)
    uniform += [0] * len(plan.pairs)
    return {
        "saved_pct_at_target": round(100 * _saved(plan, ranks) / total, 2) if ranks else 0.0,
        "agreement_at_target": round(best, 4),
        "every_layer_20pct_saved_pct": round(100 * _saved(plan, uniform) / total, 2),
        "every_layer_20pct_agreement": round(agreement(uniform), 4),
    }


def _value_heads(model, calib: list, held: list, heads: int = 12, widths: tuple[int, ...] = (28, 24)) -> list[dict]:
    """Return the held-out relative error of each attention output at narrowed value-head widths."""
    from onnxopt.passes.common.layers import find_layers
    from onnxopt.passes.common.stats import collect_input_stats

    layers = [layer for layer in find_layers(model.graph)[0] if "attention/output" in layer.key]
    fit, test = (collect_input_stats(model, layers, s, gram=True) for s in (calib, held))
    index = GraphIndex(model.graph)
    rows = []
    for layer in layers:
        gram, gram_test = fit[layer.key].mean_gram[0], test[layer.key].mean_gram[0]  # type: ignore[index]
        weight = index.constant(layer.weight).astype(np.float64)  # type: ignore[union-attr]
        d = weight.shape[0] // heads
        row: dict = {"layer": layer.key}
        for width in widths:
            projector = np.zeros_like(gram)
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                block = gram[part, part] + 1e-6 * np.trace(gram[part, part]) / d * np.eye(d)
                lower = np.linalg.cholesky(block)
                u = np.linalg.svd(lower.T @ weight[part], full_matrices=False)[0][:, :width]
                projector[part, part] = np.linalg.inv(lower.T) @ u @ u.T @ lower.T
            delta = (np.eye(gram.shape[0]) - projector) @ weight
            row[f"error_width_{width}"] = round(
                float(np.trace(delta.T @ gram_test @ delta) / np.trace(weight.T @ gram_test @ weight)), 4
            )
        rows.append(row)
    return rows


def run() -> dict:
    """Return the pruning, low-rank and value-head figures for each calibration size."""
    model, calib32, held = model_and_inputs("encoder", HELD_OUT)
    reference = run_model(model, held)
    result: dict = {"target": TARGET, "sizes": {}}
    for size in SIZES:
        calib = _calibration(size, calib32)
        result["sizes"][size] = {
            "tokens": int(sum(c["input_ids"].size for c in calib)),
            "pruning": _pruning(model, calib, held, reference),
            "lowrank": _lowrank(model, calib, held, reference),
        }
    result["value_heads"] = _value_heads(model, calib32, held)
    return result


if __name__ == "__main__":
    found = run()
    for size, part in found["sizes"].items():
        print(f"{size} calibration sentences ({part['tokens']} tokens)")
        for row in part["pruning"]:
            print(f"  prune {row['sparsity']:.0%}: held-out {row['held_out']}, in-sample {row['in_sample']}")
        print(f"  low rank: {part['lowrank']}")
    for row in found["value_heads"]:
        print("  value heads", row)
