from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnxopt.passes.common.stats import GramSpread
from onnxopt.passes.lowrank.ranks import (
    SHRINKAGE,
    RankCandidate,
    allocate_ranks,
    factorize,
    held_out_error,
    max_rank,
    rank_for_energy,
    shrink_gram,
    shrinkage_intensity,
    split_factors,
)
from onnxopt.passes.lowrank.split import SplitLowRank

from onnxopt.errors import CalibrationDataError
from onnxopt.harness import synthesize_inputs
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent, init, make_model, unseen_inputs, vi


def _low_rank(rng: np.random.Generator, k: int, n: int, r: int) -> np.ndarray:
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n))).astype(np.float32)


# --------------------------------------------------------------------------- math


@settings(max_examples=30, deadline=None)
@given(k=st.integers(8, 40), n=st.integers(8, 40), r=st.integers(1, 4), whiten=st.booleans(), seed=st.integers(0, 99))
def test_low_rank_weight_is_reconstructed_exactly_at_its_rank(k, n, r, whiten, seed):
    rng = np.random.default_rng(seed)
    w = _low_rank(rng, k, n, r)
    x = rng.standard_normal((64, k))
    fact = factorize(w, x.T @ x if whiten else None)
    a, b = split_factors(w, fact, r)
    assert a.shape == (k, r) and b.shape == (r, n)
    np.testing.assert_allclose(a @ b, w, atol=1e-3 * np.abs(w).max())
    assert fact.relative_error[r] < 1e-6


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 999), r=st.integers(1, 6))
def test_whitened_split_never_has_more_output_error_than_plain(seed, r):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 12))
    x = rng.standard_normal((200, 16)) * np.linspace(0.05, 3, 16)
    errors = []
    for gram in (None, x.T @ x):
        a, b = split_factors(w, factorize(w, gram), r)
        errors.append(np.linalg.norm(x @ (w - a.astype(np.float64) @ b)))
    assert errors[1] <= errors[0] * (1 + 1e-4)


def test_relative_error_of_whitened_factorization_is_the_output_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 10))
    x = rng.standard_normal((100, 20))
    fact = factorize(w, x.T @ x)
    a, b = split_factors(w, fact, 4)
    measured = np.linalg.norm(x @ (w - a.astype(np.float64) @ b)) ** 2 / np.linalg.norm(x @ w) ** 2
    assert measured == pytest.approx(fact.relative_error[4], rel=1e-3)


def _layer_inputs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs like a transformer's: correlated features with a few outlier channels."""
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((rows, k)) @ mix * np.exp(rng.standard_normal(k))
    x[:, :3] *= 20
    return x


def test_held_out_error_is_the_measured_output_error_on_new_inputs():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((24, 16))
    fit, new = _layer_inputs(rng, 60, 24), _layer_inputs(rng, 80, 24)
    fact = factorize(w, fit.T @ fit, 0.3)
    curve = held_out_error(w, fact, new.T @ new)
    for rank in (1, 5, 12):
        a, b = split_factors(w, fact, rank)
        measured = np.linalg.norm(new @ (w - a.astype(np.float64) @ b)) ** 2 / np.linalg.norm(new @ w) ** 2
        assert measured == pytest.approx(curve[rank], rel=1e-3, abs=1e-6)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-9)


def test_shrunk_whitening_beats_plain_svd_on_held_out_inputs():
    # fewer calibration rows than features, as with 32 short sentences for a 384-wide layer
    rng = np.random.default_rng(9)
    k, n, rank = 96, 64, 24
    w = rng.standard_normal((k, n))
    x_fit, x_new = _layer_inputs(rng, 48, k), _layer_inputs(rng, 400, k)
    gram_new = x_new.T @ x_new
    plain = held_out_error(w, factorize(w), gram_new)[rank]
    shrunk = held_out_error(w, factorize(w, x_fit.T @ x_fit, 0.3), gram_new)[rank]
    raw = held_out_error(w, factorize(w, x_fit.T @ x_fit, 0.0), gram_new)[rank]
    assert shrunk < plain and shrunk < raw


def _spread_of(samples: list[np.ndarray]) -> tuple[np.ndarray, int, GramSpread]:
    grams = [x.T @ x for x in samples]
    rows = [len(x) for x in samples]
    off = sum(np.sum(g**2) - np.sum(np.diag(g) ** 2) for g in grams)
    spread = GramSpread(
        sum(r * g for r, g in zip(rows, grams, strict=True))[None],
        np.array([off]),
        sum(r * r for r in rows),
        len(grams),
    )
    return sum(grams)[None], sum(rows), spread


