"""The end-of-run summary reads in words and fits 80 columns (#17)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from onnxopt.display import render_pipeline
from onnxopt.pipeline import PassRecord, PipelineResult, load_recipe
from onnxopt.summary import describe_changes, grouped_notes, pass_summaries

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_stat_keys_read_as_words_and_measurements_are_left_out():
    text = describe_changes({"conv_batchnorm_folded": 3, "removed": 15, "calibration_seconds": 0.1, "merged": 0})
    assert text == "folded 3 conv batchnorm, removed 15"


def _fused():
    return load_recipe("fuse").build().run(str(EXAMPLES / "digits.onnx"))


def test_a_pass_run_in_several_rounds_is_one_row_with_its_own_node_change():
    rows = {row.name: row for row in pass_summaries(_fused())}
    assert set(rows) == {"fold_batchnorm", "eliminate_dead_code"}
    assert rows["fold_batchnorm"].runs == 2
    assert rows["fold_batchnorm"].nodes_added == -3
    assert rows["fold_batchnorm"].changes == "folded 3 conv batchnorm"


def test_notes_that_differ_only_in_names_are_grouped_with_a_count():
    result = _fused()
    stats = result.initial
    notes = ["kept Identity 'a' is a graph output", "kept Identity 'b' is a graph output", "same"]
    result.records.append(PassRecord("p", 1, 0.0, False, stats, stats, {}, notes))
    result.records.append(PassRecord("p", 2, 0.0, False, stats, stats, {}, ["same"]))
    grouped = [g for g in grouped_notes(result) if g.startswith("p:")]
    assert grouped == ["p: kept Identity 'a' is a graph output (and 1 more like it)", "p: same (×2)"]


def test_the_summary_fits_80_columns():
    buffer = io.StringIO()
    render_pipeline(Console(file=buffer, width=80), _fused(), source_opset=13)
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = buffer.getvalue()
    assert "opset" in text and "BatchNormalization" in text and "folded 3 conv batchnorm" in text
    assert "…" not in text  # no cell cut short


def test_empty_result_renders():
    result = _fused()
    empty = PipelineResult(result.model, [], 1, True, result.initial, result.final)
    render_pipeline(Console(file=io.StringIO(), width=80), empty)
