"""Benchmark the gate: ``onnxopt check`` next to ``polygraphy run --onnxrt`` on the same pairs.

For each real model (PP-OCR det and cls, two Silero VAD exports) the reference is the file
from its wheel and three candidates are written: two equivalent ones, the ``fuse`` preset's
output (when that pipeline runs) and a rewrite (Constant weights lifted, nodes reordered,
internal tensors renamed), and a faulty one (the first quarter of one weight's leading axis,
a Conv's output channels, scaled by 1.3, as in ``tests/test_gate_real.py``). Both tools see
the same real inputs (``benchmarks.inputs``), stored in each tool's own format beforehand:

- ``onnxopt check REFERENCE CANDIDATE --data inputs.npz`` (default ``exact`` profile, the
  candidate at onnxruntime's ``disabled`` and ``default`` levels);
- ``polygraphy run REFERENCE --onnxrt --load-inputs inputs.json --save-outputs ref.json``
  then ``polygraphy run CANDIDATE --onnxrt --load-inputs inputs.json --load-outputs ref.json``
  (Polygraphy's default tolerances; ``run`` takes one model, so a pair needs two commands).

Wall time is measured with ``time.perf_counter`` around the whole command line (both
Polygraphy commands summed) and peak memory with ``/usr/bin/time -f %M`` (the larger of
Polygraphy's two processes); each measurement is repeated, tools interleaved, and the
median reported. A last table shows both verdicts on an int8 ``quantize_static`` PP-OCR
classifier (``onnxopt check --profile int8`` against Polygraphy's defaults) next to the
quantized model's task agreement with the float model.

Run ``python -m benchmarks.harness`` from the repository root; ``--quick`` checks one
small model once. :func:`run` returns the rows for other scripts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import inputs as real_inputs
from benchmarks.faults import rename_internal_tensors, reorder_nodes, scale_weight_slice
from benchmarks.models import fetch
from onnxopt.data import save_dataset
from onnxopt.model import load_model, save_model
from onnxopt.normalize import normalize

__all__ = ["MODELS", "Measurement", "format_table", "main", "run"]

MODELS: dict[str, int] = {"ppocr_det": 8, "ppocr_cls": 32, "silero_vad_op15": 32, "silero_vad_op18": 32}
"""The models benchmarked and how many real samples each check runs on."""

TOOLS = ("onnxopt", "polygraphy")
_ROOT = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
_TIME = "/usr/bin/time"

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Measurement:
    """One command line run: wall seconds, peak RSS in MiB, verdict and the tail of its output."""

    seconds: float
    peak_mib: float
    verdict: str
    detail: str


# --------------------------------------------------------------------------- inputs, candidates


def _inputs(key: str, n: int, seed: int = 0) -> list[Feed]:
    if key == "ppocr_det":
        return real_inputs.ppocr_det_inputs(n, seed=seed)
    if key == "ppocr_cls":
        return real_inputs.ppocr_cls_inputs(n, seed=seed)
    return real_inputs.vad_inputs(key, n, seed=seed)


def _normalized(path: Path) -> onnx.ModelProto:
    """Load ``path`` with Constant weights lifted to initializers, where faults can reach them."""
    return normalize(load_model(path), shapes=False).model


def _rewritten(path: Path) -> onnx.ModelProto:
    return rename_internal_tensors(reorder_nodes(_normalized(path)))


def _fused(path: Path) -> onnx.ModelProto:
    from onnxopt.pipeline import Context, load_recipe

    return load_recipe("fuse").build().run(load_model(path), Context()).model


def _equivalents(path: Path, notes: list[str]) -> dict[str, onnx.ModelProto]:
    """Return the equivalent rewrites of the model at ``path`` by name (``fuse`` when the preset runs)."""
    candidates = {}
    try:
        candidates["fuse"] = _fused(path)
    except Exception as exc:  # the preset is work in progress: report why and go on with the rewrite
        notes.append(f"{path.name}: the fuse preset failed ({type(exc).__name__}: {exc})")
    candidates["rewrite"] = _rewritten(path)
    return candidates


def _faulty(path: Path) -> onnx.ModelProto:
    """Return the model with the first quarter of one weight's leading axis scaled by 1.3."""
    return scale_weight_slice(_normalized(path))


def _write_inputs(feeds: Sequence[Feed], folder: Path) -> tuple[Path, Path]:
    """Write the feeds once per tool: npz data for onnxopt, a JSON list for Polygraphy.

    onnxopt gets one stacked ``inputs.npz``, except for models with a scalar input (Silero
    VAD's ``sr``): ``onnxopt check --data`` unstacks a ``(N,)`` array into numpy scalars,
    which onnxruntime rejects, so those get the one-npz-per-sample folder layout instead.
    """
    from polygraphy.json import save_json

    if any(np.ndim(value) == 0 for value in feeds[0].values()):
        npz = folder / "inputs"
        npz.mkdir(exist_ok=True)
        for index, feed in enumerate(feeds):
            np.savez(npz / f"{index:05d}.npz", **feed)  # type: ignore[arg-type]
    else:
        npz = save_dataset(list(feeds), folder / "inputs.npz")
    json_path = folder / "inputs.json"
    save_json(list(feeds), str(json_path))
    return npz, json_path


