"""split_lowrank with joint query/key head narrowing wired into its budgeted allocation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxopt.passes.lowrank.heads import find_head_pairs, head_error_curve, joint_qk
from onnxopt.passes.lowrank.plan import apply_ranks, plan_lowrank
from onnxopt.passes.lowrank.ranks import RankCandidate, WidthCandidate, allocate_ranks
from onnxopt.passes.lowrank.split import SplitLowRank

from onnxopt.data import Dataset
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent, init, make_model, vi

K, HEADS, D = 32, 4, 8


def _attention(seed: int = 0, *, form_rank: int = 2, noise: float = 1e-3) -> onnx.ModelProto:
    """Return one self-attention block ``softmax(q·kᵀ/√d)·v → output projection`` of 4 heads of width 8.

    Each head's query–key form ``Wq_h·Wk_hᵀ`` has rank ``form_rank`` (plus ``noise``).
    """
    rng = np.random.default_rng(seed)
    wq, wk = [], []
    for _ in range(HEADS):
        shared = rng.standard_normal((form_rank, D))
        wq.append(rng.standard_normal((K, form_rank)) @ shared / np.sqrt(K))
        wk.append(rng.standard_normal((K, form_rank)) @ rng.standard_normal((form_rank, D)) / np.sqrt(K))
    wq_all = np.hstack(wq) + noise * rng.standard_normal((K, HEADS * D))
    wk_all = np.hstack(wk) + noise * rng.standard_normal((K, HEADS * D))
    inits = [
        init("wq", wq_all),
        init("bq", 0.1 * rng.standard_normal(HEADS * D)),
        init("wk", wk_all),
        init("bk", 0.1 * rng.standard_normal(HEADS * D)),
        init("wv", rng.standard_normal((K, K)) / np.sqrt(K)),
        init("bv", np.zeros(K)),
        init("wo", rng.standard_normal((K, K)) / np.sqrt(K)),
        init("heads", [0, 0, HEADS, D], np.int64),
        init("merged", [0, 0, K], np.int64),
        init("scale", np.array(np.sqrt(D), dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["mq"]),
        helper.make_node("Add", ["mq", "bq"], ["aq"]),
        helper.make_node("Reshape", ["aq", "heads"], ["rq"]),
        helper.make_node("Transpose", ["rq"], ["tq"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["x", "wk"], ["mk"]),
        helper.make_node("Add", ["mk", "bk"], ["ak"]),
        helper.make_node("Reshape", ["ak", "heads"], ["rk"]),
        helper.make_node("Transpose", ["rk"], ["tk"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["tq", "tk"], ["scores"]),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["x", "wv"], ["mv"]),
        helper.make_node("Add", ["mv", "bv"], ["av"]),
        helper.make_node("Reshape", ["av", "heads"], ["rv"]),
        helper.make_node("Transpose", ["rv"], ["tv"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["probs", "tv"], ["context"]),
        helper.make_node("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merged"], ["cm"]),
        helper.make_node("MatMul", ["cm", "wo"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [1, "S", K])], [vi("y", [1, "S", K])], inits)


def _data(seed: int, count: int = 16) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        [{"x": rng.standard_normal((1, int(rng.integers(4, 12)), K)).astype(np.float32)} for _ in range(count)]
    )


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_error_curve_on_the_fitted_moments_is_the_joint_error(rank):
    rng = np.random.default_rng(rank)
    tq, tk = rng.standard_normal((K + 1, HEADS * D)), rng.standard_normal((K + 1, HEADS * D))
    x = np.hstack([rng.standard_normal((90, K)) * np.linspace(0.3, 2, K), np.ones((90, 1))])
    gram = x.T @ x / len(x)
    curve = head_error_curve(tq, tk, gram, gram, HEADS, ridge=0.0)
    assert curve[rank] == pytest.approx(joint_qk(tq, tk, gram, gram, HEADS, rank, ridge=0.0)[2], rel=1e-6)
    assert curve[0] == 1.0 and curve[D] == 0.0
    assert np.all(np.diff(curve) <= 1e-12)


def test_held_out_error_curve_is_the_score_error_on_new_inputs():
    rng = np.random.default_rng(11)
    tq, tk = rng.standard_normal((K + 1, HEADS * D)), rng.standard_normal((K + 1, HEADS * D))

    def augmented(rows: int) -> np.ndarray:
        return np.hstack([rng.standard_normal((rows, K)) * np.exp(rng.standard_normal(K)), np.ones((rows, 1))])

    fit, new = augmented(60), augmented(70)
    g_fit, g_new = fit.T @ fit / len(fit), new.T @ new / len(new)
    curve = head_error_curve(tq, tk, g_fit, g_fit, HEADS, g_new, g_new, ridge=0.0)
    for rank in (2, 5):
        nq, nk, _ = joint_qk(tq, tk, g_fit, g_fit, HEADS, rank, ridge=0.0)
        before = [(new @ tq)[:, h * D : (h + 1) * D] @ (new @ tk)[:, h * D : (h + 1) * D].T for h in range(HEADS)]
        after = [
            (new @ nq)[:, h * rank : (h + 1) * rank] @ (new @ nk)[:, h * rank : (h + 1) * rank].T for h in range(HEADS)
        ]
        measured = sum(np.sum((a - b) ** 2) for a, b in zip(after, before, strict=True)) / sum(
            np.sum(b**2) for b in before
        )
        assert measured == pytest.approx(curve[rank], rel=1e-5)


def test_allocation_mixes_splits_and_head_widths_monotonely():
    rng = np.random.default_rng(2)
    split_error = 1 - np.concatenate([[0], np.cumsum(np.sort(rng.random(32))[::-1])]) / 16
    width_error = np.linspace(1, 0, D + 1) ** 3
    candidates = [RankCandidate(np.clip(split_error, 0, 1), 32, 64, 19), WidthCandidate(width_error, 64, 64 * D, 7)]
    params = [
        sum(c.params(r) for c, r in zip(candidates, allocate_ranks(candidates, price), strict=True))
        for price in (1e-4, 1e-2, 1e-1, 1.0, 10.0)
    ]
    assert params == sorted(params, reverse=True)
    assert params[0] == 32 * 64 + 64 * D and params[-1] < params[0]


# --------------------------------------------------------------------------- pass


def test_pass_narrows_heads_within_the_budget():
    model = _attention()
    data = _data(1)
    result = SplitLowRank(min_params=0)(model, Context(calibration=data))
    assert result.changed and result.stats["head_pairs"] == 1 and result.stats["head_pairs_narrowed"] == 1
    weights = _weights(result.model)
    width = weights["wq"].shape[1] // HEADS
    assert 1 <= width < D and weights["wk"].shape == (K, HEADS * width) and weights["bq"].shape == (HEADS * width,)
    # the query/key projections are narrowed, never also split into two factors
    assert not any(name.startswith(("wq_lowrank", "wk_lowrank")) for name in weights)
    note = next(n for n in result.notes if n.startswith("heads mq / mk"))
    assert f"head width {width} of {D}" in note and f"{2 * K * HEADS * D} -> {2 * K * HEADS * width}" in note
    assert result.stats["params_saved"] >= 2 * K * HEADS * (D - width)
    assert_equivalent(model, result.model, profile="int8", data=data.split()[1])
    assert_equivalent(model, result.model, profile="int8", data=_data(2, 8))


def test_pass_keeps_full_head_width_when_every_narrowing_breaks_the_budget():
    model = _attention(3, form_rank=D, noise=0.0)
    result = SplitLowRank(min_params=0, budget=0.999999)(model, Context(calibration=_data(4)))
    weights = _weights(result.model)
    assert weights["wq"].shape == (K, HEADS * D)
    if result.changed:
        assert any("head width 8 kept" in n for n in result.notes)


def test_heads_off_leaves_query_and_key_to_the_split_path():
    model = _attention()
    data = _data(1)
    off = plan_lowrank(
        model,
        Context(),
        whiten=True,
        min_params=0,
        include_conv1x1=False,
        min_saving=0.1,
        samples=list(data),
        heads=False,
    )
    on = plan_lowrank(
        model,
        Context(),
        whiten=True,
        min_params=0,
        include_conv1x1=False,
        min_saving=0.1,
        samples=list(data),
        heads=True,
    )
    assert {"mq", "mk"} <= {layer.key for layer in off.layers} and not off.pairs
    assert not {"mq", "mk"} & {layer.key for layer in on.layers} and len(on.pairs) == 1
    result = SplitLowRank(min_params=0, heads=False)(model, Context(calibration=data))
    assert "head_pairs" not in result.stats and not any("head width" in n for n in result.notes)
    weights = _weights(result.model)
    assert "wq" not in weights or weights["wq"].shape == (K, HEADS * D)
    if result.changed:
        assert_equivalent(model, result.model, profile="int8", data=data.split()[1])


def test_explicit_rank_uses_the_split_path_and_says_so():
    model = _attention()
    result = SplitLowRank(rank=4, min_params=0)(model, Context(calibration=_data(1)))
    assert "head_pairs" not in result.stats
    assert any("split as ordinary layers" in n for n in result.notes)


def test_apply_ranks_combines_splits_and_head_widths():
    model = _attention(form_rank=2, noise=0.0)
    data = _data(5)
    plan = plan_lowrank(
        model,
        Context(),
        whiten=True,
        min_params=0,
        include_conv1x1=False,
        min_saving=0.1,
        samples=list(data),
        heads=True,
    )
    ranks = [0] * len(plan.layers) + [2]
    narrowed = apply_ranks(model, plan, ranks)
    assert _weights(narrowed)["wq"].shape == (K, HEADS * 2)
    assert_equivalent(model, narrowed, profile="int8", data=_data(6, 6))
    assert apply_ranks(model, plan, [0] * (len(plan.layers) + 1)) == model


def test_unmatched_attention_is_noted():
    model = _attention()
    nodes = list(model.graph.node)
    position = next(i for i, n in enumerate(nodes) if list(n.output) == ["tk"])
    # the key goes through two Transposes: not the matched head pattern
    nodes[position] = helper.make_node("Transpose", ["rk"], ["tk0"], perm=[0, 2, 1, 3])
    nodes.insert(position + 1, helper.make_node("Transpose", ["tk0"], ["tk"], perm=[0, 1, 3, 2]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    assert find_head_pairs(model) == []
    result = SplitLowRank(min_params=0)(model, Context(calibration=_data(1)))
    assert any(n.startswith("attention scores scores:") for n in result.notes)


@pytest.mark.parametrize("heads", [True, False])
def test_cli_recipe_narrows_heads_by_default(tmp_path, capsys, heads):
    from onnxopt.cli import main
    from onnxopt.model import save_model

    model = _attention()
    source = save_model(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(8)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, 8, K)).astype(np.float32))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "split_lowrank"\nmin_params = 0\n' + ("" if heads else "heads = false\n"))
    out = tmp_path / "out.onnx"
    code = main([str(a) for a in ["optimize", source, "-o", out, "--pipeline", recipe, "--calib", data]])
    capsys.readouterr()
    assert code == 0
    weights = _weights(onnx.load(str(out)))
    if heads:
        assert weights["wq"].shape[1] < HEADS * D
    else:  # split into two factors by the old path, or left dense: never narrowed
        assert "wq" not in weights or weights["wq"].shape == (K, HEADS * D)
