"""Terminal rendering of reports with ``rich`` (used by the CLI only)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt.describe import ModelDescription
from onnxopt.harness import LayerComparison, Report
from onnxopt.pipeline import PipelineResult, Stage

__all__ = ["render_check", "render_description", "render_layers", "render_passes", "render_pipeline"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def render_pipeline(
    console: Console, result: PipelineResult, output_bytes: int | None = None, source_opset: int | None = None
) -> None:
    """Print the before/after figures, one row per pass that changed something, then the notes (grouped)."""
    from onnxopt.summary import grouped_notes, op_changes, pass_summaries

    start, final = result.source or result.initial, result.final
    output_opset = next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), None)
    figures = Table(title="onnxopt optimize", title_justify="left")
    for column in ("", "input", "output"):
        figures.add_column(column, justify="left" if not column else "right")
    figures.add_row("nodes", f"{start.nodes:,}", f"{final.nodes:,}")
    figures.add_row("parameters", f"{start.params:,}", f"{final.params:,}")
    figures.add_row("size", _size(start.bytes), _size(output_bytes if output_bytes is not None else final.bytes))
    if source_opset is not None:
        figures.add_row("opset", str(source_opset), str(output_opset))
    for op, before, after in op_changes(start, final):
        figures.add_row(f"  {escape(op)}", str(before), str(after))
    console.print(figures)
    passes = Table(title=f"passes ({result.rounds} round(s), {sum(r.seconds for r in result.records):.2f}s)")
    passes.add_column("pass", no_wrap=True)
    passes.add_column("time", justify="right", no_wrap=True)
    passes.add_column("nodes", no_wrap=True)
    passes.add_column("what it changed", overflow="fold")
    for row in pass_summaries(result):
        text = f"{row.status}: {row.changes}" if row.status else row.changes
        runs = f" ×{row.runs}" if row.runs > 1 else ""
        passes.add_row(escape(row.name) + runs, f"{row.seconds:.2f}s", f"{row.nodes_added:+,}", escape(text))
    console.print(passes)
    for note in grouped_notes(result):
        console.print(f"  [dim]note[/dim] {escape(note)}", highlight=False)


def render_check(console: Console, report: Report) -> None:
    """Print the per-output comparison table of every level, then the verdict."""
    for level in report.levels:
        table = Table(title=f"{report.profile} profile, candidate at onnxruntime level '{level.level}'")
        for column in (
            "output",
            "max abs",
            "mean abs",
            "max rel",
            "cosine",
            "SQNR dB",
            "top-1",
            "min atol",
            "min rtol",
            "verdict",
        ):
            table.add_column(column)
        for out in level.outputs:
            verdict = "[green]pass" if out.passed else "[red]FAIL"
            table.add_row(
                escape(out.name),
                _num(out.max_abs),
                _num(out.mean_abs),
                _num(out.max_rel),
                _num(out.cosine, ".6f"),
                _num(out.sqnr_db, ".1f"),
                _num(out.top1, ".4f"),
                _num(out.min_atol),
                _num(out.min_rtol),
                verdict,
            )
        console.print(table)
        if level.metrics:
            render_metrics(console, report, level.metrics)
        for problem in level.problems:
            console.print(f"[red]  {escape(problem)}", highlight=False)
    for line in report.failures():
        console.print(f"[red]  {escape(line)}", highlight=False)
    for note in report.notes:
        console.print(f"  [dim]note[/dim] {escape(note)}", highlight=False)
    if report.layers is not None:
        render_layers(console, report.layers)
    verdict = "[green bold]PASS" if report.passed else "[red bold]FAIL"
    console.print(f"{verdict}[/] {escape(report.candidate)} vs {escape(report.reference)} ({report.samples} samples)")


def render_metrics(console: Console, report: Report, results: list[Any]) -> None:
    """Print the judge's verdict per output and metric, with the interval and why the metric judges it."""
    table = Table(title="task metrics (the judge)")
    for column in ("output", "metric", "value", "95 % interval", "floor", "items", "verdict", "why"):
        table.add_column(column)
    for r in results:
        verdict = "[green]pass" if r.passed else "[red]FAIL"
        if not r.resolved:
            verdict += f" [yellow](unresolved; ~{r.needed} items)" if r.needed else " [yellow](unresolved)"
        table.add_row(
            escape(r.output),
            escape(r.metric),
            _num(r.value, ".4f"),
            f"{_num(r.low, '.4f')}–{_num(r.high, '.4f')}",
            _num(r.floor),
            str(r.items) + (f" ({r.near_ties} near-ties)" if r.near_ties else ""),
            verdict,
            escape(r.reason),
        )
    console.print(table)


