"""The end of a run tells the truth (#17): lossy-pass status, --require-applied, clean output, growth warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import pipeline
from onnxopt.cli import main
from onnxopt.model import save_model
from onnxopt.pipeline import NOT_APPLIED, PARTLY_APPLIED, Pass, PassManager, PassResult
from tests.builders import init, make_model, vi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 4])], [init("w", w), init("unused", w)])


class Blocked(Pass):
    """A lossy pass that never applies (its check always fails)."""

    name = "test_blocked"
    exact = False

    def run(self, model, ctx):
        return PassResult(model, False, {}, ["tried", "latency check failed"])


class Partly(Pass):
    """A lossy pass that says it kept part of the model as it was."""

    name = "test_partly"
    exact = False

    def run(self, model, ctx):
        model.graph.node[0].name = "renamed"
        return PassResult(model, True, {}, [], PARTLY_APPLIED, "kept 1 of 2 layers float")


class Inflate(Pass):
    """An exact pass that makes the file larger (a long node doc string)."""

    name = "test_inflate"
    exact = True

    def run(self, model, ctx):
        model.graph.node[0].doc_string = "x" * 50_000
        return PassResult(model, True, {}, [])


@pytest.fixture(autouse=True)
def _test_passes(monkeypatch):
    pipeline.available_passes()
    for cls in (Blocked, Partly, Inflate):
        monkeypatch.setitem(pipeline._PASSES, cls.name, cls)


def test_a_lossy_pass_without_status_gets_one_inferred_from_its_notes():
    result = PassManager([Blocked()]).run(_model())
    (record,) = result.outcomes()
    assert (record.status, record.reason) == (NOT_APPLIED, "latency check failed")
    assert result.status == NOT_APPLIED
    status = result.to_dict()["status"]
    assert status == {
        "result": NOT_APPLIED,
        "passes": [{"pass": "test_blocked", "status": NOT_APPLIED, "reason": "latency check failed"}],
    }


def test_the_worst_status_wins_and_exact_runs_say_exact():
    result = PassManager([Partly()]).run(_model())
    assert result.status == PARTLY_APPLIED
    assert result.outcomes()[0].reason == "kept 1 of 2 layers float"
    assert PassManager([Inflate()]).run(_model()).status == "exact"
    assert PassManager([Partly(), Blocked()]).run(_model()).status == NOT_APPLIED


def test_the_manager_ends_with_dead_code_clean_up():
    result = PassManager([Inflate()]).run(_model())
    assert [t.name for t in result.model.graph.initializer] == ["w"]
    assert any("removed 1 unused" in note for note in result.notes)
    kept = PassManager([Inflate()], clean=False).run(_model())
    assert len(kept.model.graph.initializer) == 2


def _recipe(tmp_path: Path, *names: str) -> Path:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("".join(f'[[pass]]\nname = "{n}"\n' for n in names))
    return recipe


def test_report_and_terminal_show_the_status_and_require_applied_exits_1(tmp_path, capsys):
    source = save_model(_model(), tmp_path / "m.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["optimize", str(source), "-o", str(out), "-p", str(_recipe(tmp_path, "test_blocked"))]
    assert main([*args, "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert "test_blocked: not applied: latency check failed" in captured.out
    data = json.loads(report.read_text())
    assert next(iter(data)) == "status" and data["status"]["result"] == NOT_APPLIED
    out.unlink()
    assert main([*args, "--require-applied", "-q"]) == 1
    err = capsys.readouterr().err
    assert "test_blocked was not applied (latency check failed); --require-applied" in err
    assert out.exists()  # the (unchanged) model is written; CI decides what to do with it


def test_an_output_larger_than_the_input_is_a_warning_naming_the_pass(tmp_path, capsys):
    source = save_model(_model(), tmp_path / "m.onnx")
    recipe = _recipe(tmp_path, "test_inflate")
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "-p", str(recipe), "-q"]) == 0
    err = capsys.readouterr().err
    assert "onnxopt: warning: the output" in err and "is larger than the input" in err
    assert "pass test_inflate added the most" in err


def test_int8_that_misses_its_target_is_not_applied_and_its_notes_fit_the_float_file(tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            str(EXAMPLES / "digits.onnx"),
            "-o",
            str(out),
            "-p",
            "int8",
            "--calib",
            str(EXAMPLES / "digits_calib.npz"),
            "--target",
            "cosine>=0.99999999",
            "--require-applied",
            "--report",
            str(report),
            "-q",
        ]
    )
    assert code == 1
    status = json.loads(report.read_text())["status"]
    assert status["result"] == NOT_APPLIED
    assert "accuracy target cosine>=0.99999999 not met" in status["passes"][0]["reason"]
    written = onnx.load(out)
    assert not any(n.op_type == "QuantizeLinear" for n in written.graph.node)
