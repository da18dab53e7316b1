"""Gate benchmark (#13): whether `check --profile int8` with inferred metrics only agrees with the task.

For the document models (the YOLOv8 layout detector, boxes and scores concatenated in one
output; PP-OCRv4 rec, CTC), it builds int8 candidates — onnxruntime's ``quantize_static``
in three configurations (QDQ per-channel, QDQ per-tensor, QOperator; on an opset-13 copy,
which per-channel QDQ needs) and onnxopt's ``int8`` preset — from the same calibration
inputs, then on unseen inputs measures each candidate's task agreement with the float model
(:func:`benchmarks.inputs.task_agreement`) and the gate's verdict, with the judge's
inferred metrics and with the whole-tensor signal floors it replaced. The gate is right
on a candidate when it passes one with agreement >= 0.99 and fails one below 0.9.

Run: ``python -m benchmarks.gate [--only doclayout_yolo,ppocr_rec] [--calibration 32] [--held-out 64]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import inputs as real_inputs
from benchmarks.common import interleaved_latency
from benchmarks.documents import layout_pages, rec_lines
from benchmarks.models import fetch
from benchmarks.quantize import quantize_ours
from onnxopt.harness import compare_outputs, infer_metrics

MODELS = ("doclayout_yolo", "ppocr_rec")
RESULTS = Path(__file__).parent / "results" / "gate.json"


def model_inputs(key: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Return ``n`` real inputs of a document model (rendered pages or text lines)."""
    return layout_pages(n, seed=seed) if key == "doclayout_yolo" else rec_lines(n, seed=seed)


def onnxruntime_candidates(model: Path, calib: list[dict[str, np.ndarray]], folder: Path) -> dict[str, Path]:
    """Return quantize_static candidates in three configurations (failures are left out)."""
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    source = folder / "opset13.onnx"
    loaded = onnx.load(str(model))
    version = next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx"))
    onnx.save(version_converter.convert_version(loaded, 13) if version < 13 else loaded, str(source))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    configurations = {
        "quantize_static QDQ per-channel": {"quant_format": QuantFormat.QDQ, "per_channel": True},
        "quantize_static QDQ per-tensor": {"quant_format": QuantFormat.QDQ, "per_channel": False},
        "quantize_static QOperator": {"quant_format": QuantFormat.QOperator, "per_channel": False},
    }
    made = {}
    for index, (label, options) in enumerate(configurations.items()):
        out = folder / f"ort{index}.onnx"
        try:
            quantize_static(str(source), str(out), Reader(), **options)
            made[label] = out
        except Exception as exc:  # recorded as a missing row, not a crash of the suite
            print(f"{label}: {type(exc).__name__}: {str(exc)[:160]}")
    return made


def judge_candidate(
    key: str, model: Path, candidate: Path, held: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Return the candidate's task agreement and the two gates' verdicts on ``held``.

    The candidate runs once (onnxruntime's default level, as ``check`` runs it there);
    the gate's judgement is :func:`onnxopt.harness.compare_outputs` on those outputs with
    the metrics :func:`onnxopt.harness.infer_metrics` infers from the float model (what
    ``check --profile int8`` does), and without them (the whole-tensor signal floors).
    """
    outputs = real_inputs.run_model(candidate, held)
    agreement = real_inputs.task_agreement(key, reference, outputs, held)
    metrics = infer_metrics(onnx.load(str(model), load_external_data=False), reference)
    inferred = compare_outputs(reference, outputs, profile="int8", metrics=metrics, inputs=held)
    signal = compare_outputs(reference, outputs, profile="int8")
    right = (agreement >= 0.99 and inferred.passed) or (agreement < 0.9 and not inferred.passed)
    return {
        "agreement": agreement,
        "gate_inferred": inferred.passed,
        "gate_signal_floors": signal.passed,
        "inferred_metrics": [f"{m.output}:{m.describe()}" for m in inferred.metrics],
        "whole_tensor": [f"{o.name}: cosine {o.cosine:.5f}, SQNR {o.sqnr_db:.1f} dB" for o in signal.outputs],
        "gate_right": bool(right) if not 0.9 <= agreement < 0.99 else None,
        "size_ratio": candidate.stat().st_size / model.stat().st_size,
    }


def run(keys: list[str], calibration: int, held_out: int) -> list[dict[str, Any]]:
    """Return one row per model and candidate."""
    rows: list[dict[str, Any]] = []
    for key in keys:
        model = fetch(key)
        calib = model_inputs(key, calibration, seed=10)
        held = model_inputs(key, held_out, seed=20)
        reference = real_inputs.run_model(model, held)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            candidates = onnxruntime_candidates(model, calib, folder)
            ours = folder / "onnxopt.onnx"
            info = quantize_ours(model, calib, ours)
            if ours.exists():
                candidates["onnxopt int8"] = ours
            timed = {"float": model, **candidates}  # interleaved on one unseen input, one thread
            seconds = dict(
                zip(timed, interleaved_latency(list(timed.values()), held[0], threads=1, rounds=20), strict=True)
            )
            for label, path in candidates.items():
                row = {"model": key, "candidate": label, **judge_candidate(key, model, path, held, reference)}
                row["latency_ratio"] = seconds[label] / seconds["float"]
                if label == "onnxopt int8":
                    row["pass_seconds"] = round(info["seconds"], 1)
                    row["notes"] = [
                        n
                        for n in info["notes"]
                        if any(k in n for k in ("task metric", "cross-fitted", "latency", "bits"))
                    ]
                rows.append(row)
                print(json.dumps(row), flush=True)
            rows.append({"model": key, "seconds": time.perf_counter() - started})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=64)
    args = parser.parse_args()
    stamp = f"python -m benchmarks.gate --only {args.only} ({datetime.date.today().isoformat()})"
    rows = [
        {**row, "measured": stamp}
        for row in run([k for k in args.only.split(",") if k], args.calibration, args.held_out)
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    measured = {row["model"] for row in rows}
    kept = [row for row in previous if row.get("model") not in measured]
    RESULTS.write_text(json.dumps(kept + rows, indent=1, default=str))


if __name__ == "__main__":
    main()