# --------------------------------------------------------------------------- running the tools


def _timed(argv: Sequence[str], folder: Path) -> tuple[float, float, int, str]:
    """Run ``argv`` under /usr/bin/time; return (seconds, peak MiB, exit code, output)."""
    rss_file = folder / "rss.txt"
    start = time.perf_counter()
    done = subprocess.run(
        [_TIME, "-f", "%M", "-o", str(rss_file), *argv],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    peak_kib = int(rss_file.read_text().strip().splitlines()[-1])
    return seconds, peak_kib / 1024, done.returncode, done.stdout + done.stderr


def _tail(text: str, lines: int = 3) -> str:
    """Return the last lines of a tool's output on one line, or Polygraphy's required tolerance."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    needed = [line.removeprefix("[I]").strip() for line in kept if "Minimum Required Tolerance" in line]
    return " | ".join(needed[:2] or kept[-lines:])


def _onnxopt(reference: Path, candidate: Path, npz: Path, folder: Path, profile: str = "exact") -> Measurement:
    argv = [str(_BIN / "onnxopt"), "check", str(reference), str(candidate), "--data", str(npz)]
    if profile != "exact":
        argv += ["--profile", profile]
    seconds, peak, code, output = _timed(argv, folder)
    verdict = {0: "pass", 1: "FAIL"}.get(code, f"error (exit {code})")
    return Measurement(seconds, peak, verdict, _tail(output))


def _polygraphy(reference: Path, candidate: Path, inputs_json: Path, folder: Path) -> Measurement:
    ref_outputs = folder / "ref_outputs.json"
    ref_outputs.unlink(missing_ok=True)
    polygraphy = str(_BIN / "polygraphy")
    first = [
        polygraphy,
        "run",
        str(reference),
        "--onnxrt",
        "--load-inputs",
        str(inputs_json),
        "--save-outputs",
        str(ref_outputs),
    ]
    second = [
        polygraphy,
        "run",
        str(candidate),
        "--onnxrt",
        "--load-inputs",
        str(inputs_json),
        "--load-outputs",
        str(ref_outputs),
    ]
    seconds_ref, peak_ref, code, output = _timed(first, folder)
    if code != 0:
        return Measurement(seconds_ref, peak_ref, f"error (exit {code})", _tail(output))
    seconds, peak, code, output = _timed(second, folder)
    if code == 0:
        verdict = "pass"
    elif "FAILED" in output:
        verdict = "FAIL"
    else:
        verdict = f"error (exit {code})"
    return Measurement(seconds_ref + seconds, max(peak_ref, peak), verdict, _tail(output))


def _measure_pair(
    reference: Path, candidate: Path, npz: Path, inputs_json: Path, folder: Path, repeats: int
) -> dict[str, list[Measurement]]:
    """Run both tools ``repeats`` times, alternating which goes first."""
    runs: dict[str, list[Measurement]] = {tool: [] for tool in TOOLS}
    runners: dict[str, Callable[[], Measurement]] = {
        "onnxopt": lambda: _onnxopt(reference, candidate, npz, folder),
        "polygraphy": lambda: _polygraphy(reference, candidate, inputs_json, folder),
    }
    for repeat in range(repeats):
        order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
        for tool in order:
            runs[tool].append(runners[tool]())
    return runs


def _verdict(runs: Sequence[Measurement]) -> str:
    verdicts = sorted({m.verdict for m in runs})
    return verdicts[0] if len(verdicts) == 1 else "inconsistent: " + "/".join(verdicts)


# --------------------------------------------------------------------------- benchmark


def _benchmark_model(key: str, samples: int, repeats: int, folder: Path, notes: list[str]) -> list[dict[str, Any]]:
    reference = fetch(key)
    npz, inputs_json = _write_inputs(_inputs(key, samples), folder)
    if npz.is_dir():
        notes.append(
            f"{key}: onnxopt read --data from a folder of per-sample .npz files (scalar input; "
            "a stacked inputs.npz makes onnxopt check exit 3)"
        )
    models = {**_equivalents(reference, notes), "faulty": _faulty(reference)}
    paths = {name: save_model(model, folder / f"{name}.onnx") for name, model in models.items()}
    timed_name = next(iter(paths))  # the fuse output when the preset runs, else the rewrite
    runs = {
        name: _measure_pair(reference, path, npz, inputs_json, folder, repeats if name == timed_name else 1)
        for name, path in paths.items()
    }
    rows = []
    for tool in TOOLS:
        timed = runs[timed_name][tool]
        seconds = statistics.median(m.seconds for m in timed)
        for name in paths:
            first = runs[name][tool][0]
            if first.verdict != ("FAIL" if name == "faulty" else "pass"):
                notes.append(f"{key}, {tool} on the {name} candidate: {first.verdict}: {first.detail}")
        rows.append(
            {
                "model": key,
                "tool": tool,
                "samples": samples,
                "timed": timed_name,
                "wall_s": round(seconds, 3),
                "ms_per_sample": round(1000 * seconds / samples, 1),
                "peak_rss_mib": round(statistics.median(m.peak_mib for m in timed), 1),
                "repeats": repeats,
                **{
                    name: _verdict(runs[name][tool]) if name in runs else "n/a"
                    for name in ("fuse", "rewrite", "faulty")
                },
            }
        )
    return rows


def _benchmark_int8(folder: Path, samples: int = 32, calibration: int = 16) -> list[dict[str, Any]]:
    """Quantize PP-OCR cls with quantize_static and give both tools the float/int8 pair."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self, feeds: Sequence[Feed]) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> Feed | None:
            return next(self._feeds, None)

    reference = fetch("ppocr_cls")
    quantized = folder / "int8.onnx"
    quantize_static(
        str(reference),
        str(quantized),
        _Reader(real_inputs.ppocr_cls_inputs(calibration, seed=1)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
    )
    held_out = real_inputs.ppocr_cls_inputs(samples, seed=7)
    agreement = real_inputs.task_agreement(
        "ppocr_cls", real_inputs.run_model(reference, held_out), real_inputs.run_model(quantized, held_out)
    )
    npz, inputs_json = _write_inputs(held_out, folder)
    results = {
        "onnxopt": _onnxopt(reference, quantized, npz, folder, profile="int8"),
        "polygraphy": _polygraphy(reference, quantized, inputs_json, folder),
    }
    return [
        {
            "model": "ppocr_cls",
            "tool": tool,
            "samples": samples,
            "candidate": f"int8 quantize_static (QDQ, per-channel, {calibration} calibration samples)",
            "settings": "--profile int8" if tool == "onnxopt" else "default tolerances",
            "task_agreement": round(agreement, 4),
            "int8": result.verdict,
            "wall_s": round(result.seconds, 3),
            "peak_rss_mib": round(result.peak_mib, 1),
        }
        for tool, result in results.items()
    ]


def run(
    models: Sequence[str] | None = None,
    *,
    repeats: int = 3,
    samples: dict[str, int] | None = None,
    int8: bool = True,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark both tools and return one row per (model, tool), then the int8 rows.

    Each row gives both tools' verdicts on every candidate (``fuse``, ``rewrite``,
    ``faulty``) and the median wall time and peak RSS on the ``timed`` one. Unexpected
    verdicts, tool errors and a failing fuse preset are appended to ``notes``.
    """
    notes = [] if notes is None else notes
    counts = {**MODELS, **(samples or {})}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-harness-") as tmp:
        for key in models or list(MODELS):
            folder = Path(tmp) / key
            folder.mkdir()
            rows.extend(_benchmark_model(key, counts[key], repeats, folder, notes))
        if int8:
            folder = Path(tmp) / "int8"
            folder.mkdir()
            rows.extend(_benchmark_int8(folder))
    return rows


# --------------------------------------------------------------------------- report


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Return ``rows`` as a Markdown table of ``columns``."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ppocr_cls, 8 samples, once, no int8")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="models to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool, interleaved (median kept)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 verdict table")
    args = parser.parse_args(argv)
    notes: list[str] = []
    if args.quick:
        repeats = 1
        rows = run(["ppocr_cls"], repeats=repeats, samples={"ppocr_cls": 8}, int8=False, notes=notes)
    else:
        repeats = args.repeats
        rows = run(args.models, repeats=repeats, int8=not args.no_int8, notes=notes)
    print(
        format_table(
            [r for r in rows if "int8" not in r],
            [
                "model",
                "tool",
                "samples",
                "wall_s",
                "ms_per_sample",
                "peak_rss_mib",
                "timed",
                "fuse",
                "rewrite",
                "faulty",
            ],
        )
    )
    print(f"""
wall_s, ms_per_sample (wall_s / samples, start-up included), peak_rss_mib: median of {repeats} interleaved \
run(s) on the `timed` candidate.
onnxopt: `onnxopt check REF CAND --data inputs.npz`, exact profile, candidate at onnxruntime levels disabled \
and default. polygraphy: `polygraphy run REF --onnxrt --load-inputs inputs.json --save-outputs ref.json` then \
`polygraphy run CAND --onnxrt --load-inputs inputs.json --load-outputs ref.json`, default tolerances \
(atol=rtol=1e-5, elementwise), ORT_ENABLE_ALL; time summed and peak RSS maxed over both commands.
Verdicts: fuse = the `fuse` preset's output; rewrite = Constant weights lifted, nodes reordered, internal \
tensors renamed; faulty = the first quarter of one weight's output channels scaled by 1.3 (should FAIL).""")
    int8_rows = [r for r in rows if "int8" in r]
    if int8_rows:
        print()
        print(
            format_table(
                int8_rows,
                ["model", "tool", "settings", "int8", "task_agreement", "wall_s", "peak_rss_mib", "candidate"],
            )
        )
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
