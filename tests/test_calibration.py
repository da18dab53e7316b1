"""Observers and quantization math on plain arrays; the collector on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxopt.calibration import (
    HistogramObserver,
    MinMaxObserver,
    QuantParams,
    SaturatedObserver,
    affine_qparams,
    collect_statistics,
    dequantize,
    entropy_range,
    fit_weight_scale_to_bias,
    make_observer,
    mse_range,
    percentile_range,
    quantize,
    quantize_bias,
    symmetric_qparams,
    weight_qparams,
)
from onnxopt.data import Dataset
from tests.builders import init, make_model, vi


def test_affine_qparams_hand_computation():
    # [-1, 3] on uint8: scale = 4 / 255, zero point = rint(0 - (-1) / scale) = rint(63.75) = 64.
    p = affine_qparams(-1.0, 3.0, np.uint8)
    assert float(p.scale) == pytest.approx(4 / 255)
    assert int(p.zero_point) == 64
    assert p.dtype == np.uint8
    # int8: zero point = rint(-128 + 63.75) = -64.
    assert int(affine_qparams(-1.0, 3.0, np.int8).zero_point) == -64


def test_affine_range_widened_to_include_zero():
    p = affine_qparams(2.0, 4.0, np.uint8)
    assert int(p.zero_point) == 0 and float(p.scale) == pytest.approx(4 / 255)
    assert float(dequantize(quantize(np.array([0.0]), p), p)[0]) == 0.0


def test_zero_width_range_gets_scale_one():
    p = affine_qparams(0.0, 0.0, np.uint8)
    assert float(p.scale) == 1.0


def test_quantize_rounds_half_to_even_and_saturates():
    p = QuantParams(np.array(1.0, np.float32), np.array(0, np.uint8))
    q = quantize(np.array([0.5, 1.5, 2.5, -3.0, 300.0]), p)
    assert q.tolist() == [0, 2, 2, 0, 255]


def test_symmetric_weight_per_channel_axis():
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[0] = 1.27
    w[1] = -0.254
    p = weight_qparams(w, 0)
    assert p.axis == 0 and p.scale.shape == (3,)
    np.testing.assert_allclose(p.scale, [0.01, 0.002, 1.0], rtol=1e-6)
    assert p.zero_point.dtype == np.int8 and not p.zero_point.any()
    q = quantize(w, p)
    assert q[0].max() == 127 and q[1].min() == -127 and not q[2].any()


def test_weight_axis_one_for_matmul():
    w = np.array([[1.0, 10.0], [-2.0, 5.0]], np.float32)
    p = weight_qparams(w, 1)
    np.testing.assert_allclose(p.scale, [2 / 127, 10 / 127], rtol=1e-6)


def test_bias_int32_scale_is_product():
    q, scale = quantize_bias(np.array([1.0, -0.5]), 0.1, np.array([0.01, 0.02], np.float32))
    np.testing.assert_allclose(scale, [0.001, 0.002], rtol=1e-6)
    assert q.dtype == np.int32 and q.tolist() == [1000, -250]


def test_bias_overflow_guard_raises_tiny_weight_scale():
    bias, s_in = np.array([100.0, 0.1]), 1e-3
    ws = np.array([1e-12, 0.01], np.float32)
    with pytest.raises(ValueError):
        quantize_bias(bias, s_in, ws)
    fitted = fit_weight_scale_to_bias(bias, s_in, ws)
    assert fitted[1] == ws[1] and fitted[0] > ws[0]
    q, _ = quantize_bias(bias, s_in, fitted)
    assert abs(int(q[0])) <= 2**31 - 1


@settings(max_examples=60, deadline=None)
@given(
    low=st.floats(-1e3, 0, allow_nan=False),
    width=st.floats(1e-3, 1e3, allow_nan=False),
    dtype=st.sampled_from([np.uint8, np.int8]),
)
def test_affine_roundtrip_error_bounded_by_half_step(low, width, dtype):
    p = affine_qparams(low, low + width, dtype)
    x = np.linspace(min(low, 0.0), max(low + width, 0.0), 101).astype(np.float32)
    err = np.abs(dequantize(quantize(x, p), p) - x)
    assert err.max() <= float(p.scale) * 0.5 + 1e-5 * max(1.0, abs(low) + width)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=200))
def test_symmetric_roundtrip(values):
    w = np.array(values, np.float32)
    p = symmetric_qparams(float(np.abs(w).max()))
    assert np.abs(dequantize(quantize(w, p), p) - w).max() <= float(p.scale) / 2 + 1e-6


def test_minmax_and_moving_average():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, 2.0]))
    obs.update(np.array([-3.0, 0.0]))
    assert (obs.min, obs.max) == (-3.0, 2.0)
    avg = MinMaxObserver(averaging_constant=0.5)
    avg.update(np.array([0.0, 2.0]))
    avg.update(np.array([0.0, 4.0]))
    assert avg.max == 3.0


def test_observers_ignore_non_finite_values():
    for obs in (MinMaxObserver(), HistogramObserver(64)):
        obs.update(np.array([-np.inf, 1.0, np.nan, -2.0, np.inf]))
        assert obs.nonfinite == 3
        assert not obs.empty()
    only_inf = MinMaxObserver()
    only_inf.update(np.full(4, -np.inf))
    assert only_inf.empty() and only_inf.nonfinite == 4


def test_histogram_rebins_when_range_grows():
    obs = HistogramObserver(128)
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    b = rng.normal(scale=5, size=5000)
    obs.update(a)
    obs.update(b)
    hist = obs.histogram()
    assert hist.counts.sum() == pytest.approx(10000)
    assert hist.low <= b.min() and hist.high >= b.max()
    assert (hist.min, hist.max) == (min(a.min(), b.min()), max(a.max(), b.max()))
    # the median survives re-binning
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    median = hist.edges[1:][np.searchsorted(cdf, 0.5)]
    assert abs(median - np.median(np.concatenate([a, b]))) < 0.5


def _hist(values: np.ndarray, bins: int = 2048):
    obs = HistogramObserver(bins)
    obs.update(values)
    return obs.histogram()


def test_range_choosers_clip_outliers():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(size=100_000), [80.0]])
    hist = _hist(values)
    for low, high in (percentile_range(hist, 99.9), entropy_range(hist, np.int8)):
        assert high < 40 and low < 0 < high
    assert percentile_range(hist, 100.0) == (hist.min, hist.max)


def test_mse_range_clips_a_heavy_tail_but_keeps_a_lone_outlier_that_costs_more():
    rng = np.random.default_rng(3)
    laplace = _hist(rng.laplace(size=200_000))
    low, high = mse_range(laplace, np.int8)
    assert high < 0.9 * laplace.max and low > 0.9 * laplace.min  # analytic optimum for 8 bits: ~10 b
    # one value at 80 among 1e5 unit normals: clipping it costs more squared error than the step saves
    lone = _hist(np.concatenate([rng.normal(size=100_000), [80.0]]))
    assert mse_range(lone, np.int8)[1] > 40


def test_range_choosers_keep_bounded_uniform():
    values = np.random.default_rng(2).uniform(0, 6, 50_000)
    hist = _hist(values)
    low, high = mse_range(hist, np.uint8)
    assert high > 5.5 and low == 0.0


def test_make_observer_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown calibration method"):
        make_observer("bogus")


def test_collector_runs_groups_and_ignores_inf():
    nodes = [helper.make_node("Add", ["x", "mask"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    mask = np.array([[0.0, -np.inf, 0.0, 0.0]], np.float32)
    model = make_model(nodes, [vi("x", [1, 4])], [vi("z", [1, 4])], [init("mask", mask)])
    data = Dataset([{"x": np.full((1, 4), float(i), np.float32)} for i in range(5)])
    # a budget of 1 byte forces one group per tensor
    observers = collect_statistics(model, ["y", "z"], data, lambda _: MinMaxObserver(), memory_budget=1)
    assert observers["y"].nonfinite == 5 and observers["y"].max == 4.0
    assert observers["z"].nonfinite == 0 and observers["z"].min == 0.0 and math.isfinite(observers["z"].max)


def test_saturated_observer_clamps_before_the_inner_statistics():
    observer = SaturatedObserver(MinMaxObserver(), -3.0, None)
    observer.update(np.array([-95.0, -1.0, 0.5, 40.0, np.inf], np.float32))
    assert (observer.inner.min, observer.inner.max) == (-3.0, 40.0)
    assert observer.nonfinite == 1 and not observer.empty()
    hist = SaturatedObserver(make_observer("mse"), -3.0, 3.0)
    hist.update(np.linspace(-50, 50, 1001, dtype=np.float32))
    from onnxopt.calibration import choose_range

    low, high = choose_range(hist, "mse", np.uint8)
    assert -3.0 <= low < 0 < high <= 3.0


def test_saturated_observer_without_bounds_is_the_inner_observer():
    values = np.random.default_rng(0).normal(size=500).astype(np.float32)
    plain, wrapped = MinMaxObserver(), SaturatedObserver(MinMaxObserver(), None, None)
    plain.update(values)
    wrapped.update(values)
    assert (plain.min, plain.max) == (wrapped.inner.min, wrapped.inner.max)
