"""The README's synopsis and recipe stay true (#17)."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from onnxopt.cli import main
from onnxopt.pipeline import available_presets

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_synopsis_lists_every_preset():
    synopsis = re.search(r"--pipeline ([\w|.]+)\]", README)
    assert synopsis is not None
    listed = set(synopsis.group(1).split("|")) - {"recipe.toml"}
    assert listed == set(available_presets())


def test_readme_recipe_writes_a_clean_model_no_larger_than_its_input(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(re.search(r"```toml\n(# recipe.toml.*?)```", README, re.S).group(1))
    output, source = tmp_path / "out.onnx", REPO / "examples" / "digits.onnx"
    args = ["optimize", str(source), "-o", str(output), "-p", str(recipe), "-q"]
    assert main([*args, "--calib", str(REPO / "examples" / "digits_calib.npz")]) == 0
    assert "warning" not in capsys.readouterr().err
    written = onnx.load(output)
    read = {name for node in written.graph.node for name in node.input}
    assert all(t.name in read for t in written.graph.initializer), "unused initializers were written"
    assert output.stat().st_size <= source.stat().st_size
