"""Cross-validated repair damping of the pruning pass: the factor, the k-fold error, the per-unit choice."""

from __future__ import annotations

import numpy as np
from onnx import helper
from onnxopt.passes.common.linalg import inverse_factor
from onnxopt.passes.common.stats import collect_input_stats
from onnxopt.passes.prune.plan import build_plan
from onnxopt.passes.prune.sparsegpt import cross_validated_error, relative_layer_error, sparsegpt

from onnxopt.harness import synthesize_inputs
from tests.builders import init, make_model, vi


def _problem(rows_per_fold: int, cols: int = 48, folds: int = 4, seed: int = 0):
    """Return a weight and per-fold ``XᵀX`` of correlated inputs (``rows_per_fold`` rows each)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    w = rng.standard_normal((1, 16, cols)).astype(np.float32)
    grams = []
    for _ in range(folds):
        x = rng.standard_normal((rows_per_fold, cols)) @ mixing
        grams.append((x.T @ x)[None])
    return w, grams


def test_a_shared_factor_gives_the_same_repair():
    w, grams = _problem(100)
    gram = sum(grams)
    for count in (100, 400):
        direct = sparsegpt(w, gram, count=count, damp=0.1, blocksize=16)
        shared = sparsegpt(w, None, count=count, factor=inverse_factor(gram, 0.1), blocksize=16)
        np.testing.assert_allclose(shared, direct, rtol=1e-6, atol=1e-7)


def test_cross_validation_matches_the_in_sample_error_with_plenty_of_rows():
    w, grams = _problem(2000)
    count = w.size // 2
    held_out = cross_validated_error(w, grams, [count], damp=0.01)[0]
    in_sample = relative_layer_error(w, sparsegpt(w, sum(grams), count=count), sum(grams))
    assert abs(held_out - in_sample) < 0.15 * in_sample


def test_cross_validation_sees_the_repair_overfit_few_rows():
    w, grams = _problem(12)  # 36 rows to fit 48 features per fold
    count = w.size // 2
    held_out = cross_validated_error(w, grams, [count], damp=0.01)[0]
    in_sample = relative_layer_error(w, sparsegpt(w, sum(grams), count=count), sum(grams))
    assert held_out > 2 * in_sample
    # and a stronger damping generalizes better there
    assert cross_validated_error(w, grams, [count], damp=1.0)[0] < held_out


def test_cross_validation_on_a_subset_of_output_rows_is_close():
    w, grams = _problem(60)
    count = w.size // 2
    every = cross_validated_error(w, grams, [count], damp=0.1)[0]
    subset = cross_validated_error(w, grams, [count], damp=0.1, max_rows=8)[0]
    assert abs(subset - every) < 0.3 * every


def _model(width: int = 48):
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(
        nodes,
        [vi("x", [2, width])],
        [vi("y", [2, 32])],
        [init("W1", rng.standard_normal((width, 32)).astype(np.float32))],
    )


def test_fold_statistics_add_up_to_the_whole():
    model = _model()
    data = list(synthesize_inputs(model, iterations=16, seed=1))
    plan = build_plan(model, scoring="activation", repair=True, exclude=(), min_size=0, samples=data, folds=4)
    unit = plan.units[0]
    assert unit.folds is not None and len(unit.folds) == 4
    np.testing.assert_allclose(sum(unit.folds), unit.stats.gram, rtol=1e-9)
    whole = collect_input_stats(model, unit.layers, data)[unit.key]
    np.testing.assert_allclose(unit.stats.gram, whole.gram, rtol=1e-6)
    assert unit.stats.rows == whole.rows


def _correlated(samples: int, width: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((width, width)) * 0.3 + np.eye(width)
    return [{"x": (rng.standard_normal((2, width)) @ mixing).astype(np.float32)} for _ in range(samples)]


def test_choose_damping_prefers_strong_damping_on_few_rows():
    model = _model(width=96)
    few = _correlated(24, 96, seed=2)  # 48 rows for 96 input features
    plan = build_plan(model, scoring="activation", repair=True, exclude=(), min_size=0, samples=few, folds=4)
    plan.choose_damping((0.01, 1.0))
    unit = plan.units[0]
    assert unit.damp == 1.0 and unit.cv_error is not None
    assert (plan.pruned(0, unit.size // 2) == 0).sum() == unit.size // 2


def test_without_folds_the_damping_stays():
    model = _model()
    data = list(synthesize_inputs(model, iterations=16, seed=1))
    plan = build_plan(model, scoring="activation", repair=True, exclude=(), min_size=0, samples=data)
    plan.choose_damping()
    assert plan.units[0].folds is None and plan.units[0].cv_error is None
