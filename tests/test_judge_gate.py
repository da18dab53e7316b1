"""The judge inside the gate: check --profile int8 and --metric decide by task metrics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.cli import main
from onnxopt.data import Dataset, save_dataset
from onnxopt.harness import check, parse_metric
from onnxopt.model import save_model
from tests.builders import init, make_model, vi

ANCHORS, CLASSES = 64, 3


def _detector(score_noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8-like head: boxes (0–640) and sigmoid scores concatenated on axis 1."""
    rng = np.random.default_rng(seed)
    wb = rng.uniform(0, 1, (4, 8)).astype(np.float32)
    ws = (rng.normal(size=(CLASSES, 8)) * 3).astype(np.float32)
    ws_c = ws + (np.random.default_rng(99).normal(size=ws.shape) * score_noise).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["wb", "x"], ["b0"]),
        helper.make_node("Mul", ["b0", "k"], ["boxes"]),
        helper.make_node("MatMul", ["ws", "x"], ["s0"]),
        helper.make_node("Sigmoid", ["s0"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1),
    ]
    return make_model(
        nodes,
        [vi("x", [1, 8, ANCHORS])],
        [vi("output0", [1, 4 + CLASSES, ANCHORS])],
        [init("wb", wb[None]), init("k", np.array(160.0)), init("ws", ws_c[None])],
    )


def _data(n: int = 6) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset([{"x": rng.uniform(0, 1, (1, 8, ANCHORS)).astype(np.float32)} for _ in range(n)])


def test_int8_gate_infers_detections_and_fails_collapsed_scores_that_cosine_passes():
    reference, collapsed = _detector(), _detector(score_noise=3.0)
    whole = check(reference, collapsed, _data(), profile="int8", infer=False, levels=("disabled",))
    assert whole.passed  # boxes dominate whole-tensor cosine and SQNR: the old gate's blind spot
    report = check(reference, collapsed, _data(), profile="int8", levels=("disabled",))
    assert not report.passed
    (spec,) = report.metrics
    assert spec.name == "detection" and "Concat" in spec.reason
    (result,) = report.levels[0].metrics
    assert result.metric == "detection@0.25" and result.value < 0.9
    assert any("detection@0.25" in line for line in report.failures())
    same = check(reference, _detector(), _data(), profile="int8", levels=("disabled",))
    assert same.passed and same.levels[0].metrics[0].value == 1.0


def test_cli_metric_option_and_report_name_each_metric_and_why(tmp_path, capsys):
    ref = save_model(_detector(), tmp_path / "ref.onnx")
    cand = save_model(_detector(score_noise=3.0), tmp_path / "cand.onnx")
    data = save_dataset(_data(), tmp_path / "data.npz")
    report = tmp_path / "r.json"
    code = main(["check", str(ref), str(cand), "--data", str(data), "--profile", "int8", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 1 and "task metrics" in out and "detection@0.25" in out
    saved = json.loads(report.read_text())
    assert saved["metrics"][0]["metric"] == "output0:detection@0.25" and "box" in saved["metrics"][0]["reason"]
    assert saved["levels"][0]["outputs"][0]["metrics"][0]["passed"] is False
    # a declared metric replaces the inferred one: here only the boxes, which are intact
    args = ["check", str(ref), str(cand), "--data", str(data), "--profile", "int8"]
    assert main([*args, "--metric", "output0[:, :4]:cosine>=0.999"]) == 0
    assert main([*args, "--metric", "output0[:, 4:]:cosine>=0.999"]) == 1
    capsys.readouterr()
    assert main([*args, "--metric", "output0:nosuch>=1"]) == 2
    assert "unknown metric" in capsys.readouterr().err


@pytest.mark.parametrize("profile", ["exact", "int8"])
def test_declared_metrics_apply_under_any_profile(profile):
    reference = _detector()
    report = check(
        reference,
        reference,
        _data(2),
        profile=profile,
        levels=("disabled",),
        metrics=[parse_metric("output0[:, 4:]:top1>=0.99")],
    )
    assert report.passed and report.levels[0].metrics[0].metric == "[:, 4:]:top1"
