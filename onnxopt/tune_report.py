"""What ``onnxopt tune`` writes: the table, the JSON report with the winning recipe, the Pareto chart.

The table fits 80 columns (one line per candidate, its reason on the next line). The
JSON holds every row, the winning recipe as TOML and the command that replays it; the
winning recipe and the calibration part it was built from are written next to the
output, so ``onnxopt optimize MODEL --pipeline OUT.recipe.toml --calib OUT.calib``
reproduces the chosen model. The chart (agreement against latency ratio, marker area
proportional to file size) needs matplotlib and is skipped without it.
"""

from __future__ import annotations

import math
import platform
import shutil
from pathlib import Path
from typing import Any

from onnxopt.tune import CandidateResult, TuneResult, save_samples

__all__ = ["pareto_front", "replay_files", "report_dict", "table_lines", "write_chart"]

WIDTH = 80


def _agreement(row: CandidateResult) -> str:
    j = row.judgement
    if j is None or math.isnan(j.agreement):
        return "—" if row.status != "baseline" else "1 (itself)"
    return f"{j.agreement:.4f} [{j.low:.3f},{j.high:.3f}]"


def _latency(row: CandidateResult) -> str:
    if row.latency is None:
        return "—"
    return f"{row.latency.ratio:.2f}±{row.latency.noise:.2f}"


def table_lines(result: TuneResult) -> list[str]:
    """Return the candidate table as lines of at most 80 characters."""
    header = f"{'candidate':<23} {'status':<8} {'agreement [95% CI]':<20} {'latency':<9} {'size':>5} {'MB':>4} {'s':>4}"
    lines = [header, "-" * len(header)]
    for row in result.candidates:
        size = "—" if math.isnan(row.size_ratio) else f"{row.size_ratio:.2f}"
        memory = f"{row.peak_memory_bytes / 2**20:.0f}" if row.peak_memory_bytes else "—"
        seconds = f"{row.seconds:.0f}" if row.seconds else "—"
        lines.append(
            f"{row.name[:23]:<23} {row.status[:8]:<8} {_agreement(row)[:20]:<20} {_latency(row):<9} "
            f"{size:>5} {memory:>4} {seconds:>4}"
        )
        why = row.reason or (row.judgement.summary if row.judgement and not row.judgement.passed else "")
        if why:
            lines.append("  └ " + why)
    lines.append(
        f"chosen: {result.winner.name}, in {result.elapsed_seconds / 60:.1f} of {result.budget_seconds / 60:g} min"
    )
    lines.append("latency: ratio to the float model in interleaved rounds, median ± IQR/2;")
    lines.append("size: file size ratio; MB: peak RSS running it; s: build and judge time")
    return [line if len(line) <= WIDTH else line[: WIDTH - 1] + "…" for line in lines]


def pareto_front(rows: list[CandidateResult]) -> list[CandidateResult]:
    """Return the measured rows no other measured row beats on both agreement and latency."""
    measured = [r for r in rows if r.latency is not None and (r.judgement is not None or r.status == "baseline")]

    def agreement(row: CandidateResult) -> float:
        return 1.0 if row.judgement is None else row.judgement.agreement

    front = []
    for row in measured:
        assert row.latency is not None
        dominated = any(
            o is not row
            and o.latency is not None
            and o.latency.ratio <= row.latency.ratio
            and agreement(o) >= agreement(row)
            and (o.latency.ratio < row.latency.ratio or agreement(o) > agreement(row))
            for o in measured
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r.latency.ratio if r.latency else 0.0)


def write_chart(result: TuneResult, path: str | Path, title: str = "") -> Path | None:
    """Write the Pareto chart as PNG; return its path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result.candidates if r.latency is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    front = {id(r) for r in pareto_front(list(result.candidates))}
    for index, row in enumerate(rows):
        assert row.latency is not None
        agreement = 1.0 if row.judgement is None else row.judgement.agreement
        passed = row.status in ("baseline", "accepted", "chosen")
        colour = "tab:green" if row.status == "chosen" else ("tab:blue" if passed else "tab:grey")
        axes.scatter(row.latency.ratio, agreement, s=40 + 400 * row.size_ratio, c=colour, alpha=0.6, edgecolors="k")
        label = row.name + (" (Pareto)" if id(row) in front else "")
        offset = (4, 4 + 9 * (index % 3))  # stagger labels of neighbouring points
        axes.annotate(label, (row.latency.ratio, agreement), fontsize=7, xytext=offset, textcoords="offset points")
    axes.set_xlabel("latency / float model (interleaved median)")
    axes.set_ylabel("agreement with the float model\n(each candidate's weakest task metric)")
    axes.set_title(title or f"onnxopt tune: chose {result.winner.name}; marker area ∝ file size")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def replay_files(result: TuneResult, output: str | Path) -> tuple[Path, Path] | None:
    """Write the winning recipe (``OUT.recipe.toml``) and its calibration samples (``OUT.calib/``) next to ``output``.

    Returns None, writing nothing, when the float model as given won (there is no recipe).
    """
    if not result.winner.recipe:
        return None
    out = Path(output)
    recipe = out.with_name(out.stem + ".recipe.toml")
    calib = out.with_name(out.stem + ".calib")
    recipe.write_text(result.winner.recipe)
    if calib.exists():
        shutil.rmtree(calib)
    save_samples(result.calibration, calib)
    return recipe, calib


def report_dict(result: TuneResult, *, model: str, output: str | None = None) -> dict[str, Any]:
    """Return the JSON report: every candidate, the winner, its recipe and the replay command."""
    replay = None
    if output is not None and result.winner.recipe:
        stem = Path(output).with_suffix("")
        replay = f"onnxopt optimize {model} -o {output} --pipeline {stem}.recipe.toml --calib {stem}.calib"
    return {
        "model": model,
        "output": output,
        "objective": result.objective,
        "target": result.target,
        "seed": result.seed,
        "budget_seconds": result.budget_seconds,
        "elapsed_seconds": round(result.elapsed_seconds, 1),
        "interrupted": result.interrupted,
        "machine": platform.node(),
        "winner": result.winner.name,
        "winning_recipe": result.winner.recipe,
        "replay": replay,
        "skipped_presets": result.skipped,
        "candidates": [r.to_dict() for r in result.candidates],
        "pareto": [r.name for r in pareto_front(list(result.candidates))],
    }
