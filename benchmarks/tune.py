"""``onnxopt tune`` against every single preset run by hand, on the real models.

For each model (PP-OCR cls, PP-OCR det, the MiniLM encoder when torch can export it):
32 real calibration inputs go to ``onnxopt tune`` (default budget unless ``--budget``)
and to ``onnxopt optimize --pipeline P`` for every registered preset that applies;
then, on 16 other real inputs none of them saw, every model is judged with the task
metric (text-mask IoU for det, top-1 for cls, pooled-embedding cosine for the encoder)
and with tune's own target, and timed in one interleaved run (float, each preset,
tune's choice; median of per-round ratios to the float model). It prints the table and
tune's Pareto chart path for each model, checks tune's choice against the fastest preset
that meets the target and against the float model, and replays the winning recipe with
``optimize --pipeline`` to compare agreement and size.

Run: ``python -m benchmarks.tune [ppocr_cls ppocr_det encoder] [--budget MINUTES]``.
Rows land in ``benchmarks/results/tune.json``, charts in ``benchmarks/charts/tune_<model>.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import inputs as real_inputs
from benchmarks.common import REPO, feeds, model_path
from onnxopt.pipeline import available_presets
from onnxopt.runtime import run_model
from onnxopt.timing import interleaved_times
from onnxopt.tune_judge import judge_candidate

CALIBRATION = 32
TEST = 16
DET_SIZE = (480, 640)
#: tune's target per model (None: the default, the task metrics the judge infers).
TARGETS: dict[str, str | None] = {}
#: Presets that need a MatMul or a Conv to do anything.
NEEDS = {"prune_channels": "Conv", "lowrank": "MatMul", "int8_weights": "MatMul", "int4": "MatMul"}


def _inputs(key: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    if key == "ppocr_det":
        return real_inputs.ppocr_det_inputs(n, size=DET_SIZE, seed=seed)
    return feeds(key, n, seed=seed)


def _cli(*args: str, timeout: float | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxopt", *args], check=True, timeout=timeout, cwd=REPO)
    return time.perf_counter() - started


def _interleaved_ratios(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int = 30) -> dict[str, Any]:
    """Per-round ratio to the float model (first entry), median and IQR/2, all models in one interleaved run."""
    times = dict(
        zip(paths, interleaved_times(list(paths.values()), feed, threads=1, rounds=rounds, warmup=3), strict=True)
    )
    base = times["float"]
    result = {}
    for name, own in times.items():
        ratios = [c / b for c, b in zip(own, base, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        result[name] = {"ratio": statistics.median(ratios), "noise": (q3 - q1) / 2, "ms": statistics.median(own) * 1e3}
    return result


def _applies(preset: str, ops: set[str]) -> bool:
    need = NEEDS.get(preset)
    return need is None or need in ops or (need == "MatMul" and "Gemm" in ops)


def run_model_key(key: str, budget: float | None, folder: Path) -> dict[str, Any]:
    """Tune one model and run every preset by hand; return its rows and checks."""
    model = model_path(key)
    calib = _inputs(key, CALIBRATION, 0)
    calib_file = folder / "calib.npz"
    np.savez(calib_file, **{name: np.stack([f[name] for f in calib]) for name in calib[0]})
    target = TARGETS.get(key)
    target_args = ["--target", target] if target else []
    tuned, report = folder / "tuned.onnx", folder / "tune.json"
    budget_args = ["--budget-minutes", str(budget)] if budget else []
    tune_seconds = _cli(
        "tune", str(model), "--calib", str(calib_file), "-o", str(tuned), "--report", str(report),
        *target_args, *budget_args,
    )  # fmt: skip
    tune_report = json.loads(report.read_text())
    seconds: dict[str, float] = {"tune": tune_seconds}
    errors = _run_presets(model, folder, calib_file, target_args, seconds)
    replayed = folder / "replayed.onnx"
    if tune_report.get("replay"):
        stem = tuned.with_suffix("")
        _cli(
            "optimize", str(model), "-o", str(replayed), "--pipeline", f"{stem}.recipe.toml",
            "--calib", f"{stem}.calib", "-q",
        )  # fmt: skip
    return evaluate(key, folder, seconds, errors)


def _run_presets(
    model: Path, folder: Path, calib_file: Path, target_args: list[str], seconds: dict[str, float]
) -> dict[str, str]:
    """Run every applicable preset by hand (``onnxopt optimize``) into ``folder/<preset>.onnx``."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
    errors: dict[str, str] = {}
    for preset in available_presets():
        if not _applies(preset, ops):
            continue
        out = folder / f"{preset}.onnx"
        args = ["optimize", str(model), "-o", str(out), "--pipeline", preset, "--calib", str(calib_file), "-q"]
        if target_args and preset in ("int8",):
            args += target_args
        try:
            seconds[preset] = _cli(*args, timeout=1800)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            errors[preset] = str(exc)[:200]
    return errors