def test_shrinkage_intensity_is_the_sampling_variance_share_of_the_off_diagonal():
    rng = np.random.default_rng(3)
    samples = [rng.standard_normal((int(rng.integers(3, 12)), 6)) @ rng.standard_normal((6, 6)) for _ in range(9)]
    gram, rows, spread = _spread_of(samples)
    mean = gram[0] / rows  # the direct computation, sample by sample
    variance = sum((x.T @ x - len(x) * mean) ** 2 for x in samples) * 9 / 8 / rows**2
    off = ~np.eye(6, dtype=bool)
    expected = min(1.0, variance[off].sum() / (mean[off] ** 2).sum())
    assert shrinkage_intensity(gram, rows, spread) == pytest.approx(expected, rel=1e-9)


def test_shrinkage_intensity_follows_how_much_the_data_says_about_correlations():
    rng = np.random.default_rng(4)
    mixing = rng.standard_normal((16, 16))
    correlated = [rng.standard_normal((20, 16)) @ mixing for _ in range(64)]  # many samples, strong correlations
    independent = [rng.standard_normal((2, 16)) for _ in range(8)]  # few samples, no correlation at all
    assert shrinkage_intensity(*_spread_of(correlated)) < 0.05
    assert shrinkage_intensity(*_spread_of(independent)) > 0.5
    gram, rows, _ = _spread_of(independent)
    assert shrinkage_intensity(gram, rows, None) == SHRINKAGE  # nothing to estimate it from


def test_shrink_gram_keeps_the_diagonal():
    gram = np.array([[4.0, 2.0], [2.0, 1.0]])
    shrunk = shrink_gram(gram, 0.5)
    np.testing.assert_allclose(np.diag(shrunk), np.diag(gram), rtol=1e-5)
    assert shrunk[0, 1] == pytest.approx(1.0)
    assert np.linalg.eigvalsh(shrunk).min() > 0


@given(k=st.integers(1, 500), n=st.integers(1, 500), saving=st.floats(0, 0.9))
def test_max_rank_always_saves(k, n, saving):
    r = max_rank(k, n, saving)
    assert r == 0 or r * (k + n) <= (1 - saving) * k * n
    assert r * (k + n) < k * n or r == 0


def test_rank_for_energy():
    energy = np.array([4.0, 3.0, 2.0, 1.0])
    assert rank_for_energy(energy, 0.7) == 2
    assert rank_for_energy(energy, 0.71) == 3
    assert rank_for_energy(energy, 1.0) == 4


def test_allocation_is_monotone_in_price():
    rng = np.random.default_rng(1)
    candidates = []
    for _ in range(4):
        energy = np.sort(rng.random(32))[::-1]
        fact_error = 1 - np.concatenate([[0], np.cumsum(energy)]) / energy.sum()
        candidates.append(RankCandidate(fact_error, 32, 64, max_rank(32, 64, 0.1)))
    params = []
    for price in (1e-4, 1e-2, 1e-1, 1.0, 10.0):
        ranks = allocate_ranks(candidates, price)
        params.append(sum(c.params(r) for c, r in zip(candidates, ranks, strict=True)))
    assert params == sorted(params, reverse=True)
    assert params[0] == 4 * 32 * 64


# --------------------------------------------------------------------------- pass


def _matmul_model(w: np.ndarray, *, constant: bool = False) -> onnx.ModelProto:
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [init("W", w)]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w, "W")))
        inits = []
    return make_model(nodes, [vi("x", [2, 5, k])], [vi("y", [2, 5, n])], inits)


