"""Benchmark the ``fuse`` preset against onnxslim on real models, side by side in one run.

For each model: nodes (subgraphs included), file size, optimize time, onnxruntime
latency (median of interleaved runs, one thread, graph optimizations disabled and at the
default level) of the original, our ``fuse`` output and onnxslim's output, and whether
each output matches the original under the harness's exact profile.

Run ``python -m benchmarks.fuse [model ...]``; the models are the keys of
``benchmarks.models.MODELS`` plus ``encoder`` (the PyTorch-exported transformer of
``benchmarks/encoder.py``, skipped with a note when that module or torch is missing).
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import sys
import time
from typing import Any

import onnx

from onnxopt.harness import check, synthesize_inputs
from onnxopt.model import model_stats, serialized_size
from onnxopt.pipeline import load_recipe
from onnxopt.runtime import Session

log = logging.getLogger(__name__)

DEFAULT_MODELS = ["ppocr_det", "ppocr_cls", "silero_vad", "silero_vad_op15", "silero_vad_sequence",
                  "silero_vad_half", "silero_vad_op18", "silero_vad_openvino", "encoder"]


def _load(key: str) -> tuple[onnx.ModelProto | None, str]:
    if key == "encoder":
        if importlib.util.find_spec("benchmarks.encoder") is None:
            return None, "benchmarks/encoder.py is missing"
        try:
            import torch  # noqa: F401

            from benchmarks.encoder import encoder_model_path
        except ImportError as exc:
            return None, f"torch is not importable ({exc})"
        return onnx.load(str(encoder_model_path())), ""
    from benchmarks.models import fetch

    return onnx.load(str(fetch(key))), ""


def _synthesize_options(key: str, model: onnx.ModelProto) -> dict[str, Any]:
    names = {i.name for i in model.graph.input}
    if key == "ppocr_det":
        return {"shapes": {"x": (1, 3, 256, 256)}}
    if key == "encoder":
        return {"dynamic_dim": 64, "int_ranges": {"input_ids": (0, 30521), "attention_mask": (1, 1)}}
    options: dict[str, Any] = {"dynamic_dim": 512}
    if "sr" in names:
        options["int_ranges"] = {"sr": (16000, 16000)}
    return options


def _optimize_ours(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    started = time.perf_counter()
    result = load_recipe("fuse").build().run(model)
    return result.model, time.perf_counter() - started


def _optimize_onnxslim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    import onnxslim

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    started = time.perf_counter()
    slimmed = onnxslim.slim(copy)
    return slimmed, time.perf_counter() - started


def _latencies(models: dict[str, onnx.ModelProto], feed: dict[str, Any], level: str,
               budget_seconds: float = 3.0) -> dict[str, float]:
    """Median latency (ms) per model, runs interleaved so machine noise hits all alike."""
    sessions = {name: Session(m, optimization=level, threads=1, label=name) for name, m in models.items()}
    try:
        for session in sessions.values():
            session.run(feed)  # warm-up
        started = time.perf_counter()
        for session in sessions.values():
            session.run(feed)
        per_round = max(time.perf_counter() - started, 1e-4)
        rounds = max(5, min(50, int(budget_seconds / per_round)))
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, session in sessions.items():
                t0 = time.perf_counter()
                session.run(feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: statistics.median(values) for name, values in times.items()}
    finally:
        for session in sessions.values():
            session.close()


def run(models: list[str]) -> list[dict[str, Any]]:
    """Benchmark each model key; return one row per (model, variant) plus skip notes."""
    rows: list[dict[str, Any]] = []
    for key in models:
        original, skip = _load(key)
        if original is None:
            rows.append({"model": key, "variant": "-", "note": f"skipped: {skip}"})
            continue
        variants: dict[str, onnx.ModelProto] = {"original": original}
        seconds = {"original": 0.0}
        variants["fuse"], seconds["fuse"] = _optimize_ours(original)
        variants["onnxslim"], seconds["onnxslim"] = _optimize_onnxslim(original)
        options = _synthesize_options(key, original)
        data = synthesize_inputs(original, iterations=2, **options)
        latency = {level: _latencies(variants, data[0], level) for level in ("disabled", "default")}
        for name, model in variants.items():
            matches = True if name == "original" else check(original, model, data, profile="exact").passed
            rows.append({
                "model": key, "variant": name, "nodes": model_stats(model).nodes,
                "bytes": serialized_size(model), "optimize_s": round(seconds[name], 2),
                "ms_disabled": round(latency["disabled"][name], 3), "ms_default": round(latency["default"][name], 3),
                "exact": matches,
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a plain-text table."""
    header = f"{'model':<20} {'variant':<9} {'nodes':>6} {'size MB':>8} {'opt s':>6} {'ms off':>8} " \
             f"{'ms default':>10} {'exact':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['model']:<20} {row['note']}")
            continue
        lines.append(f"{row['model']:<20} {row['variant']:<9} {row['nodes']:>6} {row['bytes'] / 1e6:>8.3f} "
                     f"{row['optimize_s']:>6.2f} {row['ms_disabled']:>8.3f} {row['ms_default']:>10.3f} "
                     f"{'yes' if row['exact'] else 'NO':>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(format_table(run(sys.argv[1:] or DEFAULT_MODELS)))
