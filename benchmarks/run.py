"""Run every benchmark in one go and regenerate ``benchmarks/RESULTS.md`` and the charts.

``python -m benchmarks`` (or ``python benchmarks/run.py``): for each preset, onnxopt and
the tool users would otherwise pick, on the same real models and inputs, in one run.
``--quick`` runs fuse and int8 on the digits example only (the smoke test); ``--only
fuse,int8`` picks presets. Raw rows land in ``benchmarks/results/<preset>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.common import REPO, machine
from benchmarks.readme import update_readme

__all__ = ["PRESETS", "Preset", "main", "write_results"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    """One benchmark: how to run it (full or quick) and what it compares."""

    name: str
    title: str
    competitor: str
    run: Callable[[bool], list[dict[str, Any]]]


def _fuse(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import fuse

    models = (
        ["digits"]
        if quick
        else [
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
    )
    return fuse.run(models)


def _int8(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import quantize

    rows = quantize.run(["digits"] if quick else ["ppocr_det", "ppocr_cls", "encoder"], threads=1)
    if not quick:  # calibration's own memory (not the process's) at 32, 256 and 1024 samples
        from benchmarks import calibration_memory

        rows += calibration_memory.run()
    return rows


def _prune(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import prune

    if quick:  # its search needs a model with a task metric and several layers worth pruning
        return [{"model": "-", "method": "-", "note": "no quick mode: run without --quick"}]
    return prune.run(("ppocr_cls", "ppocr_det", "encoder"))


def _prune_channels(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import prune_channels

    if quick:  # needs PP-OCR det: a model with channel groups worth removing and a task metric
        return [{"model": "-", "method": "-", "note": "no quick mode: run without --quick"}]
    return [*prune_channels.run(), prune_channels.pass_row()]  # the searched rows, then what the preset gives


def _lowrank(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import lowrank

    if quick:  # the digits model has no MatMul/Gemm large enough to split
        return [{"model": "-", "method": "-", "note": "no quick mode: run without --quick"}]
    return lowrank.run(("encoder", "ppocr_cls"))


def _harness(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import harness

    return harness.run(["ppocr_cls"], repeats=1, samples={"ppocr_cls": 8}, int8=False) if quick else harness.run()


def _gate(quick: bool) -> list[dict[str, Any]]:
    from benchmarks import gate

    if quick:
        return [{"model": "-", "candidate": "-", "note": "no quick mode: run without --quick"}]
    return gate.run(list(gate.MODELS), calibration=32, held_out=64)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("fuse", "Exact clean-up and fusion", "onnxslim", _fuse),
        Preset("int8", "Static int8 quantization", "onnxruntime.quantization.quantize_static", _int8),
        Preset("prune", "Pruning", "uniform per-layer L1 magnitude pruning", _prune),
        Preset(
            "prune_channels", "Structured channel pruning", "uniform L1 filter pruning without re-fit", _prune_channels
        ),
        Preset("lowrank", "Low-rank splitting", "plain truncated SVD at a uniform rank fraction", _lowrank),
        Preset("harness", "Equivalence check", "polygraphy run --onnxrt", _harness),
        Preset(
            "gate",
            "The int8 gate's inferred task metrics vs task agreement (document models)",
            "whole-tensor cosine/SQNR floors",
            _gate,
        ),
    ]
}


#: What each row of the lossy benchmarks is (method name prefix -> kind). A "ceiling" chose
#: its sparsity or ranks by bisection on the very held-out set it reports agreement on: it
#: shows what the method could reach, it is not what a user gets and is never quoted as a
#: result. A "preset" row is the pass as the CLI runs it (default budget), judged on inputs
#: it never saw: the figure the README quotes.
KINDS = (
    ("preset", "preset (CLI defaults, unseen inputs)"),
    ("pass, default budget", "pass alone, default budget, unseen inputs"),
    ("ours-default", "pass alone, default budget, unseen inputs"),
    ("ours (pass, task budget)", "pass with a task budget (API), unseen inputs"),
    ("ours", "ceiling: searched on the held-out set it reports"),
    ("uniform per-layer L1", "alternative's ceiling: searched on the held-out set"),
    ("plain SVD", "alternative's ceiling: searched on the held-out set"),
)
_LABELLED = ("prune", "lowrank")


def with_kind(preset: str, row: dict[str, Any]) -> dict[str, Any]:
    """Return ``row`` with its ``kind`` (see :data:`KINDS`) first, for the presets whose rows mix kinds."""
    method = str(row.get("method", ""))
    kind = next((k for prefix, k in KINDS if method.startswith(prefix)), None)
    if preset not in _LABELLED or kind is None:
        return row
    return {"model": row.get("model"), "method": method, "kind": kind, **row}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:80]
    return str(value).replace("|", "\\|").replace("\n", " ")[:120]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render rows (dicts) as a Markdown table; columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def chart_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """Return (label, latency ratio, agreement, size ratio) for rows that carry all three."""
    points = []
    for row in rows:
        row = {**row}
        if "latency_ratio" not in row and row.get("latency_ms_before") and row.get("latency_ms_after"):
            row["latency_ratio"] = row["latency_ms_after"] / row["latency_ms_before"]
        if "size_ratio" not in row and row.get("bytes_dense"):
            row["size_ratio"] = row.get("bytes_sparse_storage", row["bytes_dense"]) / row["bytes_dense"]
        if "size_ratio" not in row and row.get("matmul_params"):
            row["size_ratio"] = 1 - row.get("params_saved", 0) / row["matmul_params"]
        values = [row.get(k) for k in ("latency_ratio", "agreement", "size_ratio")]
        if row.get("method") in ("float", "original"):  # the reference sits at (1, 1) by definition
            continue
        if all(isinstance(v, (int, float)) for v in values):
            ratio, agreement, size = (float(v) for v in values)  # type: ignore[arg-type]
            label = f"{row.get('model', '?')} {row.get('method', row.get('variant', ''))}".strip()
            if str(row.get("kind", "")).startswith(("ceiling", "alternative's ceiling")):
                label = f"[ceiling] {label}"
            points.append((label, ratio, agreement, size))
    return points


def write_chart(preset: Preset, rows: list[dict[str, Any]], path: Path) -> bool:
    """Plot agreement against latency ratio (marker area = file size ratio); False if nothing to plot."""
    points = chart_points(rows)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for number, (label, ratio, agreement, size) in enumerate(points, start=1):
        ours = any(word in label for word in ("onnxopt", "ours", "pass"))
        ceiling = "ceiling" in label
        # numbered markers with the labels in a legend: inline labels of nearby points overlapped
        ax.scatter(
            ratio,
            agreement,
            s=40 + 400 * size,
            alpha=0.6,
            color="tab:blue" if ours else "tab:orange",
            marker="^" if ceiling else "o",
            label=f"{number}. {label[:70]}",
        )
        ax.annotate(str(number), (ratio, agreement), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5, markerscale=0.4, frameon=False)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.99, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("latency ratio to the float model (lower is faster)")
    ax.set_ylabel("task agreement with the float model")
    ax.set_title(
        f"{preset.title}: onnxopt (blue) vs {preset.competitor} (orange)\n"
        "marker area ~ file size ratio; triangles: ceilings searched on the held-out set (not results); "
        "the float model is at (1, 1)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(runs: dict[str, dict[str, Any]], target: Path) -> Path:
    """Write RESULTS.md (machine, versions, date, one table and chart per preset).

    ``runs`` maps a preset to its saved run: ``rows``, ``seconds``, ``date``, ``command``.
    """
    info = machine()
    lines = [
        "# Benchmark results",
        "",
        "Regenerated by `python -m benchmarks` from the raw rows in `benchmarks/results/`; each section says "
        "which command and date produced it. Do not edit by hand.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['platform']}.",
        f"Versions: Python {info['python']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']}, "
        f"numpy {info['numpy']}.",
        "Latency: onnxruntime CPU, 1 intra-op thread, runs of the compared models interleaved, median.",
        "",
        "In the pruning and low-rank tables, `kind` says what a row is: a *preset* row is the pass as the CLI "
        "runs it (default budget) judged on inputs it never saw, the figure the README quotes; a *ceiling* "
        "chose its sparsity or ranks by bisection on the held-out set it reports agreement on, so it bounds "
        "what the method could reach and is not a result (triangles in the charts).",
        "",
    ]
    for name, saved in runs.items():
        preset, rows = PRESETS[name], [with_kind(name, row) for row in saved["rows"]]
        lines += [
            f"## {preset.title} (`{name}`) vs {preset.competitor}",
            "",
            f"`{saved['command']}` on {saved['date']}"
            + ("." if math.isnan(saved["seconds"]) else f", {saved['seconds']:.0f} s."),
            "",
        ]
        if saved.get("remeasured"):  # rows replaced later by a partial run (benchmarks.common.merge_saved_rows)
            lines += ["Rows re-measured since by " + "; ".join(f"`{c}`" for c in saved["remeasured"]) + ".", ""]
        chart = target.parent / "charts" / f"{name}.png"
        if write_chart(preset, rows, chart):
            lines += [f"![{name}](charts/{name}.png)", ""]
        lines += [markdown_table(rows), ""]
    target.write_text("\n".join(lines))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits example only (smoke test)")
    parser.add_argument("--only", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md, charts/ and results/")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    console = Console(stderr=True)
    raw = args.out / "results"
    raw.mkdir(parents=True, exist_ok=True)
    command = (
        "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only != ",".join(PRESETS) else "")
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("benchmarks", total=len(chosen))
        for name in chosen:
            progress.update(task, description=f"benchmark: {name}")
            started = time.perf_counter()
            rows = PRESETS[name].run(args.quick)
            saved = {
                "preset": name,
                "command": command,
                "date": datetime.date.today().isoformat(),
                "seconds": time.perf_counter() - started,
                "rows": rows,
            }
            (raw / f"{name}.json").write_text(json.dumps(saved, indent=1, default=str))
            progress.advance(task)
    # Presets not run this time keep their last saved rows, each labelled with its own command and date.
    runs = {name: _saved_run(raw / f"{name}.json", name) for name in PRESETS if (raw / f"{name}.json").exists()}
    target = write_results(runs, args.out / "RESULTS.md")
    console.print(f"wrote {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
    if args.out == HERE and update_readme(REPO / "README.md", raw):  # the README's table follows the saved rows
        console.print("updated the Measured table in README.md")
    return 0


def _saved_run(path: Path, name: str) -> dict[str, Any]:
    """Return a saved run; a benchmark run on its own (``python -m benchmarks.NAME``) saves bare rows."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        date = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
        return {
            "preset": name,
            "command": f"python -m benchmarks.{name}",
            "date": date,
            "seconds": float("nan"),
            "rows": data,
        }
    return data


if __name__ == "__main__":
    raise SystemExit(main())
