"""The op/opset/IR/dtype sweep (#17): fuse is exact on every case; int8 writes a loadable model or refuses cleanly.

CI runs a bounded slice (three opsets, float32 plus a few other dtypes); ``-m slow`` runs
every case of :mod:`tests.sweep_models` (opsets 7-21, IR 3-10, float16/32/64, int32/64).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxopt.passes.common.graphs import opset_version

from onnxopt.cli import main
from onnxopt.data import Dataset, save_dataset
from onnxopt.harness import check, synthesize_inputs
from onnxopt.model import save_model
from onnxopt.pipeline import load_recipe
from tests.sweep_models import FLOATS, SweepCase, sweep_cases

CASES = sweep_cases()
CI_OPSETS = (7, 13, 21)
CI_CASES = [c for c in CASES if c.opset in CI_OPSETS and (c.dtype == "float32" or c.name in ("Add", "Conv", "Relu"))]
CI_INT8 = [
    c for c in CI_CASES if (c.opset in (7, 21) and c.dtype in FLOATS and c.ir_version != 10) or c.ir_version == 3
]


def _inputs(model: onnx.ModelProto, count: int) -> Dataset:
    return synthesize_inputs(model, iterations=count, seed=1)


def _runs(path: Path, data: Dataset) -> bool:
    """Return True when onnxruntime runs the model as given (the sweep only judges such cases)."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, dict(data[0]))
    except Exception:  # any refusal by onnxruntime means: not a case for the sweep
        return False
    return True


def _reference(case: SweepCase, tmp_path: Path) -> tuple[onnx.ModelProto, Path, Dataset]:
    model = case.build()
    onnx.checker.check_model(model)
    path = save_model(model, tmp_path / "reference.onnx")
    data = _inputs(model, 8)
    if not _runs(path, data):
        pytest.skip(f"onnxruntime has no kernel for {case.id}")
    return model, path, data


def _assert_fuse_exact(case: SweepCase, tmp_path: Path) -> None:
    model, path, data = _reference(case, tmp_path)
    result = load_recipe("fuse").build().run(model)
    onnx.checker.check_model(result.model)
    assert opset_version(result.model) == case.opset, "fuse changed the opset"
    assert result.model.ir_version == case.ir_version
    fused = save_model(result.model, tmp_path / "fused.onnx")
    report = check(path, fused, data)
    assert report.passed, report.to_dict()


def _assert_int8_clean(case: SweepCase, tmp_path: Path) -> None:
    _, path, data = _reference(case, tmp_path)
    calib = save_dataset(data, tmp_path / "calib.npz")
    output = tmp_path / "int8.onnx"
    stderr = io.StringIO()
    args = ["optimize", str(path), "-o", str(output), "-p", "int8", "--calib", str(calib), "-q"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main([*args, "--param", "check_latency=false"])
    lines = [line for line in stderr.getvalue().splitlines() if line.strip() and "warning" not in line]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("onnxopt: error:"), stderr.getvalue()
        assert not output.exists()
        return
    assert code == 0, stderr.getvalue()
    written = onnx.load(output)
    onnx.checker.check_model(written)
    assert written.ir_version == case.ir_version
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    outputs = session.run(None, dict(data[0]))
    assert all(np.asarray(o).shape for o in outputs)
    if case.dtype in FLOATS:
        assert check(path, output, data, profile="int8").levels, "the int8 model could not be compared"


@pytest.mark.parametrize("case", CI_CASES, ids=lambda c: c.id)
def test_fuse_is_exact(case, tmp_path):
    _assert_fuse_exact(case, tmp_path)


@pytest.mark.parametrize("case", CI_INT8, ids=lambda c: c.id)
def test_int8_writes_a_loadable_model_or_refuses(case, tmp_path):
    _assert_int8_clean(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in CI_CASES], ids=lambda c: c.id)
def test_full_sweep_fuse_is_exact(case, tmp_path):
    _assert_fuse_exact(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in CI_INT8], ids=lambda c: c.id)
def test_full_sweep_int8(case, tmp_path):
    _assert_int8_clean(case, tmp_path)


def test_the_sweep_covers_what_the_issue_asks():
    assert {c.opset for c in CASES} == set(range(7, 22))
    assert {c.ir_version for c in CASES} == set(range(3, 11))
    assert {c.dtype for c in CASES} >= {"float32", "float16", "float64", "int32", "int64"}
