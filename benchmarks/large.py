"""Large models: time and peak memory of each tool on the > 2 GB Llama-style decoder.

Every tool runs in its own child process, one after the other (never two large jobs at
once), and its peak resident memory is the child's ``ru_maxrss`` from ``os.wait4``
(what ``/usr/bin/time -v`` reports). Jobs, side by side in one run:

* ``fuse``: ``onnxopt optimize --pipeline fuse`` against ``onnxslim.slim``;
* ``check``: ``onnxopt check`` of the original against our fused model;
* ``int4`` (when the preset is registered): ``onnxopt optimize --pipeline int4`` (its
  default method, RTN without calibration data; ``int4-lm4`` adds it with a 4-bit
  output projection) against
  onnxruntime's ``MatMulNBitsQuantizer`` (RTN, block 32, symmetric), with file sizes
  (embeddings included) relative to the fp32 files and the logits' cosine to fp32's;
* single-token (``[1, 1]``) and prefill (``[1, 64]``) latency of every output that
  loads, as interleaved ratios to the fp32 model (onnxruntime CPU, one thread; the
  machine is shared, so only the ratios of one interleaved run mean anything).

``python -m benchmarks.large [--model large] [--jobs fuse,check,int4,latency]`` writes
``benchmarks/results/large-<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, interleaved_latency, machine
from benchmarks.llama import LLAMA_CONFIGS, llama_inputs, llama_model_path
from benchmarks.models import cache_dir

__all__ = ["measure", "run"]

log = logging.getLogger(__name__)

_ONNXSLIM = """
import sys, onnxslim
onnxslim.slim(sys.argv[1], sys.argv[2])
"""

_ORT_RTN = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig
model = onnx.load(sys.argv[1])
config = RTNWeightOnlyQuantConfig()
quant = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, algo_config=config)
quant.process()
quant.model.save_model_to_file(sys.argv[2], use_external_data_format=True)
"""


