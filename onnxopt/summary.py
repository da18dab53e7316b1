"""What an optimize run changed, in words: before/after figures, one line per pass, grouped notes.

Pure functions of a :class:`~onnxopt.pipeline.PipelineResult`; ``display.py`` renders them.
A pass run several times (a fixed-point stage) is one row with its counts summed; a
note repeated across rounds or layers is shown once with a count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from onnxopt.model import ModelStats
from onnxopt.pipeline import PipelineResult

__all__ = ["PassSummary", "describe_changes", "grouped_notes", "op_changes", "pass_summaries"]

#: stat-key endings that are verbs: ``conv_batchnorm_folded=3`` reads "folded 3 conv batchnorm"
_VERBS = ("folded", "fused", "removed", "quantized", "pruned", "split", "lifted", "merged", "simplified", "eliminated")
#: stat keys that are measurements, not changes (shown in the JSON report only)
_MEASURES = re.compile(r"(seconds|bytes|_ms|latency|samples|target_met|peak|ratio|error|cosine|sqnr)")


@dataclass(frozen=True)
class PassSummary:
    """One pass over the whole run: runs, time, the nodes its own runs added or removed, what it changed."""

    name: str
    runs: int
    seconds: float
    nodes_added: int  # over the pass's own runs (negative: removed)
    changes: str
    status: str | None = None


def describe_changes(stats: Mapping[str, int | float]) -> str:
    """Return a pass's counts in words (``{"conv_batchnorm_folded": 3}`` → ``folded 3 conv batchnorm``)."""
    words = []
    for key, value in stats.items():
        if _MEASURES.search(key) or not value:
            continue
        count = f"{value:g}" if isinstance(value, float) else f"{value:,}"
        parts = key.split("_")
        if parts[-1] in _VERBS:
            thing = " ".join(parts[:-1])
            words.append(f"{parts[-1]} {count}" + (f" {thing}" if thing else ""))
        else:
            words.append(f"{' '.join(parts)} {count}")
    return ", ".join(words)


def pass_summaries(result: PipelineResult) -> list[PassSummary]:
    """Return one summary per pass that changed the model or is lossy, in the order passes first ran."""
    order: list[str] = []
    by_name: dict[str, list] = {}
    for record in result.records:
        if record.name not in by_name:
            order.append(record.name)
            by_name[record.name] = []
        by_name[record.name].append(record)
    outcomes = {r.name: r for r in result.outcomes()}
    rows = []
    for name in order:
        records = by_name[name]
        changed = [r for r in records if r.changed]
        if not changed and name not in outcomes:
            continue
        totals: dict[str, int | float] = {}
        for record in changed:
            for key, value in record.stats.items():
                if isinstance(value, int | float):
                    totals[key] = totals.get(key, 0) + value
        outcome = outcomes.get(name)
        text = describe_changes(totals) if outcome is None else (outcome.reason or "")
        rows.append(
            PassSummary(
                name,
                len(records),
                sum(r.seconds for r in records),
                sum(r.after.nodes - r.before.nodes for r in changed),
                text,
                outcome.status if outcome is not None else None,
            )
        )
    return rows


def grouped_notes(result: PipelineResult) -> list[str]:
    """Return every note once, prefixed by its pass; repeats and notes that differ only in names are counted.

    ``kept Identity 'a' ...`` and ``kept Identity 'b' ...`` are one line (the first) with
    "and 1 more like it"; the same note from several rounds is one line with ``(×N)``.
    """
    groups: dict[str, list[str]] = {}
    for record in result.records:
        for note in record.notes:
            text = f"{record.name}: {note}"
            groups.setdefault(re.sub(r"'[^']*'", "'…'", text), []).append(text)
    for note in result.notes:
        groups.setdefault(re.sub(r"'[^']*'", "'…'", note), []).append(note)
    lines = []
    for members in groups.values():
        distinct = list(dict.fromkeys(members))
        line = distinct[0]
        if len(members) > len(distinct) and len(distinct) == 1:
            line += f" (×{len(members)})"
        elif len(distinct) > 1:
            line += f" (and {len(distinct) - 1} more like it)"
        lines.append(line)
    return lines


def op_changes(before: ModelStats, after: ModelStats, limit: int = 8) -> list[tuple[str, int, int]]:
    """Return (op type, count before, count after) for the op types whose count changed most."""
    ops = set(before.ops) | set(after.ops)
    changed = [(op, before.ops.get(op, 0), after.ops.get(op, 0)) for op in ops]
    changed = [row for row in changed if row[1] != row[2]]
    changed.sort(key=lambda row: (-abs(row[2] - row[1]), row[0]))
    return changed[:limit]
