"""What the int8 pass says about nodes it keeps float, and one placement rule that needs the ranges.

The notes must be true of the file written: when the pass returns its float input, an opset
upgrade it made for the int8 model is not in that file, so its note is rewritten.
"""

from __future__ import annotations

import re

import onnx
from onnxopt.passes.common.graphs import opset_version
from onnxopt.passes.quantize.placement import Placement

__all__ = ["float_model_notes", "kept_float_notes", "mixed_range_concats"]


def mixed_range_concats(placement: Placement, ranges: dict[str, tuple[float, float]], ratio: float) -> dict[str, str]:
    """Return Concat nodes whose inputs' ranges differ by more than ``ratio`` (name → reason)."""
    reasons = {}
    for name, node in placement.nodes.items():
        if node.op_type != "Concat":
            continue
        widths = [ranges[t][1] - ranges[t][0] for t in node.input if t in ranges]
        if len(widths) >= 2 and min(widths) >= 0 and max(widths) > ratio * max(min(widths), 1e-12):
            reasons[name] = (
                f"its inputs mix very different ranges (widths {min(widths):.3g} to {max(widths):.3g}); "
                "one int8 scale cannot serve both"
            )
    return reasons


def float_model_notes(notes: list[str], model: onnx.ModelProto) -> list[str]:
    """Return ``notes`` true of the float model the pass returns: opset upgrades were not kept."""
    version = opset_version(model)
    kept = []
    for note in notes:
        match = re.match(r"upgraded the model from opset (\d+) to (\d+) \((.*) needs it\)$", note)
        if match:
            note = (
                f"the int8 model needed opset {match.group(2)} ({match.group(3)}); the float model written keeps "
                f"opset {version}"
            )
        kept.append(note)
    return kept


def kept_float_notes(float_reasons: dict[str, str]) -> list[str]:
    """Return one note per reason a node stayed float, most frequent first, naming a few nodes."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in float_reasons.items():
        by_reason.setdefault(reason, []).append(name)
    notes = []
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"kept float ({len(names)}): {reason}: {shown}")
    return notes
