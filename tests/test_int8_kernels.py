"""int8 weights on the grid onnxruntime's integer kernels compute exactly on this machine.

On x86 CPUs without VNNI, onnxruntime's u8 x s8 kernels saturate pair sums at int16; the
pass measures it with a probe and puts weights on 7 bits there. These tests hold on any
machine: 7-bit weights never saturate, and whatever the pass chooses, the written model
computes on integer kernels what its QDQ graph means.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnxopt.passes.quantize.kernels import (
    FULL_LEVELS,
    REDUCED_LEVELS,
    integer_kernels_saturate,
    probe_error,
    weight_levels,
)

from onnxopt.errors import RecipeError
from onnxopt.runtime import run_model
from tests.builders import assert_equivalent, init, make_model, vi
from tests.test_quantize import _data, _dq_of, _quantize


def _two_matmuls(k: int = 64):
    w = np.random.default_rng(5).normal(size=(k, k)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="m1"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="m2"),
    ]
    return make_model(nodes, [vi("x", [2, k])], [vi("y", [2, k])], [init("w", w)]), w


def test_seven_bit_weights_never_saturate_and_the_probe_agrees_with_the_verdict():
    assert probe_error(REDUCED_LEVELS) == 0.0  # 255 * 64 * 2 fits an int16 on every kernel
    assert integer_kernels_saturate() == (probe_error(FULL_LEVELS) > 0.5)


def test_weight_levels_auto_follows_the_probe_and_explicit_settings_are_kept():
    assert weight_levels("reduced")[0] == REDUCED_LEVELS
    assert weight_levels("full")[0] == FULL_LEVELS
    levels, note = weight_levels("auto")
    assert levels == (REDUCED_LEVELS if integer_kernels_saturate() else FULL_LEVELS)
    assert ("saturate on this CPU" in note) == integer_kernels_saturate()


@pytest.mark.parametrize("weight_range", ["reduced", "full"])
def test_weight_range_sets_the_scale(weight_range):
    model, w = _two_matmuls(16)
    result = _quantize(model, _data([2, 16]), weight_range=weight_range)
    _, w_q, scale = _dq_of(result.model, "w")
    levels = REDUCED_LEVELS if weight_range == "reduced" else FULL_LEVELS
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / levels, rtol=1e-6)
    assert np.abs(w_q).max() == levels


def test_the_default_model_computes_on_integer_kernels_what_its_qdq_graph_means():
    model, _ = _two_matmuls()
    data = _data([2, 64])
    quantized = _quantize(model, data).model
    simulated = run_model(quantized, list(data))  # Q/DQ computed in float: what the graph means
    kernels = run_model(quantized, list(data), optimization="default")  # integer kernels
    worst = max(float(np.abs(s["y"] - k["y"]).max()) for s, k in zip(simulated, kernels, strict=True))
    scale = max(float(np.abs(s["y"]).max()) for s in simulated)
    assert worst < 0.01 * scale  # rounding differences only (saturation here was 11 on a scale of 60)
    assert_equivalent(model, quantized, profile="int8", data=data)


def test_unknown_weight_range_is_refused():
    model, _ = _two_matmuls(4)
    with pytest.raises(RecipeError, match="weight_range must be"):
        _quantize(model, _data([2, 4]), weight_range="6bit")
