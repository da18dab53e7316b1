"""The benchmark runner works end to end on the tiny digits model (CI does not run the full suite)."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import main, markdown_table


def test_markdown_table_has_every_column():
    table = markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "c": True}])
    assert table.splitlines()[0] == "| a | b | c |"
    assert table.splitlines()[3] == "| 2 |  | yes |"


@pytest.mark.real
def test_runner_quick_writes_results_and_charts(tmp_path):
    pytest.importorskip("onnxslim")
    pytest.importorskip("matplotlib")
    assert main(["--quick", "--only", "fuse,int8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results" / "fuse.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"original", "onnxopt", "onnxslim"}
    assert all(r["exact"] for r in rows)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "onnxruntime" in text and "| digits | onnxopt |" in text
    assert (tmp_path / "charts" / "fuse.png").stat().st_size > 1000
    int8 = json.loads((tmp_path / "results" / "int8.json").read_text())["rows"]
    ours = next(r for r in int8 if r["method"] == "onnxopt")
    assert ours["agreement"] >= 0.99
    # int8 is 0.29x the file; on a loaded machine its 70 us run can measure slower than float,
    # and then the pass keeps float and says why: either way the row is what a user gets
    if ours["size_ratio"] >= 0.5:
        notes = " ".join(ours["notes"]) if isinstance(ours["notes"], list) else str(ours["notes"])
        assert "slower than" in notes and "kept the float model" in notes, notes
    else:
        assert ours["size_ratio"] < 0.35
    assert {r["method"] for r in int8} == {"float", "onnxopt", "onnxruntime"}
