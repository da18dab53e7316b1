"""Calibration's own memory on the encoder at 32, 256 and 1024 samples, each in a fresh process.

What is measured is the int8 pass's calibration step alone (the streaming observers over
every tensor the placement quantizes), not the whole process: in a fresh process the
encoder is loaded, fused, named and placed as the int8 pass does, the samples are built,
and only then is the resident set read (``before``). A sampler thread reads
``/proc/self/statm`` every millisecond while calibration runs; ``own_mib`` is the peak
minus ``before``, which includes onnxruntime's arena and the sessions the streaming
collector opens. ``tracemalloc_mib`` is the Python/numpy part of it alone.

The suite has 337 distinct sentences: 1024 samples repeat them (each sample is streamed
through the model on its own, so a repeated sentence costs what a new one does).

``python -m benchmarks.calibration_memory`` prints the rows; ``benchmarks.run`` puts them
in ``results/int8.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["SAMPLES", "calibration_memory", "run"]

SAMPLES = (32, 256, 1024)

_CHILD = """
import json, os, threading, time, tracemalloc
from benchmarks.encoder import SENTENCES, encoder_model_path
from benchmarks.inputs import encoder_inputs
from onnxopt.data import Dataset
from onnxopt.model import load_model
from onnxopt.normalize import infer_shapes
from onnxopt.pipeline import Context, load_recipe
from onnxopt.passes.quantize.int8 import QuantizeInt8, _name_nodes
from onnxopt.passes.quantize.placement import DEFAULT_OP_TYPES, place

PAGE = os.sysconf("SC_PAGE_SIZE")

def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE

samples = {samples}
model = load_recipe("fuse").build().run(load_model(encoder_model_path())).model
_name_nodes(model)
model, _ = infer_shapes(model)
tensors = place(model, op_types=DEFAULT_OP_TYPES).observed
distinct = encoder_inputs(len(SENTENCES))
data = Dataset([distinct[i % len(distinct)] for i in range(samples)])
pass_ = QuantizeInt8()
peak = [0]
running = [True]

def sample_rss() -> None:
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)

before = rss()
peak[0] = before
sampler = threading.Thread(target=sample_rss, daemon=True)
sampler.start()
started = time.perf_counter()
stats = {{}}
pass_._calibrate(model, tensors, data, Context(calibration=data), stats)
seconds = time.perf_counter() - started
running[0] = False
sampler.join()
peak[0] = max(peak[0], rss())
print(json.dumps({{"before": before, "peak": peak[0], "tracemalloc": stats["calibration_peak_bytes"],
                  "tensors": len(tensors), "seconds": seconds}}))
"""


def calibration_memory(samples: int) -> dict[str, Any]:
    """Return one row: calibration's own peak memory on the encoder with ``samples`` samples."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(samples=samples)], check=True, capture_output=True, text=True, env=env
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2.0**20
    return {
        "model": "encoder",
        "method": "onnxopt calibration (MSE observers, streamed)",
        "samples": samples,
        "tensors_observed": measured["tensors"],
        "rss_before_mib": measured["before"] / mib,
        "rss_peak_mib": measured["peak"] / mib,
        "own_mib": (measured["peak"] - measured["before"]) / mib,
        "tracemalloc_mib": measured["tracemalloc"] / mib,
        "seconds": measured["seconds"],
    }


def run(samples: tuple[int, ...] = SAMPLES) -> list[dict[str, Any]]:
    """Return one row per sample count, each measured in its own fresh process."""
    return [calibration_memory(n) for n in samples]


def main() -> None:
    """Print calibration's own peak memory at each sample count (``--save``: merge into int8.json)."""
    save = "--save" in sys.argv[1:]
    counts = tuple(int(a) for a in sys.argv[1:] if a != "--save") or SAMPLES
    rows = run(counts)
    if save:
        from benchmarks.common import merge_saved_rows

        merge_saved_rows("int8", rows, "python -m benchmarks.calibration_memory --save")
    for row in rows:
        print(
            f"{row['samples']:5d} samples: own peak {row['own_mib']:7.1f} MiB (RSS {row['rss_before_mib']:.0f} -> "
            f"{row['rss_peak_mib']:.0f} MiB), tracemalloc {row['tracemalloc_mib']:.1f} MiB, "
            f"{row['tensors_observed']} tensors, {row['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
