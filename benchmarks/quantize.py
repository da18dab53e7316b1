"""int8 quantization benchmark: float vs onnxopt ``int8`` vs onnxruntime ``quantize_static``.

For each model (PP-OCR det, PP-OCR cls, the MiniLM sentence encoder when torch can export
it) and the same 32 calibration samples, it reports task agreement with the float model on
held-out inputs, file size ratio, median latency ratio (interleaved A/B runs at
onnxruntime's default optimization level, ``intra_op_num_threads`` fixed), quantize wall
time and calibration peak memory; and, for the encoder, peak RSS of calibrating on 32 vs
256 samples (each in a fresh subprocess).

onnxruntime's tool runs as documented for static QDQ: ``quant_pre_process`` first (its
failure is recorded and the raw model used), then ``quantize_static`` with
``QuantFormat.QDQ``, ``per_channel=True``, uint8 activations / int8 weights, MinMax.

Run: ``python -m benchmarks.quantize [ppocr_det ppocr_cls encoder] [--threads 1] [--no-memory]
[--save]`` (``--save`` merges the rows into ``benchmarks/results/int8.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import inputs as real_inputs
from benchmarks.common import feeds, interleaved_latency, model_path
from benchmarks.models import fetch
from onnxopt.runtime import run_model

CALIBRATION = 32
HELD_OUT = 16
DET_SIZE = (480, 640)


def _model_and_inputs(key: str, n: int) -> tuple[Path, list[dict[str, np.ndarray]]]:
    if key == "ppocr_det":
        return fetch(key), real_inputs.ppocr_det_inputs(n, size=DET_SIZE)
    if key == "encoder":
        from benchmarks.encoder import encoder_model_path

        return encoder_model_path(), real_inputs.encoder_inputs(n)
    return model_path(key), feeds(key, n)


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return run_model(str(path), feeds)


#: Extra rows per model: the int8 preset with the harness's int8 cosine floor (0.995) as the
#: accuracy target, on the output the task reads (a sentence encoder's pooled embedding rather
#: than its per-token states), where the default target also holds the per-token states.
SCOPED_TARGETS = {"encoder": "cosine>=0.995@sentence_embedding"}


def quantize_ours(
    model: Path, feeds: list[dict[str, np.ndarray]], out: Path, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run ``onnxopt optimize M -o Q --pipeline int8 --calib data.npz [extra]`` and return its report."""
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
        report = Path(tmp) / "report.json"
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxopt",
                "optimize",
                str(model),
                "-o",
                str(out),
                "--pipeline",
                "int8",
                "--calib",
                str(calib),
                "--report",
                str(report),
                "--quiet",
                *extra,
            ],
            check=True,
        )
        seconds = time.perf_counter() - started
        data = json.loads(report.read_text())
    stats = next((p["stats"] for p in data["passes"] if p["pass"] == "quantize_int8"), {})
    notes = next((p["notes"] for p in data["passes"] if p["pass"] == "quantize_int8"), [])
    return {"seconds": seconds, "peak_bytes": stats.get("calibration_peak_bytes"), "stats": stats, "notes": notes}


#: Extra onnxruntime rows per model: quantize_static restricted by ``op_types_to_quantize``
#: to MatMul, the usual first remedy when a transformer collapses under the default (every
#: op it supports).
ONNXRUNTIME_OP_TYPES = {"encoder": ["MatMul"]}


