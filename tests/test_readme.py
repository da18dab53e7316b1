"""The README's Python examples run as written (on the digits example model)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

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
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {})
