"""The lossy passes judge their budget with the task judge (#13)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxopt.passes.prune.magnitude import PruneMagnitude

from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.harness import synthesize_inputs
from onnxopt.pipeline import Context, create_pass
from tests.builders import init, make_model, vi


def _classifier(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    inits = [init("w1", rng.normal(size=(32, 64)) / 6), init("w2", rng.normal(size=(64, 5)) / 8)]
    return make_model(nodes, [vi("x", [1, 32])], [vi("probs", [1, 5])], inits)


def _data(n: int = 16) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset([{"x": rng.normal(size=(1, 32)).astype(np.float32)} for _ in range(n)])


def _int8(model, data, **params):
    params.setdefault("check_latency", False)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return create_pass("quantize_int8", **params)(work, Context(calibration=data))


def test_int8_default_target_is_the_inferred_task_metric_with_a_cross_fitted_estimate():
    result = _int8(_classifier(), _data())
    notes = " | ".join(result.notes)
    assert "task metric probs:top1" in notes and "Softmax" in notes
    assert "4-fold cross-fitted estimate" in notes
    assert result.stats["cross_fitted_metric"] == "probs:top1"
    low, high = result.stats["cross_fitted_interval"]
    assert low <= result.stats["cross_fitted_agreement"] <= high
    # 16 samples cannot resolve 0.99 agreement: the report says so and how many would
    assert "cannot resolve the floor" in notes and "items would" in notes


def test_int8_declared_target_names_the_metric_that_blocked_it():
    result = _int8(_classifier(), _data(), target="probs:sqnr>=150", max_fallback=1)
    assert result.stats["target_met"] == 0 and not result.changed
    assert any("probs:sqnr" in n and "NOT met" in n for n in result.notes)
    with pytest.raises(OnnxoptError, match="no such output"):
        _int8(_classifier(), _data(), target="nosuch:top1>=0.9")


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = [init("w1", rng.normal(size=(64, 64))), init("w2", rng.normal(size=(64, 16)))]
    return make_model(nodes, [vi("x", ["n", 64])], [vi("y", ["n", 16])], inits)


def test_prune_reports_the_task_metric_and_accepts_declared_metrics():
    model = _mlp(seed=5)
    data = synthesize_inputs(model, iterations=16, seed=3)
    result = PruneMagnitude(min_size=0)(model, Context(calibration=data))
    assert result.changed and result.stats["within_budget"] == 1
    assert result.stats["task_metric"].startswith("y:")
    assert any("task metric y:" in n and "95 % interval" in n for n in result.notes)
    loose = PruneMagnitude(min_size=0, budget="y:cosine>=0.9")(model, Context(calibration=data))
    assert loose.stats["task_metric"] == "y:cosine" and loose.stats["sparsity"] >= result.stats["sparsity"]