def measure(command: list[str]) -> dict[str, Any]:
    """Run ``command`` as a child process; return its exit code, wall time and peak RSS (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    result = {"exit": proc.returncode, "seconds": round(seconds, 2), "peak_rss": usage.ru_maxrss * 1024}
    if proc.returncode:
        result["error"] = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
    return result


def _files_bytes(model: Path) -> int:
    """Return the bytes of a model file and every data file beside it that it references."""
    import onnx

    from onnxopt.graph import iter_tensors

    total = model.stat().st_size
    proto = onnx.load(str(model), load_external_data=False)
    locations = {entry.value for t in iter_tensors(proto) for entry in t.external_data if entry.key == "location"}
    return total + sum((model.parent / loc).stat().st_size for loc in locations)


def _optimize(model: Path, out: Path, pipeline: str) -> list[str]:
    return [sys.executable, "-m", "onnxopt", "optimize", str(model), "-o", str(out), "--pipeline", pipeline, "-q"]


def _preset_exists(name: str) -> bool:
    import onnxopt.passes  # noqa: F401  (registers the presets)

    from onnxopt.pipeline import load_recipe

    try:
        load_recipe(name)
    except Exception:  # an unknown preset: this branch does not have it yet
        return False
    return True


def run(model_name: str = "large", jobs: tuple[str, ...] = ("fuse", "check", "int4", "latency")) -> dict[str, Any]:
    """Run the jobs on the decoder ``model_name``; return the results (also written as JSON)."""
    source = llama_model_path(model_name)
    weights = _files_bytes(source)
    work = cache_dir() / "large-bench" / model_name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = LLAMA_CONFIGS[model_name]
    results: dict[str, Any] = {"model": model_name, "spec": spec.__dict__, "fp32_bytes": weights, "jobs": {}}
    outputs: dict[str, Path] = {}

    def job(name: str, command: list[str], out: Path | None = None) -> None:
        log.info("running %s", name)
        result = measure(command)
        result["rss_per_weights"] = round(result["peak_rss"] / weights, 3)
        if out is not None and result["exit"] == 0 and out.exists():
            result["file_ratio"] = round(_files_bytes(out) / weights, 4)
            outputs[name] = out
        results["jobs"][name] = result
        log.info("%s: %s", name, result)

    if "fuse" in jobs:
        job("onnxopt fuse", _optimize(source, work / "fused" / "model.onnx", "fuse"), work / "fused" / "model.onnx")
        slim = work / "onnxslim" / "model.onnx"
        slim.parent.mkdir()
        job("onnxslim", [sys.executable, "-c", _ONNXSLIM, str(source), str(slim)], slim)
    if "check" in jobs and "onnxopt fuse" in outputs:
        check = [sys.executable, "-m", "onnxopt", "check", str(source), str(outputs["onnxopt fuse"])]
        check += ["--shape", "input_ids:1x16", "--int-range", f"input_ids:0:{spec.vocab - 1}", "--iterations", "2"]
        job("onnxopt check", [*check, "--levels", "disabled"])
    if "int4" in jobs and _preset_exists("int4"):
        ours = work / "int4" / "model.onnx"  # the preset's default: RTN without calibration data
        job("onnxopt int4", _optimize(source, ours, "int4"), ours)
        if "int4-lm4" in jobs:  # the output projection at 4 bits too (its 8 bits alone are 0.030x of the file)
            lm4 = work / "int4-lm4" / "model.onnx"
            job("onnxopt int4 lm_head_bits=4", [*_optimize(source, lm4, "int4"), "--param", "lm_head_bits=4"], lm4)
        theirs = work / "ort-rtn" / "model.onnx"
        theirs.parent.mkdir()
        job("MatMulNBitsQuantizer RTN", [sys.executable, "-c", _ORT_RTN, str(source), str(theirs)], theirs)
    if "latency" in jobs:
        results["latency"] = _latency(source, outputs, spec.vocab)
        results["logits_cosine"] = _agreement(source, outputs, spec.vocab)
    results["machine"] = machine()
    target = REPO / "benchmarks" / "results" / f"large-{model_name}.json"
    if target.is_file():  # jobs run on their own (e.g. --jobs int4) keep the other jobs' figures
        previous = json.loads(target.read_text())
        results["jobs"] = {**previous.get("jobs", {}), **results["jobs"]}
        for key in ("latency", "logits_cosine"):
            if key in previous and key not in results:
                results[key] = previous[key]
    target.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _latency(source: Path, outputs: dict[str, Path], vocab: int) -> dict[str, Any]:
    """Interleaved single-token and prefill latency of every output, as ratios to fp32."""
    names = ["fp32", *[n for n in outputs if n != "onnxslim"]]
    paths = [source, *[outputs[n] for n in names[1:]]]
    latency: dict[str, Any] = {}
    for label, length in (("decode [1,1]", 1), ("prefill [1,64]", 64)):
        feed = llama_inputs(length, vocab)
        medians = interleaved_latency(paths, feed, threads=1, rounds=10 if length == 1 else 5, warmup=2)
        latency[label] = {
            n: {"ms": round(m * 1e3, 2), "ratio": round(m / medians[0], 3)} for n, m in zip(names, medians, strict=True)
        }
    return latency


def _agreement(source: Path, outputs: dict[str, Path], vocab: int) -> dict[str, float]:
    """Return the cosine of each output's logits to the fp32 model's on one 16-token prompt."""
    import numpy as np

    from benchmarks.common import session

    feed = llama_inputs(16, vocab, seed=1)
    reference = session(source).run(None, feed)[0].ravel().astype(np.float64)
    cosines = {}
    for name, path in outputs.items():
        logits = session(path).run(None, feed)[0].ravel().astype(np.float64)
        cosines[name] = round(float(logits @ reference / np.linalg.norm(logits) / np.linalg.norm(reference)), 4)
    return cosines


def format_table(results: dict[str, Any]) -> str:
    """Return the jobs as a markdown table."""
    gb = results["fp32_bytes"] / 1e9
    lines = [
        f"Model: Llama-style decoder `{results['model']}`, {gb:.2f} GB of fp32 weights in external data.",
        "",
        "| job | exit | time s | peak RSS GB | RSS / weights | file / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["jobs"].items():
        ratio = r.get("file_ratio", "")
        rss = r["peak_rss"] / 1e9
        per = r["rss_per_weights"]
        lines.append(f"| {name} | {r['exit']} | {r['seconds']:.1f} | {rss:.2f} | {per:.2f} | {ratio} |")
    for label, rows in results.get("latency", {}).items():
        cells = ", ".join(f"{n} {v['ms']} ms ({v['ratio']}×)" for n, v in rows.items())
        lines.append(f"\nLatency {label}, interleaved, one thread: {cells}")
    if results.get("logits_cosine"):
        cells = ", ".join(f"{n} {c}" for n, c in results["logits_cosine"].items())
        lines.append(f"\nLogits cosine to fp32 (16-token prompt, random weights): {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the chosen jobs and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large")
    parser.add_argument("--model", default="large", choices=sorted(LLAMA_CONFIGS))
    parser.add_argument("--jobs", default="fuse,check,int4,latency")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(args.model, tuple(args.jobs.split(",")))
    sys.stdout.write(format_table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
