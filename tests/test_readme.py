"""The README's Python examples run as written (on the digits example model)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import helper

from onnxopt.pipeline import Context, available_passes
from tests.builders import make_model, vi

REPO = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(tmp_path, monkeypatch, index):
    shutil.copy(REPO / "examples" / "digits.onnx", tmp_path / "model.onnx")
    shutil.copy(REPO / "examples" / "digits_calib.npz", tmp_path / "calib.npz")
    monkeypatch.chdir(tmp_path)
    block = _python_blocks()[index]
    namespace: dict[str, object] = {}
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    checked = 0
    for path in re.findall(r'save_model\([^,]+, "([^"]+)"\)', block):
        # the API example writes the optimized model, and its own check passes
        onnx.checker.check_model(onnx.load(tmp_path / path))
        assert namespace["report"].passed, namespace["report"].failures()  # type: ignore[attr-defined]
        checked += 1
    for name in re.findall(r'^    name = "(\w+)"', block, flags=re.M):
        # the custom-pass example registers a pass that does what its docstring says
        assert name in available_passes()
        node = helper.make_node("Relu", ["x"], ["y"], doc_string="to drop")
        model = make_model([node], [vi("x", [2])], [vi("y", [2])])
        first = available_passes()[name]()(model, Context())
        assert first.changed and not first.model.graph.node[0].doc_string
        assert not available_passes()[name]()(first.model, Context()).changed
        checked += 1
    assert checked, "a README python block this test does not know how to check"
