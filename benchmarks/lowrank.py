"""Low-rank splitting: plain truncated SVD (uniform rank fraction) vs ours, side by side.

For each model, with 32 calibration samples of real inputs and held-out inputs distinct
from them, find the largest share of MatMul/Gemm parameters saved while the held-out
task agreement stays ≥ 0.99 for

* ``plain``: truncated SVD of every weight at one rank fraction (bisection on it);
* ``ours``: what the ``split_lowrank`` pass plans and allocates (:func:`plan_lowrank` with
  ``heads=True``, sensitivities, :func:`allocate_ranks`, :func:`apply_ranks`):
  activation-aware (whitened, shrunk ``XᵀX``) SVD splits, and the query/key projections
  of every matched attention block narrowed jointly to a per-block head width (no extra
  layer), all in one allocation by cross-validated error curves weighted by measured
  sensitivity; the price of parameters is bisected on the held-out agreement, as for
  ``plain``;
* ``ours, heads=False``: the same with the query/key projections split like any layer;
* ``ours (pass, task budget)``: the pass run as is with a task-level budget (agreement
  ≥ 0.99 checked by the pass on its own held-out quarter of the 32 calibration samples),
  agreement then measured on the benchmark's held-out samples;
* ``ours-default``: the ``split_lowrank`` pass as the CLI runs it (no rank, default
  harness budget checked on its own held-out quarter of the 32 calibration samples).

Encoder samples are single sentences tokenized to their own length (no [PAD] rows:
padding to 64 made ~75 % of the calibration rows padding, which the pooled embedding
ignores). Latency: onnxruntime with all graph optimizations and 1 intra-op thread, the
input and every row's model run interleaved on 8 held-out samples (which runs first
rotating every round), 40 rounds, median per model. Run ``python -m benchmarks.lowrank``
(optionally naming models, e.g. ``python -m benchmarks.lowrank encoder``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnxopt.passes.lowrank.plan import SplitPlan, apply_ranks, plan_lowrank
from onnxopt.passes.lowrank.ranks import allocate_ranks
from onnxopt.passes.lowrank.split import SplitLowRank

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context, load_recipe
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
        unpadded = [encode_sentences([s]) for s in SENTENCES[: CALIBRATION + held_out]]
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
    before, after = latencies([base, split], samples, rounds)
    return before, after


def latencies(models: list[onnx.ModelProto], samples: list, rounds: int = 40) -> list[float]:
    """Return the median latency (ms) of each model (1 thread, all optimizations).

    The models run interleaved, sample by sample, the first one to run rotating every
    round, so that load from elsewhere on a shared machine falls on all of them alike.
    """
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(Session(m, optimization="default", threads=1)) for m in models]
        times: list[list[float]] = [[] for _ in models]
        for round_ in range(rounds + 2):
            order = [(round_ + i) % len(models) for i in range(len(models))]
            for sample in samples:
                for i in order:
                    start = time.perf_counter()
                    sessions[i].run(sample)
                    if round_ >= 2:  # warm-up rounds
                        times[i].append(time.perf_counter() - start)
    return [1000 * float(np.median(t)) for t in times]


def _saved(plan: SplitPlan, ranks: list[int]) -> int:
    """Return the parameters saved by ``ranks`` (layer ranks, then the head widths of the plan's pairs)."""
    candidates = plan.candidates()
    return sum(c.params(0) - c.params(r) for c, r in zip(candidates, ranks, strict=True))


def _changes(plan: SplitPlan, ranks: list[int]) -> dict[str, int]:
    """Return the rank of each split layer and the head width of each narrowed pair."""
    changed = {layer.key: r for layer, r in zip(plan.layers, ranks, strict=False) if r}
    changed |= {
        f"{p.query.matmul} / {p.key.matmul} head width": w
        for p, w in zip(plan.pairs, ranks[len(plan.layers) :], strict=False)
        if w
    }
    return changed


def _best(
    evaluate: Callable[[float], tuple[float, list[int]]], low: float, high: float, steps: int
) -> tuple[float, list[int]]:
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


PRESET = "preset `lowrank` (CLI defaults: fuse, then split_lowrank)"


def preset_row(key: str, held_out: int = 64) -> dict:
    """Return the row of the ``lowrank`` preset exactly as the CLI runs it, judged on the unseen held-out inputs."""
    from benchmarks.inputs import task_agreement

    model, calib, held = model_and_inputs(key, held_out)
    total = sum(
        w.size
        for w in plan_lowrank(
            model, Context(), whiten=False, min_params=16384, include_conv1x1=False, min_saving=0.1, samples=None
        ).weights
    )
    started = time.perf_counter()
    result = load_recipe("lowrank").build().run(model, Context(calibration=Dataset(list(calib))))
    record = next(r for r in result.records if r.name == "split_lowrank")
    saved = int(record.stats.get("params_saved", 0))
    return {
        "model": key,
        "method": PRESET,
        "agreement": round(task_agreement(key, run_model(model, held), run_model(result.model, held), held), 4),
        "layers_split": int(record.stats.get("layers_split", 0)),
        "head_pairs_narrowed": int(record.stats.get("head_pairs_narrowed", 0)),
        "params_saved": saved,
        "matmul_params": total,
        "saved_pct": round(100 * saved / max(total, 1), 2),
        "pass_seconds": round(time.perf_counter() - started, 1),
        "calibration_samples": len(calib),
        "unseen_samples": len(held),
    }


def run_one(key: str, held_out: int = 64, steps: int = 8) -> list[dict]:
    """Return the rows of one model: plain SVD, ours (with and without heads), and the pass."""
    from benchmarks.inputs import task_agreement

    model, calib, held = model_and_inputs(key, held_out)
    reference = run_model(model, held)
    plain = plan_lowrank(
        model, Context(), whiten=False, min_params=16384, include_conv1x1=False, min_saving=0.1, samples=None
    )
    if not plain.layers:
        return [{"model": key, "method": "-", "note": "no MatMul/Gemm layer large enough to pay"}]
    plans = {}
    for heads in (True, False):
        plan = plan_lowrank(
            model,
            Context(),
            whiten=True,
            min_params=16384,
            include_conv1x1=False,
            min_saving=0.1,
            samples=calib,
            heads=heads,
        )
        plan.measure_sensitivity(model, calib[:4])
        plans[heads] = plan
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

    def eval_ours(plan: SplitPlan) -> Callable[[float], tuple[float, list[int]]]:
        def evaluate(knob: float) -> tuple[float, list[int]]:
            ranks = allocate_ranks(plan.candidates(), math.exp(knob))
            return agreement(plan, ranks), ranks

        return evaluate

    results = {
        "plain SVD, uniform rank fraction": (plain, _best(eval_plain, 0.0, 0.99, steps)),
        "ours (whitened splits + joint QKᵀ heads, as the pass)": (
            plans[True],
            _best(eval_ours(plans[True]), math.log(1e-3), math.log(3.0), steps),
        ),
        "ours, heads=False (whitened splits only)": (
            plans[False],
            _best(eval_ours(plans[False]), math.log(1e-3), math.log(3.0), steps),
        ),
    }
    rows: list[dict] = []
    outputs: list[onnx.ModelProto] = []
    for method, (plan, (agree, ranks)) in results.items():
        split = apply_ranks(model, plan, ranks) if any(ranks) else model
        saved = _saved(plan, ranks) if ranks else 0
        widths = ranks[len(plan.layers) :]
        rows.append(
            {
                "model": key,
                "method": method,
                "agreement": round(agree, 4),
                "layers_split": sum(1 for r in ranks[: len(plan.layers)] if r),
                "head_pairs_narrowed": sum(1 for w in widths if w),
                "layers": len(plain.layers),
                "params_saved": saved,
                "matmul_params": total,
                "saved_pct": round(100 * saved / total, 2),
                "ranks": _changes(plan, ranks),
            }
        )
        outputs.append(split)
    calibration = Dataset(list(calib))
    pass_held = list(calibration.split()[1])

    def task_budget(ref: list, cand: list) -> bool:
        return task_agreement(key, ref, cand, pass_held) >= TARGET

    for method, budget in (("ours (pass, task budget)", task_budget), ("ours-default (pass, harness budget)", None)):
        started = time.perf_counter()
        result = SplitLowRank(budget=budget)(model, Context(calibration=calibration))
        saved = int(result.stats.get("params_saved", 0))
        rows.append(
            {
                "model": key,
                "method": method,
                "agreement": round(task_agreement(key, reference, run_model(result.model, held), held), 4),
                "layers_split": int(result.stats.get("layers_split", 0)),
                "head_pairs_narrowed": int(result.stats.get("head_pairs_narrowed", 0)),
                "layers": len(plain.layers),
                "params_saved": saved,
                "matmul_params": total,
                "saved_pct": round(100 * saved / total, 2),
                "pass_seconds": round(time.perf_counter() - started, 1),
                "notes": [n for n in result.notes if n.startswith("heads ") or "rank" in n],
            }
        )
        outputs.append(result.model)
    before, *after = latencies([model, *outputs], timed)
    for row, ms in zip(rows, after, strict=True):
        row |= {"latency_ms_before": round(before, 3), "latency_ms_after": round(ms, 3)}
    rows.append(preset_row(key, held_out))
    return rows


def run(models: tuple[str, ...] = ("encoder", "ppocr_cls"), held_out: int = 64, steps: int = 8) -> list[dict]:
    """Return one row per model and method: parameters saved at agreement ≥ 0.99, latency."""
    return [row for key in models for row in run_one(key, held_out, steps)]


def _table(rows: list[dict]) -> str:
    columns = [
        "model",
        "method",
        "agreement",
        "layers_split",
        "head_pairs_narrowed",
        "params_saved",
        "saved_pct",
        "latency_ms_before",
        "latency_ms_after",
        "note",
    ]
    shown = [c for c in columns if any(c in r for r in rows)]
    lines = [" | ".join(shown), " | ".join("---" for _ in shown)]
    lines += [" | ".join(str(r.get(c, "")) for c in shown) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1:2] == ["--preset"]:  # only the preset rows, merged into benchmarks/results/lowrank.json
        from benchmarks.common import merge_saved_rows

        for key in sys.argv[2:] or ["encoder"]:
            row = preset_row(key)
            print(row)
            merge_saved_rows("lowrank", [row], f"python -m benchmarks.lowrank --preset {key}")
        sys.exit(0)
    rows = run(tuple(sys.argv[1:]) or ("encoder", "ppocr_cls"))
    print(_table(rows))
    for row in rows:
        if row.get("ranks"):
            print(row["model"], row["method"], row["ranks"])
        for note in row.get("notes", []):
            print(row["model"], row["method"], note)