@pytest.mark.parametrize("constant", [False, True])
def test_matmul_with_batch_dims_split_exactly_at_true_rank(constant):
    w = _low_rank(np.random.default_rng(0), 96, 128, 8)
    model = _matmul_model(w, constant=constant)
    result = SplitLowRank(rank=8, min_params=0)(model, Context())
    assert result.changed and result.stats["layers_split"] == 1
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul"]
    assert result.stats["params_after"] == 8 * (96 + 128)
    assert_equivalent(_matmul_model(w), result.model, profile="exact")


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta", "bias"), [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)])
def test_gemm_attribute_combinations(trans_a, trans_b, alpha, beta, bias):
    rng = np.random.default_rng(2)
    k, n, m = 64, 80, 6
    w = _low_rank(rng, k, n, 5)
    inputs = ["a", "B"] + (["C"] if bias else [])
    node = helper.make_node("Gemm", inputs, ["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    inits = [init("B", w.T if trans_b else w)] + ([init("C", rng.standard_normal(n))] if bias else [])
    model = make_model([node], [vi("a", [k, m] if trans_a else [m, k])], [vi("y", [m, n])], inits)
    result = SplitLowRank(rank=5, min_params=0)(model, Context())
    assert result.changed
    second = result.model.graph.node[1]
    assert second.op_type == "Gemm" and list(second.input[2:]) == (["C"] if bias else [])
    assert_equivalent(model, result.model, profile="exact")


def test_split_is_skipped_when_it_would_not_save():
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    result = SplitLowRank(rank=30, min_params=0)(_matmul_model(w), Context())
    assert not result.changed
    assert any("would not save" in note for note in result.notes)


def test_small_layers_are_left_dense():
    w = _low_rank(np.random.default_rng(4), 32, 32, 2)
    result = SplitLowRank(rank=2)(_matmul_model(w), Context())
    assert not result.changed
    assert any("min_params" in note for note in result.notes)


def test_without_calibration_an_explicit_rank_or_energy_is_required():
    w = _low_rank(np.random.default_rng(5), 96, 96, 4)
    with pytest.raises(CalibrationDataError, match="--rank or --energy"):
        SplitLowRank()(_matmul_model(w), Context())
    assert SplitLowRank(energy=0.999, min_params=0)(_matmul_model(w), Context()).changed


def test_conv1x1_split():
    rng = np.random.default_rng(6)
    w = _low_rank(rng, 64, 96, 6).T.reshape(96, 64, 1, 1)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], kernel_shape=[1, 1], strides=[2, 2])
    model = make_model(
        [node], [vi("x", [1, 64, 8, 8])], [vi("y", [1, 96, 4, 4])], [init("W", w), init("b", rng.standard_normal(96))]
    )
    assert not SplitLowRank(rank=6, min_params=0)(model, Context()).changed
    result = SplitLowRank(rank=6, min_params=0, include_conv1x1=True)(model, Context())
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    assert_equivalent(model, result.model, profile="exact")


def _mlp(seed: int = 7) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    # trained-like weights: a decaying spectrum, and inputs living mostly in a subspace
    u, _, vt = np.linalg.svd(rng.standard_normal((128, 128)))
    w1 = (u * np.exp(-np.arange(128) / 12.0)) @ vt
    w2 = rng.standard_normal((128, 16)) / 8
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [4, 128])], [vi("y", [4, 16])], [init("W1", w1), init("W2", w2)])


#: On 16 unseen samples the default-budget split measured cosine 0.9990, SQNR 27.0 dB (floors
#: 0.995 / 20 dB hold) but top-1 0.91-1.0 over seeds 99, 5, 6: the pass judges top-1 on 4
#: held-out samples of 4 near-tied rows. Top-1 is held to 0.85 (the lowest measured, 0.906,
#: minus a 0.05 margin); cosine and SQNR keep the budget's own floors.
UNSEEN_TOP1: dict = {"overrides": {"*": {"min_top1": 0.85}}, "metrics": ["y:top1>=0.85"]}


def test_default_budget_with_calibration_holds_under_the_harness():
    model = _mlp()
    data = synthesize_inputs(model, iterations=16, seed=1)
    result = SplitLowRank(min_params=1024)(model, Context(calibration=data))
    assert result.changed and result.stats["params_saved"] > 0
    # judged on inputs the pass never saw, not on the held-out quarter it tuned its ranks on
    assert_equivalent(model, result.model, profile="int8", data=unseen_inputs(model), **UNSEEN_TOP1)


def test_explicit_rank_is_applied_where_it_fits():
    model = _mlp()
    data = synthesize_inputs(model, iterations=16, seed=1)
    # the signal floors only: judged cross-fitted on all 64 rows, rank 40 flips one of these near-tied
    # rows (top-1 0.984 < 0.99; the held-out quarter's 16 rows saw none), which the default budget refuses
    budget = "y:cosine>=0.995;y:sqnr>=20"
    result = SplitLowRank(rank=40, min_params=1024, budget=budget)(model, Context(calibration=data))
    assert result.changed and result.stats["layers_split"] == 1, (result.stats, result.notes)
    assert any(note.startswith("h: rank 40 of 128") for note in result.notes), result.notes
    assert_equivalent(model, result.model, profile="int8", data=unseen_inputs(model), **UNSEEN_TOP1)
    refused = SplitLowRank(rank=40, min_params=1024)(model, Context(calibration=data))
    assert not refused.changed and any("kept 1 of 1 layers dense" in n for n in refused.notes), refused.notes


def test_explicit_rank_backs_off_to_the_budget():
    model = _mlp()
    data = synthesize_inputs(model, iterations=16, seed=1)
    before = model.SerializeToString()
    result = SplitLowRank(rank=1, min_params=1024)(model, Context(calibration=data))
    assert not result.changed and result.model.SerializeToString() == before
    assert any("kept 2 of 2 layers dense" in note for note in result.notes), result.notes
