"""The command line: exit codes, one-line errors, no output left behind on failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.cli import main
from onnxopt.model import save_model
from tests.builders import init, make_model, vi


def _model(scale: float = 1.0, width: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, width)).astype(np.float32) * scale
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("MatMul", ["xi", "w"], ["y"])]
    return make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", width])], [init("w", w)])


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(_model(), tmp_path / "model.onnx")


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, expected):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("onnxopt: error:"), err
    assert "Traceback" not in err
    assert expected in " ".join(lines)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "no such file"), (b"", "empty"), (b"\x00garbage\xff" * 10, "not a valid ONNX")],
)
def test_bad_model_gives_exit_2_one_line_and_no_output(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.onnx"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    code, _, err = _run(["optimize", bad, "-o", out], capsys)
    _assert_one_line_error(code, err, expected)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["bad.onnx"])


def test_truncated_model(tmp_path, capsys, model_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_path.read_bytes()[:-40])
    code, _, err = _run(["check", model_path, cut], capsys)
    _assert_one_line_error(code, err, str(cut))


def test_external_data_outside_folder(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    save_model(_model(width=256), folder / "model.onnx", external_data=True)
    loaded = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for entry in loaded.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    (folder / "model.onnx").write_bytes(loaded.SerializeToString())
    (tmp_path / "secret.bin").write_bytes(b"\0" * 256)
    code, _, err = _run(["inspect", folder / "model.onnx"], capsys)
    assert code == 0  # inspect only locates external data
    code, _, err = _run(["optimize", folder / "model.onnx", "-o", tmp_path / "o.onnx"], capsys)
    _assert_one_line_error(code, err, "outside the model's folder")
    assert not (tmp_path / "o.onnx").exists()


def test_wrong_calibration_data(tmp_path, capsys, model_path):
    data = tmp_path / "calib.npz"
    np.savez(data, wrong_name=np.zeros((4, 2, 8), np.float32))
    out = tmp_path / "out.onnx"
    code, _, err = _run(["optimize", model_path, "-o", out, "--calib", data], capsys)
    _assert_one_line_error(code, err, "x: float32[n, 8]")
    np.savez(data, x=np.zeros((4, 2, 8), np.float64))
    code, _, err = _run(["optimize", model_path, "-o", out, "--calib", data], capsys)
    _assert_one_line_error(code, err, "expects float32")
    # NaN inputs used to give a garbage int8 model that every held-out check passed (NaN vs NaN)
    values = np.ones((4, 2, 8), np.float32)
    values[2, 0, 3] = np.nan
    np.savez(data, x=values)
    for pipeline in ("int8", "prune", "lowrank"):
        code, _, err = _run(["optimize", model_path, "-o", out, "--calib", data, "--pipeline", pipeline], capsys)
        _assert_one_line_error(code, err, "'x' of sample 2 holds 1 NaN value(s)")
    assert not out.exists()


def test_unknown_pipeline_and_param(tmp_path, capsys, model_path):
    out = tmp_path / "out.onnx"
    code, _, err = _run(["optimize", model_path, "-o", out, "--pipeline", "nope"], capsys)
    _assert_one_line_error(code, err, "neither a preset")
    code, _, err = _run(["optimize", model_path, "-o", out, "--param", "bogus=1"], capsys)
    _assert_one_line_error(code, err, "takes 'bogus'")
    assert not out.exists()


def test_output_must_not_overwrite_input(capsys, model_path):
    before = model_path.read_bytes()
    code, _, err = _run(["optimize", model_path, "-o", model_path], capsys)
    _assert_one_line_error(code, err, "is the input model")
    assert model_path.read_bytes() == before


def test_check_pass_fail_and_reports(tmp_path, capsys, model_path):
    same = save_model(_model(), tmp_path / "same.onnx")
    other = save_model(_model(1.01), tmp_path / "other.onnx")
    report = tmp_path / "r.json"
    junit = tmp_path / "r.xml"
    code, out, _ = _run(["check", model_path, same, "--report", report, "--junit", junit], capsys)
    assert code == 0 and "PASS" in out
    assert json.loads(report.read_text())["passed"] is True
    code, out, _ = _run(["check", model_path, other, "--report", report, "--atol", "y:1e-9"], capsys)
    assert code == 1 and "FAIL" in out and "min rtol" in out
    assert json.loads(report.read_text())["passed"] is False


def test_check_with_golden_outputs_needs_no_reference(tmp_path, capsys, model_path):
    golden = tmp_path / "golden.npz"
    code, _, _ = _run(["check", model_path, model_path, "--save-outputs", golden, "--shape", "x:3x8"], capsys)
    assert code == 0 and golden.exists()
    other = save_model(_model(1.05), tmp_path / "other.onnx")
    assert _run(["check", model_path, "--load-outputs", golden], capsys)[0] == 0
    assert _run(["check", other, "--load-outputs", golden], capsys)[0] == 1


def test_check_layers_shows_where_error_grows(tmp_path, capsys, model_path):
    other = save_model(_model(1.05), tmp_path / "other.onnx")
    code, out, _ = _run(["check", model_path, other, "--layers", "--levels", "disabled"], capsys)
    assert code == 1 and "first exceeds tolerance at 'y'" in out


def test_inspect_and_passes(capsys, model_path):
    code, out, _ = _run(["inspect", model_path, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["params"] == 32 and data["ops"] == {"Identity": 1, "MatMul": 1}
    assert data["inputs"] == ["x: float32[n, 8]"]
    code, out, _ = _run(["passes"], capsys)
    assert code == 0 and "fuse" in out and "int8" in out


def test_python_dash_m_and_console_script_agree(model_path):
    result = subprocess.run(
        [sys.executable, "-m", "onnxopt", "inspect", str(model_path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and json.loads(result.stdout)["params"] == 32
    missing = subprocess.run(
        [sys.executable, "-m", "onnxopt", "inspect", "/no/such.onnx"], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_optimize_fuse_with_verify_writes_model_and_report(tmp_path, capsys, model_path):
    out = tmp_path / "fused.onnx"
    report = tmp_path / "report.json"
    code, stdout, _ = _run(
        ["optimize", model_path, "-o", out, "--pipeline", "fuse", "--verify", "--report", report], capsys
    )
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["source"]["nodes"] == 2 and data["final"]["nodes"] == 1  # the Identity is gone
    changed = [p for p in data["passes"] if p["changed"]]
    assert changed and all(p["checks"]["verify"]["passed"] for p in changed)
    assert "remove_identities" in stdout


@pytest.mark.parametrize("args", [["optimize", "--bogus"], ["check"], ["nonsense-command"], ["optimize", "m.onnx"]])
def test_usage_errors_exit_2_without_traceback(capsys, args):
    code, _, err = _run(args, capsys)
    assert code == 2
    assert "Traceback" not in err and "internal error" not in err


def test_check_reads_external_data_models_from_their_files(tmp_path, capsys):
    ref = tmp_path / "ref"
    cand = tmp_path / "cand"
    ref.mkdir()
    cand.mkdir()
    save_model(_model(width=256), ref / "m.onnx", external_data=True)
    save_model(_model(width=256), cand / "m.onnx", external_data=True)
    assert (ref / "m.onnx.data").exists()
    code, out, _ = _run(["check", ref / "m.onnx", cand / "m.onnx"], capsys)
    assert code == 0 and "PASS" in out
    (cand / "m.onnx.data").write_bytes(b"\0" * 10)  # truncated data: refused before onnxruntime sees it
    code, _, err = _run(["check", ref / "m.onnx", cand / "m.onnx"], capsys)
    _assert_one_line_error(code, err, "shorter than tensor")
