"""int8's latency check rejects a measured slowdown beyond its own noise, never a noisy one.

The decisions are tested on given timings (the pass's timer is replaced), never on this
machine's clock: a test that timed a 60 us model under load decided float vs int8 on noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes.quantize import timing
from onnxopt.passes.quantize.timing import SLOWER, slowdown

from tests.test_quantize import _conv_model, _data, _quantize


def _rounds(ratio: float, noise: float, n: int = 40, seed: int = 0) -> tuple[list[float], list[float]]:
    """Return paired (reference, candidate) times: candidate = ratio x reference, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    reference = 60e-6 * (1 + noise * rng.standard_normal(n).clip(-3, 3))
    candidate = ratio * 60e-6 * (1 + noise * rng.standard_normal(n).clip(-3, 3))
    return list(np.abs(reference)), list(np.abs(candidate))


def test_a_steady_slowdown_is_measured_as_slower():
    measured = slowdown(*_rounds(1.10, 0.01))
    assert measured.slower(SLOWER) and measured.low > SLOWER and abs(measured.ratio - 1.10) < 0.01


def test_noise_around_a_small_ratio_is_not_a_slowdown():
    measured = slowdown(*_rounds(1.05, 0.30))
    assert measured.ratio > SLOWER  # the median alone would have said "slower" and kept float
    assert not measured.slower(SLOWER) and measured.low < SLOWER < measured.high


def test_a_large_slowdown_is_caught_even_under_heavy_noise():
    assert slowdown(*_rounds(2.0, 0.30)).slower(SLOWER)


def test_interval_is_the_sign_test_order_statistics():
    reference = [1.0] * 40
    candidate = [1.0 + i / 100 for i in range(40)]  # ratios 1.00 ... 1.39
    measured = slowdown(reference, candidate)
    k = int((40 - 1.96 * 40**0.5) // 2)  # 13
    assert (measured.low, measured.high) == pytest.approx((1.0 + k / 100, 1.39 - k / 100))
    few = slowdown([1.0] * 4, [1.2, 1.1, 1.3, 1.4])
    assert (few.low, few.high) == pytest.approx((1.1, 1.4))  # too few rounds: the full range


def _with_timings(monkeypatch, ratio: float, noise: float) -> None:
    def fake_rounds(models, sample, **kwargs):
        reference, candidate = _rounds(ratio, noise)
        return [reference, candidate] + [reference] * (len(models) - 2)

    monkeypatch.setattr(timing, "latency_rounds", fake_rounds)


def test_pass_keeps_float_when_int8_is_measurably_slower(monkeypatch):
    _with_timings(monkeypatch, ratio=1.5, noise=0.02)
    model, _, _ = _conv_model()
    result = _quantize(model, _data([1, 3, 8, 8], n=4), check_latency=True)
    assert not result.changed
    assert any("beyond the timing noise" in n and "kept the float model" in n for n in result.notes), result.notes
    assert result.stats["latency_ratio_interval"][0] > SLOWER


def test_pass_keeps_int8_when_the_slowdown_is_within_noise(monkeypatch):
    _with_timings(monkeypatch, ratio=1.05, noise=0.30)
    model, _, _ = _conv_model()
    result = _quantize(model, _data([1, 3, 8, 8], n=4), check_latency=True)
    assert result.changed and result.stats["latency_ratio"] > SLOWER
    assert result.stats["latency_ratio_interval"][0] <= SLOWER
    assert any("no slowdown was measured beyond the timing noise" in n for n in result.notes), result.notes


def test_pass_reports_its_real_timings():
    # the real timer, once: the stats and the note carry the medians and the interval
    model, _, _ = _conv_model()
    result = _quantize(model, _data([1, 3, 8, 8], n=4), check_latency=True)
    low, high = result.stats["latency_ratio_interval"]
    assert low <= result.stats["latency_ratio"] <= high
    assert any(n.startswith("latency on the first calibration sample") and "rounds" in n for n in result.notes)
