"""Joint low rank of the per-head query–key form (passes/lowrank/heads.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxopt.passes.lowrank.heads import apply_head_ranks, find_head_pairs, joint_qk, plan_head_pairs

from onnxopt.runtime import run_model
from tests.builders import init, make_model, vi

K, HEADS, D = 8, 2, 4


def _scores(tq: np.ndarray, tk: np.ndarray, x: np.ndarray, y: np.ndarray, heads: int) -> np.ndarray:
    """Return the per-head score matrices ``[heads, rows of x, rows of y]`` of augmented weights."""
    q = np.hstack([x, np.ones((len(x), 1))]) @ tq
    k = np.hstack([y, np.ones((len(y), 1))]) @ tk
    width = q.shape[1] // heads
    return np.stack([q[:, h * width : (h + 1) * width] @ k[:, h * width : (h + 1) * width].T for h in range(heads)])


def _augmented_gram(x: np.ndarray) -> np.ndarray:
    a = np.hstack([x, np.ones((len(x), 1))])
    return a.T @ a / len(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_head_width_keeps_every_score(seed):
    rng = np.random.default_rng(seed)
    tq, tk = rng.standard_normal((K + 1, HEADS * D)), rng.standard_normal((K + 1, HEADS * D))
    x, y = rng.standard_normal((50, K)), rng.standard_normal((60, K)) + 0.5
    new_q, new_k, error = joint_qk(tq, tk, _augmented_gram(x), _augmented_gram(y), HEADS, D)
    np.testing.assert_allclose(_scores(new_q, new_k, x, y, HEADS), _scores(tq, tk, x, y, HEADS), atol=1e-8)
    assert error == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_reported_error_is_the_score_error_and_beats_dropping_columns(rank):
    rng = np.random.default_rng(rank)
    tq, tk = rng.standard_normal((K + 1, HEADS * D)), rng.standard_normal((K + 1, HEADS * D))
    x = rng.standard_normal((80, K)) * np.linspace(0.2, 3.0, K)
    y = rng.standard_normal((70, K)) * np.linspace(3.0, 0.2, K)
    new_q, new_k, error = joint_qk(tq, tk, _augmented_gram(x), _augmented_gram(y), HEADS, rank, ridge=0.0)
    reference = _scores(tq, tk, x, y, HEADS)
    measured = np.sum((_scores(new_q, new_k, x, y, HEADS) - reference) ** 2) / np.sum(reference**2)
    # over all query/key pairs of the calibration rows the expected error is exact
    assert measured == pytest.approx(error, rel=1e-6)
    kept = np.concatenate([np.arange(h * D, h * D + rank) for h in range(HEADS)])
    naive = _scores(tq[:, kept], tk[:, kept], x, y, HEADS)
    assert measured <= np.sum((naive - reference) ** 2) / np.sum(reference**2)


def _attention_model(
    rng: np.random.Generator, *, true_rank: int = D, concat: bool = False, shared_weight: bool = False
) -> onnx.ModelProto:
    """Return ``scores = MatMul(T(Reshape(x·Wq + bq)), T(Reshape(x·Wk + bk)))`` for 2 heads of width 4."""
    basis = rng.standard_normal((K, true_rank))
    wq = np.hstack([basis @ rng.standard_normal((true_rank, D)) for _ in range(HEADS)])
    wk = np.hstack([basis @ rng.standard_normal((true_rank, D)) for _ in range(HEADS)])
    inits = [
        init("wq", wq),
        init("bq", np.zeros(HEADS * D)),
        init("wk", wk),
        init("bk", np.zeros(HEADS * D)),
        init("shape", [0, 0, HEADS, D], np.int64),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["mq"]),
        helper.make_node("Add", ["mq", "bq"], ["aq"]),
        helper.make_node("MatMul", ["x", "wq" if shared_weight else "wk"], ["mk"]),
        helper.make_node("Add", ["bk", "mk"], ["ak"]),
    ]
    if concat:
        inits += [
            init("s0", [1], np.int64),
            init("s1", [-1], np.int64),
            init("sh", [HEADS], np.int64),
            init("sd", [D], np.int64),
        ]
        nodes += [
            helper.make_node("Concat", ["s0", "s1", "sh", "sd"], ["cq"], axis=0),
            helper.make_node("Concat", ["s0", "s1", "sh", "sd"], ["ck"], axis=0),
        ]
    nodes += [
        helper.make_node("Reshape", ["aq", "cq" if concat else "shape"], ["rq"]),
        helper.make_node("Reshape", ["ak", "ck" if concat else "shape"], ["rk"]),
        helper.make_node("Transpose", ["rq"], ["tq"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["rk"], ["tk"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["tq", "tk"], ["scores"]),
    ]
    return make_model(nodes, [vi("x", [1, "S", K])], [vi("scores", [1, HEADS, "S", "S"])], inits)


def _samples(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((1, int(rng.integers(3, 9)), K)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("concat", [False, True])
def test_narrowing_to_the_true_rank_keeps_the_scores(concat):
    rng = np.random.default_rng(7)
    model = _attention_model(rng, true_rank=2, concat=concat)
    pairs = plan_head_pairs(model, _samples(rng, 6))
    assert len(pairs) == 1 and (pairs[0].heads, pairs[0].head_dim, pairs[0].input_dim) == (HEADS, D, K)
    narrowed = apply_head_ranks(model, pairs, [2])
    onnx.checker.check_model(narrowed)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in narrowed.graph.initializer}
    assert weights["wq"].shape == (K, HEADS * 2) and weights["wk"].shape == (K, HEADS * 2)
    held = _samples(rng, 4)
    for before, after in zip(run_model(model, held), run_model(narrowed, held), strict=True):
        np.testing.assert_allclose(after["scores"], before["scores"], rtol=1e-3, atol=1e-3)


def test_rank_zero_or_full_width_leaves_the_model_unchanged():
    rng = np.random.default_rng(3)
    model = _attention_model(rng)
    pairs = plan_head_pairs(model, _samples(rng, 4))
    for rank in (0, D):
        assert apply_head_ranks(model, pairs, [rank]) == model


def test_shared_weight_is_not_matched():
    model = _attention_model(np.random.default_rng(4), shared_weight=True)
    assert find_head_pairs(model) == []


def test_shape_read_at_the_head_axis_is_not_matched():
    model = _attention_model(np.random.default_rng(5))
    graph = model.graph
    graph.initializer.append(init("axis2", np.array(2), np.int64))
    graph.node.extend(
        [helper.make_node("Shape", ["aq"], ["shape_q"]), helper.make_node("Gather", ["shape_q", "axis2"], ["width"])]
    )
    graph.output.append(vi("width", [], onnx.TensorProto.INT64))
    assert find_head_pairs(model) == []
