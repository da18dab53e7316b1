"""Issue #17's edge cases: every unusable input or output location is one line and exit 2, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt.cli import main
from onnxopt.model import save_model
from tests.builders import init, make_model, vi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("MatMul", ["xi", "w"], ["y"])]
    return make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 4])], [init("w", w)])


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(_model(), tmp_path / "model.onnx")


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, err, expected, exit_code=2):
    assert code == exit_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0], err


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "extra",
    [
        ["-o", "{blocker}/out.onnx"],
        ["-o", "{tmp}/out.onnx", "--report", "{blocker}/r.json"],
        ["-o", "{tmp}/new/out.onnx", "--report", "{blocker}/sub/r.json"],
    ],
)
def test_optimize_output_under_a_file_is_exit_2_and_writes_nothing(tmp_path, model_path, capsys, extra):
    blocker = tmp_path / "file.onnx"
    blocker.write_bytes(b"x")
    before = _files(tmp_path)
    args = [a.format(blocker=blocker, tmp=tmp_path) for a in extra]
    code, _, err = _run(["optimize", model_path, *args, "-q"], capsys)
    _one_line(code, err, "is a file, not a folder")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("option", ["--junit", "--save-outputs", "--report"])
def test_check_outputs_under_a_file_are_exit_2_and_nothing_is_left(tmp_path, model_path, capsys, option):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"x")
    before = _files(tmp_path)
    args = ["check", model_path, model_path, "--junit", tmp_path / "ok/j.xml", option, blocker / "x"]
    if option == "--junit":
        args = ["check", model_path, model_path, "--report", tmp_path / "ok/r.json", option, blocker / "x"]
    code, _, err = _run(args, capsys)
    _one_line(code, err, "is a file, not a folder")
    assert _files(tmp_path) == before


def test_check_creates_missing_folders_for_every_output(tmp_path, model_path, capsys):
    junit, golden, report = tmp_path / "a/j.xml", tmp_path / "b/c/g.npz", tmp_path / "d/r.json"
    code, _, err = _run(
        ["check", model_path, model_path, "--junit", junit, "--save-outputs", golden, "--report", report], capsys
    )
    assert code == 0, err
    assert junit.read_text().startswith("<")
    assert report.read_text().startswith("{")
    code, _, err = _run(["check", model_path, "--load-outputs", golden], capsys)
    assert code == 0, err
    assert not [p for p in tmp_path.rglob(".onnxopt-*")]


def test_a_failed_write_removes_what_the_set_wrote(tmp_path, monkeypatch):
    from onnxopt.errors import OutputLocationError
    from onnxopt.outputs import Output, write_outputs

    def broken(path: Path) -> None:
        raise PermissionError(13, "Permission denied")

    outputs = [
        Output(tmp_path / "new/m.onnx", "-o", lambda p: p.write_bytes(b"model")),
        Output(tmp_path / "other/r.json", "--report", broken),
    ]
    with pytest.raises(OutputLocationError, match=r"--report .*Permission denied.*nothing was written"):
        write_outputs(outputs)
    assert _files(tmp_path) == set()


def test_debug_keeps_the_exit_code_and_shows_the_traceback(tmp_path, capsys):
    code, _, err = _run(["--debug", "optimize", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2
    assert "Traceback" in err and "onnxopt: error:" in err
    code, _, err = _run(["optimize", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "--debug"], capsys)
    assert code == 2


def test_ctrl_c_prints_one_line_and_leaves_nothing(tmp_path):
    output = tmp_path / "o.onnx"
    args = ["--debug", "optimize", str(EXAMPLES / "digits.onnx"), "-o", str(output), "-p", "int8"]
    args += ["--calib", str(EXAMPLES / "digits_calib.npz"), "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxopt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # --debug logs each pass: interrupt once int8 calibration has started
        seen.append(line)
        if "onnxopt.streaming" in line:
            break
    else:
        pytest.fail(f"the run ended before calibration: {''.join(seen)}")
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 130
    assert rest.strip().splitlines()[-1:] == ["onnxopt: interrupted; nothing was written"], rest
    assert "Traceback" not in rest
    assert os.listdir(tmp_path) == []


def test_zero_sample_calibration_says_so(tmp_path, capsys):
    calib = tmp_path / "zero.npz"
    np.savez(calib, image=np.zeros((0, 1, 16, 16), np.float32))
    code, _, err = _run(
        ["optimize", EXAMPLES / "digits.onnx", "-o", tmp_path / "o.onnx", "-p", "int8", "--calib", calib], capsys
    )
    _one_line(code, err, "holds 0 samples")
    assert not (tmp_path / "o.onnx").exists()


def _with_invalid_text(tmp_path: Path, edit) -> Path:
    model = onnx.load(EXAMPLES / "digits.onnx")
    edit(model)
    data = model.SerializeToString()
    at = data.index(b"QQQQ")
    path = tmp_path / "bad.onnx"
    path.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    return path


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: setattr(m.graph.node[2], "op_type", "QQQQRelu"),
        lambda m: setattr(m.graph.node[2], "domain", "QQQQ"),
        lambda m: setattr(m.graph.node[0].attribute[0], "name", "QQQQ"),
    ],
    ids=["op_type", "domain", "attribute"],
)
@pytest.mark.parametrize("command", ["inspect", "optimize", "check"])
def test_string_field_that_is_not_utf8_is_exit_2(tmp_path, capsys, edit, command):
    path = _with_invalid_text(tmp_path, edit)
    args = {"inspect": [path], "optimize": [path, "-o", tmp_path / "o.onnx", "-q"], "check": [path, path]}[command]
    code, _, err = _run([command, *args], capsys)
    _one_line(code, err, "is not valid UTF-8 text")
    assert not (tmp_path / "o.onnx").exists()


def _external_outside(tmp_path: Path) -> Path:
    inner = tmp_path / "inner"
    inner.mkdir()
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, inner / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(inner / "m.onnx", load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.data"
    (inner / "m.data").rename(tmp_path / "m.data")
    onnx.save(model, inner / "m.onnx")
    return inner / "m.onnx"


def test_inspect_warns_and_strict_refuses_external_data_outside_the_folder(tmp_path, capsys):
    path = _external_outside(tmp_path)
    code, _, err = _run(["inspect", path], capsys)
    assert code == 0
    assert "warning" in err and "outside the model's folder" in err
    code, _, err = _run(["inspect", path, "--strict"], capsys)
    _one_line(code, err, "outside the model's folder")
    code, _, err = _run(["optimize", path, "-o", tmp_path / "o.onnx"], capsys)
    _one_line(code, err, "outside the model's folder")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: setattr(t, "data_type", 0), "is not an ONNX type"),
        (lambda t: setattr(t, "raw_data", t.raw_data[:10]), "truncated"),
    ],
    ids=["undefined type", "truncated"],
)
def test_unreadable_tensor_is_exit_2(tmp_path, capsys, edit, expected):
    # found by tests/test_fuzz.py: a Constant's tensor with element type 0 was exit 3 in normalization
    model = onnx.load(EXAMPLES / "digits.onnx")
    weight = model.graph.initializer[0]
    if not weight.raw_data:
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight), weight.name))
    edit(weight)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = _run(["optimize", path, "-o", tmp_path / "o.onnx", "-q"], capsys)
    _one_line(code, err, expected)
    assert not (tmp_path / "o.onnx").exists()