def evaluate(key: str, folder: Path, seconds: dict[str, float], errors: dict[str, str]) -> dict[str, Any]:
    """Judge and time the float model, every preset built in ``folder`` and tune's choice on unseen inputs."""
    import onnx

    model = model_path(key)
    test = _inputs(key, TEST, 1)
    target = TARGETS.get(key)
    tuned, report = folder / "tuned.onnx", folder / "tune.json"
    tune_report = json.loads(report.read_text())
    chart = REPO / "benchmarks" / "charts" / f"tune_{key}.png"
    if report.with_suffix(".pareto.png").exists():
        shutil.copyfile(report.with_suffix(".pareto.png"), chart)
    paths: dict[str, Path] = {"float": model}
    paths.update({p: folder / f"{p}.onnx" for p in available_presets() if (folder / f"{p}.onnx").exists()})
    paths["tune"] = tuned
    replayed = folder / "replayed.onnx"
    reference = run_model(str(model), test, optimization="default")
    graph = onnx.load(str(model), load_external_data=False)
    latency = _interleaved_ratios(paths, test[0])
    rows = []
    for name, path in paths.items():
        outputs = reference if name == "float" else run_model(str(path), test, optimization="default")
        judged = judge_candidate(reference, outputs, target, model=graph, inputs=test)
        rows.append(
            {
                "method": name if name != "tune" else f"tune → {tune_report['winner']}",
                "task_agreement": real_inputs.task_agreement(key, reference, outputs, test),
                "meets_target": judged.passed,
                "judge": judged.summary,
                "size_ratio": path.stat().st_size / model.stat().st_size,
                **latency[name],
                "seconds": seconds.get(name),
            }
        )
    replay = {}
    if replayed.exists():
        replay_outputs = run_model(str(replayed), test, optimization="default")
        tuned_outputs = run_model(str(tuned), test, optimization="default")
        replay = {
            "identical_bytes": replayed.read_bytes() == tuned.read_bytes(),
            "size_ratio_to_tuned": replayed.stat().st_size / tuned.stat().st_size,
            "task_agreement": real_inputs.task_agreement(key, reference, replay_outputs, test),
            "agreement_with_tuned": real_inputs.task_agreement(key, tuned_outputs, replay_outputs, test),
        }
    presets = [r for r in rows if r["method"] not in ("float",) and not r["method"].startswith("tune")]
    meeting = [r for r in presets if r["meets_target"]]
    best = min(meeting, key=lambda r: r["ratio"]) if meeting else None
    mine = rows[-1]
    checks = {
        "tune_meets_target": mine["meets_target"],
        "best_preset": best["method"] if best else None,
        "at_least_as_fast_as_best_preset_within_noise": (
            best is None or mine["ratio"] <= best["ratio"] + max(best["noise"], mine["noise"])
        ),
        "not_slower_than_float": mine["ratio"] <= 1.0 + mine["noise"],
        "within_budget": tune_report["elapsed_seconds"] <= tune_report["budget_seconds"],
    }
    return {
        "model": key,
        "target": target,
        "budget_seconds": tune_report["budget_seconds"],
        "tune_elapsed_seconds": tune_report["elapsed_seconds"],
        "tune_candidates": tune_report["candidates"],
        "rows": rows,
        "replay": replay,
        "checks": checks,
        "errors": errors,
        "chart": str(chart.relative_to(REPO)) if chart.exists() else None,
    }


def _print(result: dict[str, Any]) -> None:
    print(f"\n== {result['model']} (target {result['target'] or 'default'}; tune took "
          f"{result['tune_elapsed_seconds'] / 60:.1f} of {result['budget_seconds'] / 60:.0f} min)")  # fmt: skip
    print(f"{'method':34s} {'task':>7s} {'target':>6s} {'size':>6s} {'latency':>12s} {'build s':>8s}")
    for r in result["rows"]:
        latency = f"{r['ratio']:.2f}±{r['noise']:.2f}"
        built = f"{r['seconds']:.0f}" if r["seconds"] else "—"
        print(
            f"{r['method'][:34]:34s} {r['task_agreement']:7.4f} {'yes' if r['meets_target'] else 'no':>6s} "
            f"{r['size_ratio']:6.3f} {latency:>12s} {built:>8s}"
        )
    print("checks:", json.dumps(result["checks"]))
    print("replay:", json.dumps(result["replay"]))
    if result["errors"]:
        print("errors:", json.dumps(result["errors"]))
    print("chart:", result["chart"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["ppocr_cls", "ppocr_det", "encoder"])
    parser.add_argument("--budget", type=float, default=None, help="tune's budget in minutes (default: tune's own)")
    parser.add_argument("--evaluate", type=Path, default=None, help="only evaluate a folder a run left (one model)")
    args = parser.parse_args()
    results = []
    for key in args.models:
        if args.evaluate is not None:
            result = evaluate(key, args.evaluate, {}, {})
            _print(result)
            results.append(result)
            _save(results)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result = run_model_key(key, args.budget, Path(tmp))
            except RuntimeError as exc:  # the encoder needs torch to export
                print(f"{key}: skipped ({exc})")
                continue
        _print(result)
        results.append(result)
        _save(results)


def _save(results: list[dict[str, Any]]) -> None:
    out = REPO / "benchmarks" / "results" / "tune.json"
    previous = json.loads(out.read_text()) if out.exists() else []
    kept = [r for r in previous if r.get("model") not in {x["model"] for x in results}]
    out.write_text(json.dumps([*kept, *results], indent=1, default=str))


if __name__ == "__main__":
    main()
