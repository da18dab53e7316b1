"""The low-rank whitening shrinkage, swept on every benchmark model with MatMul/Gemm layers.

``passes/lowrank/ranks.py`` regularizes each layer's input second moment as
``(1 − s)·G + s·diag(G)`` before the whitened SVD, with ``s`` estimated per layer from
the calibration data (``shrinkage_intensity``, row ``estimated``) unless a fixed one is
given. This script measures, for each model, each of its splittable layers, each fixed
``s`` and the estimated one, the *held-out* relative
output error of the split (whitened on 32 calibration inputs, judged on the second moment
of 64 other real inputs) at the ranks that save 20 % and 40 % of the layer's parameters,
averaged over layers. The default is right across models when it is the best, or within
a few percent of the best, on each. (``DAMP``, the pruning repair's damping, needs no
sweep: :meth:`PrunePlan.choose_damping` cross-validates it per layer at run time.)

Models: the MiniLM encoder (exported with torch), PP-OCRv4 rec (an SVTR neck with
attention MatMuls, rendered text lines) and PP-OCR cls (its classifier Gemm, text lines).
``python -m benchmarks.defaults`` (a few minutes) prints a table and writes
``benchmarks/results/defaults.json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import onnx

from benchmarks.common import REPO
from onnxopt.normalize import normalize

__all__ = ["SHRINKAGES", "run"]

SHRINKAGES = (0.01, 0.1, 0.3, 0.6)
SAVINGS = (0.2, 0.4)
CALIBRATION, HELD_OUT = 32, 64


def _model_and_inputs(key: str) -> tuple[onnx.ModelProto, list, list]:
    from benchmarks import documents, inputs

    if key == "encoder":
        from benchmarks.encoder import SENTENCES, encode_sentences, encoder_model_path

        every = [encode_sentences([s]) for s in SENTENCES[: CALIBRATION + HELD_OUT]]
        path = encoder_model_path()
    else:
        from benchmarks.models import fetch

        path = fetch(key)
        make = documents.rec_lines if key == "ppocr_rec" else inputs.ppocr_cls_inputs
        every = make(CALIBRATION + HELD_OUT)
    return normalize(onnx.load(str(path))).model, every[:CALIBRATION], every[CALIBRATION:]


def _rank_saving(k: int, n: int, saving: float) -> int:
    """Return the rank whose factors keep ``1 − saving`` of the ``k·n`` parameters (at least 1)."""
    return max(1, int((1 - saving) * k * n / (k + n)))


def sweep(key: str) -> list[dict[str, Any]]:
    """Return one row per shrinkage: the held-out split error averaged over the model's layers."""
    from onnxopt.passes.common.stats import collect_input_stats
    from onnxopt.passes.lowrank.plan import plan_lowrank
    from onnxopt.passes.lowrank.ranks import factorize, held_out_error, shrinkage_intensity

    from onnxopt.pipeline import Context

    model, calib, held = _model_and_inputs(key)
    plan = plan_lowrank(
        model, Context(), whiten=False, min_params=4096, include_conv1x1=False, min_saving=0.0, samples=None
    )
    fit = collect_input_stats(model, plan.layers, calib, spread=True)
    judge = collect_input_stats(model, plan.layers, held)
    choices: list[float | str] = [*SHRINKAGES, "estimated"]
    errors: dict[float | str, list[list[float]]] = {s: [] for s in choices}
    estimated: list[float] = []
    used = 0
    for layer, w in zip(plan.layers, plan.weights, strict=True):
        f, h = fit[layer.key], judge[layer.key]
        if f.gram is None or h.gram is None or len(f.gram) != 1:
            continue
        used += 1
        g_fit, g_held = f.gram[0] / max(f.rows, 1), h.gram[0] / max(h.rows, 1)
        ranks = [_rank_saving(w.shape[0], w.shape[1], saving) for saving in SAVINGS]
        estimated.append(shrinkage_intensity(f.gram, max(f.rows, 1), f.spread))
        for s in choices:
            value = estimated[-1] if s == "estimated" else float(s)
            curve = held_out_error(w, factorize(w, g_fit, value), g_held)
            errors[s].append([float(curve[min(r, len(curve) - 1)]) for r in ranks])
    rows: list[dict[str, Any]] = []
    for s in choices:
        mean = np.mean(errors[s], axis=0) if errors[s] else [float("nan")] * len(SAVINGS)
        rows.append(
            {
                "model": key,
                "shrinkage": s,
                "layers": used,
                **(
                    {"estimated_min": round(min(estimated), 3), "estimated_max": round(max(estimated), 3)}
                    if s == "estimated" and estimated
                    else {}
                ),
                **{
                    f"held_out_error_save_{round(v * 100)}pct": round(float(m), 5)
                    for v, m in zip(SAVINGS, mean, strict=True)
                },
            }
        )
    for column in [k for k in rows[0] if k.startswith("held_out_error")]:
        best = min(r[column] for r in rows)
        for r in rows:
            r[f"{column}_vs_best"] = round(r[column] / best, 3) if best > 0 else 1.0
    return rows


def run(models: list[str]) -> list[dict[str, Any]]:
    """Return the sweep's rows for ``models``."""
    rows: list[dict[str, Any]] = []
    for key in models:
        rows += sweep(key)
        print(f"{key}: done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="encoder,ppocr_rec,ppocr_cls")
    args = parser.parse_args(argv)
    rows = run([m.strip() for m in args.only.split(",") if m.strip()])
    out = REPO / "benchmarks" / "results" / "defaults.json"
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items() if k != "model"), row["model"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