def quantize_onnxruntime(
    model: Path, feeds: list[dict[str, np.ndarray]], out: Path, op_types: list[str] | None = None
) -> dict[str, Any]:
    """Run onnxruntime's documented static QDQ flow; record a pre-processing failure."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    result: dict[str, Any] = {}
    started = time.perf_counter()
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # quant_pre_process leaves temporary files in the working directory when it fails
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(model), str(prepared))
            source = prepared
            result["pre_process"] = "ok"
        except Exception as exc:
            first = (str(exc).strip().splitlines() or ["(no message)"])[0]
            result["pre_process"] = f"failed: {type(exc).__name__}: {first[:160]}"
            source = model
        try:
            quantize_static(
                str(source),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=op_types,
            )
        finally:
            os.chdir(previous)
    result["seconds"] = time.perf_counter() - started
    return result


def run(keys: list[str] | None = None, threads: int = 1) -> list[dict[str, Any]]:
    """Return one row per model and method (float, onnxopt, onnxruntime)."""
    rows: list[dict[str, Any]] = []
    for key in keys or ["ppocr_det", "ppocr_cls", "encoder"]:
        try:
            model, feeds = _model_and_inputs(key, CALIBRATION + HELD_OUT)
        except RuntimeError as exc:  # the encoder needs torch to export
            rows.append({"model": key, "method": "-", "error": str(exc)})
            continue
        calib, held = feeds[:CALIBRATION], feeds[CALIBRATION:]
        reference = _run(model, held)
        with tempfile.TemporaryDirectory() as tmp:
            ours, theirs = Path(tmp) / "ours.onnx", Path(tmp) / "ort.onnx"
            info = {"onnxopt": quantize_ours(model, calib, ours)}
            scoped = Path(tmp) / "scoped.onnx"
            if key in SCOPED_TARGETS:
                label = f"onnxopt --target {SCOPED_TARGETS[key]}"
                info[label] = quantize_ours(model, calib, scoped, ("--target", SCOPED_TARGETS[key]))
            variants: dict[str, tuple[Path, list[str] | None]] = {"onnxruntime": (theirs, None)}
            if key in ONNXRUNTIME_OP_TYPES:
                variants[f"onnxruntime, op types {'+'.join(ONNXRUNTIME_OP_TYPES[key])}"] = (
                    Path(tmp) / "ort_ops.onnx",
                    ONNXRUNTIME_OP_TYPES[key],
                )
            for label, (path, op_types) in variants.items():
                try:
                    info[label] = quantize_onnxruntime(model, calib, path, op_types)
                except Exception as exc:
                    info[label] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            paths = {"float": model, "onnxopt": ours}
            paths.update({label: scoped for label in info if label.startswith("onnxopt --target")})
            paths.update({label: path for label, (path, _) in variants.items() if path.exists()})
            latency = dict(
                zip(paths, interleaved_latency(list(paths.values()), held[0], threads=threads, rounds=20), strict=True)
            )
            for method, path in paths.items():
                outputs = reference if method == "float" else _run(path, held)
                row = {
                    "model": key,
                    "method": method,
                    "agreement": real_inputs.task_agreement(key, reference, outputs, held),
                    "size_ratio": path.stat().st_size / model.stat().st_size,
                    "latency_ms": latency[method] * 1e3,
                    "latency_ratio": latency[method] / latency["float"],
                }
                row.update({k: v for k, v in info.get(method, {}).items() if k != "stats"})
                rows.append(row)
            rows += [{"model": key, "method": label, **info[label]} for label in variants if label not in paths]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["ppocr_det", "ppocr_cls", "encoder"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the calibration memory rows")
    parser.add_argument("--save", action="store_true", help="merge the rows into benchmarks/results/int8.json")
    args = parser.parse_args()
    rows = run(args.models, args.threads)
    if args.save:
        from benchmarks.common import merge_saved_rows

        memory = " --no-memory" if args.no_memory else ""
        command = f"python -m benchmarks.quantize {' '.join(args.models)} --threads {args.threads}{memory} --save"
        merge_saved_rows("int8", rows, command)
    header = f"{'model':10s} {'method':12s} {'agree':>7s} {'size':>6s} {'latency':>10s} {'ratio':>6s} {'time s':>7s}"
    print(header)
    for r in rows:
        if "agreement" not in r:
            print(f"{r['model']:10s} {r['method']:12s} {r.get('error', '')}")
            continue
        print(
            f"{r['model']:10s} {r['method'][:12]:12s} {r['agreement']:7.4f} {r['size_ratio']:6.3f} "
            f"{r['latency_ms']:8.2f}ms {r['latency_ratio']:6.2f} {r.get('seconds', 0):7.1f}"
            + (f"  pre_process {r['pre_process']}" if "pre_process" in r else "")
        )
    if "encoder" in args.models and not args.no_memory:
        from benchmarks import calibration_memory

        for row in calibration_memory.run():
            print(f"encoder calibration, {row['samples']} samples: own peak {row['own_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
