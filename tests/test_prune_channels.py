from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnxopt.passes._prune_channel_math import ConsumerSystem, augmented_gram, refit, relative_error, removal_order
from onnxopt.passes._prune_channels import describe_types, find_channel_groups
from onnxopt.passes.prune import prune_channels

from onnxopt.data import Dataset
from onnxopt.harness import synthesize_inputs
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent, init, make_model, vi

LOOSE = {"min_cosine": 0.9, "min_sqnr_db": 5.0, "min_top1": 0.0}

# --------------------------------------------------------------------------- math


def test_refit_folds_a_constant_channel_into_the_bias():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6))
    x[:, 2] = 3.0  # a constant channel carries only its mean
    w = np.concatenate([rng.standard_normal((4, 6)), rng.standard_normal((4, 1))], 1)
    h = augmented_gram(x.T @ x / 500, x.mean(0))
    system = ConsumerSystem(w, h, 1)
    order, errors = removal_order([system], 6)
    assert order[0] == 2 and errors[1] < 1e-4
    keep = np.array([0, 1, 3, 4, 5])
    assert relative_error(system, keep, refit(system, keep, damp=1e-9)) < 1e-9


# --------------------------------------------------------------------------- graphs


def _conv(name: str, x: str, y: str, w: np.ndarray, **attrs) -> tuple:
    return helper.make_node("Conv", [x, name], [y], name=y, **attrs), init(name, w)


def _block_model(*, dead: int = 8, output_tap: bool = False, concat: bool = False, shared: bool = False):
    """Conv(16) → BN → Relu → depthwise → Add(residual Conv(16)) → Conv(8): one group of 16 channels."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    w1[:dead] = 0  # dead channels: constant after BN, free to remove exactly
    w2 = w1.copy() if shared else rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    w2[:dead] = 0
    nodes, inits = [], []
    for node, tensor in [_conv("W1", "x", "a", w1, pads=[1, 1, 1, 1]),
                         _conv("W1" if shared else "W2", "x", "b", w1 if shared else w2),
                         _conv("Wd", "r", "d", rng.standard_normal((16, 1, 3, 3)).astype(np.float32), group=16),
                         _conv("W3", "s", "y", rng.standard_normal((8, 16, 1, 1)).astype(np.float32))]:
        nodes.append(node)
        if tensor.name not in [t.name for t in inits]:
            inits.append(tensor)
    bn = [init(n, v) for n, v in [("g", rng.uniform(0.5, 1.5, 16)), ("beta", rng.standard_normal(16)),
                                  ("mu", rng.standard_normal(16)), ("var", rng.uniform(0.5, 1.5, 16))]]
    nodes[1:1] = [helper.make_node("BatchNormalization", ["a", "g", "beta", "mu", "var"], ["n"]),
                  helper.make_node("Relu", ["n"], ["r"])]
    nodes.insert(-1, helper.make_node("Add", ["d", "b"], ["s"]))
    outputs = [vi("y", [1, 8, 8, 8])]
    if output_tap:
        outputs.append(vi("r", [1, 16, 10, 10]))
    if concat:
        nodes.append(helper.make_node("Concat", ["s", "s"], ["c"], axis=1))
        outputs.append(vi("c", [1, 32, 8, 8]))
    return make_model(nodes, [vi("x", [1, 4, 10, 10])], outputs, [*inits, *bn])


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {t.name.split("__")[0]: tuple(t.dims) for t in model.graph.initializer}


def test_group_runs_through_bn_depthwise_and_add():
    model = _block_model()
    groups = find_channel_groups(model.graph, describe_types(model))
    (group,) = [g for g in groups if "a" in g.tensors]
    assert [g.blocked for g in groups if g is not group] == ["'y' is a graph output"]
    assert group.blocked is None and group.channels == 16
    assert sorted(n.output[0] for n in group.sources) == ["a", "b"]
    assert [n.output[0] for n in group.consumers] == ["y"]
    assert {"n", "r", "d", "s"} <= set(group.tensors)


def test_dead_channels_are_removed_in_both_residual_producers():
    model = _block_model()
    data = synthesize_inputs(model, iterations=16)
    result = prune_channels(ratio=0.3, budget=LOOSE)(model, Context(calibration=data))
    assert result.changed and result.stats["channels_removed"] == 8
    shapes = _shapes(result.model)
    assert shapes["W1"][0] == shapes["W2"][0] == shapes["Wd"][0] == shapes["W3"][1] == 8
    assert shapes["g"] == (8,)
    # the removed channels were constant: their effect moved into the consumer's bias
    assert_equivalent(model, result.model, profile="fp16", data=Dataset(list(data)[12:]))


@pytest.mark.parametrize("variant", ["output_tap", "concat", "shared"])
def test_must_not_fire(variant):
    model = _block_model(**{variant: True})
    groups = find_channel_groups(model.graph, describe_types(model))
    assert groups and all(g.blocked for g in groups)
    data = synthesize_inputs(model, iterations=8)
    result = prune_channels(ratio=0.3, budget=LOOSE)(model, Context(calibration=data))
    assert not result.changed and any("left alone" in n for n in result.notes)


def test_budget_search_holds_under_the_harness():
    model = _block_model(dead=2)
    data = synthesize_inputs(model, iterations=16, seed=2)
    result = prune_channels(multiple=2)(model, Context(calibration=data))
    assert result.changed and result.stats["channels_removed"] >= 2
    assert_equivalent(model, result.model, profile="int8", data=Dataset(list(data)[12:]))
