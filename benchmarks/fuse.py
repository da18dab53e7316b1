"""Benchmark the ``fuse`` preset against onnxslim on real models, side by side in one run.

For each model: nodes (subgraphs included), file size, optimize time, onnxruntime
latency (median of interleaved runs, one thread, graph optimizations disabled and at the
default level) of the original, our ``fuse`` output and onnxslim's output, whether each
output matches the original under the harness's exact profile, and task agreement on
real inputs.

Run ``python -m benchmarks.fuse [model ...]``; model keys are those of
``benchmarks.models.MODELS`` plus ``encoder`` (needs torch to export) and ``digits``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import onnx

from benchmarks.common import Feed, feeds, interleaved_latency, model_path
from benchmarks.inputs import task_agreement
from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import load_model, model_stats, serialized_size
from onnxopt.pipeline import load_recipe
from onnxopt.runtime import run_model

__all__ = ["DEFAULT_MODELS", "format_table", "run"]

log = logging.getLogger(__name__)

DEFAULT_MODELS = [
    "ppocr_det",
    "ppocr_cls",
    "silero_vad",
    "silero_vad_op15",
    "silero_vad_sequence",
    "silero_vad_half",
    "silero_vad_op18",
    "silero_vad_openvino",
    "encoder",
]


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


def _inputs(key: str) -> list[Feed]:
    if key == "ppocr_det":  # a smaller frame keeps the run short; the graph is the same
        from benchmarks.inputs import ppocr_det_inputs

        return ppocr_det_inputs(2, size=(320, 320))
    return feeds(key, 4)


def run(models: list[str]) -> list[dict[str, Any]]:
    """Benchmark each model key; return one row per (model, method) plus skip notes."""
    rows: list[dict[str, Any]] = []
    for key in models:
        try:
            original = load_model(model_path(key))
        except RuntimeError as exc:  # the encoder needs torch to export
            rows.append({"model": key, "method": "-", "note": f"skipped: {exc}"})
            continue
        variants: dict[str, onnx.ModelProto] = {"original": original}
        seconds = {"original": 0.0}
        variants["onnxopt"], seconds["onnxopt"] = _optimize_ours(original)
        variants["onnxslim"], seconds["onnxslim"] = _optimize_onnxslim(original)
        samples = _inputs(key)
        reference = run_model(original, samples)
        models_ = list(variants.values())
        latency = {
            level: dict(zip(variants, interleaved_latency(models_, samples[0], optimization=level), strict=True))
            for level in ("disabled", "default")
        }
        original_bytes = serialized_size(original)
        for name, model in variants.items():
            outputs = reference if name == "original" else run_model(model, samples)
            exact = True if name == "original" else check(original, model, Dataset(samples)).passed
            rows.append(
                {
                    "model": key,
                    "method": name,
                    "nodes": model_stats(model).nodes,
                    "size_ratio": serialized_size(model) / original_bytes,
                    "optimize_s": round(seconds[name], 2),
                    "ms_disabled": latency["disabled"][name] * 1e3,
                    "ms_default": latency["default"][name] * 1e3,
                    "latency_ratio": latency["default"][name] / latency["default"]["original"],
                    "agreement": task_agreement(key, reference, outputs, samples),
                    "exact": exact,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a plain-text table."""
    header = (
        f"{'model':<20} {'method':<9} {'nodes':>6} {'size':>6} {'opt s':>6} {'ms off':>8} "
        f"{'ms default':>10} {'exact':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if "note" in row:
            lines.append(f"{row['model']:<20} {row['note']}")
            continue
        lines.append(
            f"{row['model']:<20} {row['method']:<9} {row['nodes']:>6} {row['size_ratio']:>6.3f} "
            f"{row['optimize_s']:>6.2f} {row['ms_disabled']:>8.3f} {row['ms_default']:>10.3f} "
            f"{'yes' if row['exact'] else 'NO':>6}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(format_table(run(sys.argv[1:] or DEFAULT_MODELS)))