def render_layers(console: Console, layers: list[LayerComparison], limit: int = 25) -> None:
    """Print where the error between the two models first grows."""
    first_bad = next((i for i, x in enumerate(layers) if not x.passed), None)
    table = Table(title="layer-wise comparison (reference order)")
    for column in ("tensor", "op", "matched by", "max abs", "cosine", "SQNR dB", ""):
        table.add_column(column)
    start = max(0, (first_bad or 0) - 3)
    for i, row in enumerate(layers[start : start + limit], start=start):
        mark = "[red]← first out of tolerance" if i == first_bad else ("" if row.passed else "[red]x")
        table.add_row(
            escape(row.reference),
            row.op_type,
            row.matched_by,
            _num(row.max_abs),
            _num(row.cosine, ".6f"),
            _num(row.sqnr_db, ".1f"),
            mark,
        )
    console.print(table)
    if first_bad is None:
        console.print(f"  all {len(layers)} matched tensors within tolerance")
    else:
        console.print(
            f"  error first exceeds tolerance at {layers[first_bad].reference!r} "
            f"({layers[first_bad].op_type}), tensor {first_bad + 1} of {len(layers)}"
        )


def render_description(console: Console, d: ModelDescription) -> None:
    """Print what ``onnxopt inspect`` found."""
    console.print(f"[bold]{d.path}[/]  IR {d.ir_version}  producer: {d.producer or '-'}")
    console.print("opsets: " + ", ".join(f"{k} {v}" for k, v in d.opsets.items()))
    for label, items in (("inputs", d.inputs), ("outputs", d.outputs)):
        console.print(f"{label}:")
        for item in items:
            console.print(f"  {escape(item)}", highlight=False)
    sub = ", ".join(f"{k} ×{v}" for k, v in d.subgraphs.items()) or "none"
    console.print(f"nodes: {d.nodes} (subgraphs included); nodes with subgraphs: {sub}")
    console.print(
        f"parameters: {d.params:,}  " + ", ".join(f"{k}: {_size(v)}" for k, v in d.param_bytes_by_dtype.items())
    )
    w = d.weights
    console.print(
        f"weights: {w['initializers']} initializers, {w['constant_nodes']} Constant nodes "
        f"({w['params_in_constant_nodes']:,} params), {w['external_tensors']} external tensors "
        f"({_size(w['external_bytes'])}{' in ' + ', '.join(d.external_files) if d.external_files else ''})"
    )
    if d.functions:
        console.print("functions: " + ", ".join(d.functions))
    if d.file_bytes is not None:
        console.print(f"file size: {_size(d.file_bytes)}")
    table = Table(title="op histogram")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in d.ops.items():
        table.add_row(escape(op), str(count))
    console.print(table)


def render_passes(console: Console, passes: dict[str, Any], presets: dict[str, tuple[str, list[Stage]]]) -> None:
    """Print the registered passes with their parameters, then the presets."""
    table = Table(title="passes")
    for column in ("name", "kind", "parameters (defaults)", "what it does"):
        table.add_column(column)
    for name, (exact, params, doc) in passes.items():
        table.add_row(name, "exact" if exact else "lossy", ", ".join(f"{k}={v!r}" for k, v in params.items()), doc)
    console.print(table)
    table = Table(title="presets (--pipeline NAME)")
    table.add_column("name")
    table.add_column("stages")
    table.add_column("what it does")
    for name, (description, stages) in presets.items():
        shown = " ; ".join(
            ("fixed point: " if stage.fixed_point else "") + " → ".join(n for n, _ in stage.passes) for stage in stages
        )
        table.add_row(name, shown, description)
    console.print(table)
