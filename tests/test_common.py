"""The mechanisms the pass families share: back-off search, opset helpers, depthwise test, bounded statistics."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnxopt.passes.common.budget import search_smallest
from onnxopt.passes.common.graphs import opset_version, upgrade_opset
from onnxopt.passes.common.layers import find_layers, is_depthwise
from onnxopt.passes.common.stats import collect_input_stats

from onnxopt.data import Dataset
from onnxopt.graph import GraphIndex
from onnxopt.streaming import stream_tensors
from tests.builders import init, make_model, vi


@pytest.mark.parametrize("first_passing", [1, 2, 5, 9, 16])
def test_search_smallest_finds_the_first_passing_count_and_never_tries_the_ends(first_passing):
    tried: list[int] = []

    def passes(n: int) -> bool:
        tried.append(n)
        return n >= first_passing

    assert search_smallest(passes, 0, 16) == first_passing
    assert 0 not in tried and 16 not in tried
    assert len(tried) <= 4  # bisection: log2(16) probes


def test_opset_version_reads_the_default_domain_under_either_name():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
        opset=11,
        extra_opsets={"com.example": 3},
    )
    assert opset_version(model) == 11
    assert opset_version(model, "com.example") == 3 and opset_version(model, "com.other") == 0
    model.opset_import[0].domain = "ai.onnx"
    assert opset_version(model) == 11


def test_upgrade_opset_converts_and_says_why():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=11)
    notes: list[str] = []
    upgraded = upgrade_opset(model, 14, needed_for="HardSwish", otherwise="kept it", notes=notes)
    assert opset_version(upgraded) == 14 and opset_version(model) == 11
    assert notes == ["upgraded the model from opset 11 to 14 (HardSwish needs it)"]


def _conv(name: str, weight: np.ndarray, group: int) -> tuple:
    node = helper.make_node("Conv", ["x", name], [f"{name}_out"], name=name, group=group)
    return node, init(name, weight)


def test_is_depthwise_one_test_for_every_family():
    depthwise, w1 = _conv("dw", np.ones((8, 1, 3, 3)), 8)
    multiplier, w2 = _conv("dw2", np.ones((16, 1, 3, 3)), 8)  # two filters per channel
    grouped, w3 = _conv("grouped", np.ones((8, 2, 3, 3)), 4)
    dense, w4 = _conv("dense", np.ones((8, 8, 3, 3)), 1)
    single, w5 = _conv("single", np.ones((1, 1, 3, 3)), 1)  # one channel: a plain conv
    model = make_model(
        [depthwise, multiplier, grouped, dense],
        [vi("x", [1, 8, 5, 5])],
        [vi(f"{n}_out", None) for n in ("dw", "dw2", "grouped", "dense")],
        [w1, w2, w3, w4, w5],
    )
    index = GraphIndex(model.graph)
    assert is_depthwise(depthwise, index) and is_depthwise(multiplier, index)
    assert not is_depthwise(grouped, index) and not is_depthwise(dense, index) and not is_depthwise(single, index)
    # one filter per channel, as channel pruning needs
    assert is_depthwise(depthwise, index, 8) and not is_depthwise(multiplier, index, 8)
    assert is_depthwise(single, index, 1) and not is_depthwise(dense, index, 8)


def _three_layers():
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
        helper.make_node("MatMul", ["h", "w3"], ["z"]),
    ]
    rng = np.random.default_rng(0)
    model = make_model(
        nodes,
        [vi("x", [3, 4])],
        [vi("y", [3, 2]), vi("z", [3, 2])],
        [init(f"w{i}", rng.normal(size=(4 if i == 1 else 6, 6 if i == 1 else 2))) for i in (1, 2, 3)],
    )
    data = [{"x": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    return model, data


def test_stream_tensors_bounds_each_group_and_takes_graph_inputs_from_the_sample():
    model, data = _three_layers()
    seen: list[list[str]] = []
    groups = stream_tensors(model, ["x", "h", "r"], data, lambda values: seen.append(sorted(values)), memory_budget=1)
    assert groups == 2  # one byte: h and r each alone; x rides with the first group
    assert seen == [["h", "x"]] * len(data) + [["r"]] * len(data)


def test_layer_input_statistics_do_not_depend_on_the_memory_budget():
    model, data = _three_layers()
    layers, _ = find_layers(model.graph)
    whole = collect_input_stats(model, layers, Dataset(data), gram=True)
    grouped = collect_input_stats(model, layers, Dataset(data), gram=True, memory_budget=1)
    assert set(whole) == set(grouped) == {layer.key for layer in layers} and len(layers) == 3
    for key in whole:
        assert whole[key].rows == grouped[key].rows == 15
        np.testing.assert_array_equal(whole[key].gram, grouped[key].gram)
        np.testing.assert_array_equal(whole[key].total, grouped[key].total)


def test_gram_spread_adds_up_the_per_sample_grams_and_does_not_depend_on_the_memory_budget():
    model, data = _three_layers()
    layers, _ = find_layers(model.graph)
    whole = collect_input_stats(model, layers, Dataset(data), gram=True, spread=True)
    grouped = collect_input_stats(model, layers, Dataset(data), gram=True, spread=True, memory_budget=1)
    singles = [collect_input_stats(model, layers, [sample], gram=True) for sample in data]
    for key in whole:
        spread, other = whole[key].spread, grouped[key].spread
        assert spread is not None and other is not None and spread.samples == other.samples == len(data)
        grams = [s[key].gram for s in singles]
        rows = [s[key].rows for s in singles]
        np.testing.assert_allclose(spread.weighted, sum(r * g for r, g in zip(rows, grams, strict=True)))
        off = sum(np.sum(g**2) - np.sum(np.diagonal(g, axis1=1, axis2=2) ** 2) for g in grams)
        np.testing.assert_allclose(spread.off_squares.sum(), off)
        assert spread.rows_squared == sum(r * r for r in rows)
        np.testing.assert_array_equal(spread.weighted, other.weighted)
    assert all(s.spread is None for s in collect_input_stats(model, layers, Dataset(data), gram=True).values())
