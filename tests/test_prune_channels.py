from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnxopt.passes.common.linalg import augmented_gram
from onnxopt.passes.prune.channel_groups import describe_types, find_channel_groups
from onnxopt.passes.prune.channel_math import ConsumerSystem, refit, relative_error, removal_order
from onnxopt.passes.prune.channels import PruneChannels

from onnxopt.harness import synthesize_inputs
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent, init, make_model, unseen_inputs, vi

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
    for node, tensor in [
        _conv("W1", "x", "a", w1, pads=[1, 1, 1, 1]),
        _conv("W1" if shared else "W2", "x", "b", w1 if shared else w2),
        _conv("Wd", "r", "d", rng.standard_normal((16, 1, 3, 3)).astype(np.float32), group=16),
        _conv("W3", "s", "y", rng.standard_normal((8, 16, 1, 1)).astype(np.float32)),
    ]:
        nodes.append(node)
        if tensor.name not in [t.name for t in inits]:
            inits.append(tensor)
    bn = [
        init(n, v)
        for n, v in [
            ("g", rng.uniform(0.5, 1.5, 16)),
            ("beta", rng.standard_normal(16)),
            ("mu", rng.standard_normal(16)),
            ("var", rng.uniform(0.5, 1.5, 16)),
        ]
    ]
    nodes[1:1] = [
        helper.make_node("BatchNormalization", ["a", "g", "beta", "mu", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
    ]
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
    result = PruneChannels(ratio=0.3, budget=LOOSE)(model, Context(calibration=data))
    assert result.changed and result.stats["channels_removed"] == 8
    shapes = _shapes(result.model)
    assert shapes["W1"][0] == shapes["W2"][0] == shapes["Wd"][0] == shapes["W3"][1] == 8
    assert shapes["g"] == (8,)
    # the removed channels were constant: their effect moved into the consumer's bias
    assert_equivalent(model, result.model, profile="fp16", data=unseen_inputs(model))


@pytest.mark.parametrize("variant", ["output_tap", "concat", "shared"])
def test_must_not_fire(variant):
    model = _block_model(**{variant: True})
    groups = find_channel_groups(model.graph, describe_types(model))
    assert groups and all(g.blocked for g in groups)
    data = synthesize_inputs(model, iterations=8)
    result = PruneChannels(ratio=0.3, budget=LOOSE)(model, Context(calibration=data))
    assert not result.changed and any("left alone" in n for n in result.notes)


def test_budget_search_holds_under_the_harness():
    model = _block_model(dead=2)
    data = synthesize_inputs(model, iterations=16, seed=2)
    result = PruneChannels(multiple=2)(model, Context(calibration=data))
    assert result.changed and result.stats["channels_removed"] >= 2
    assert any(n.startswith("result on the 4-fold cross-fitted samples") for n in result.notes), result.notes
    assert_equivalent(model, result.model, profile="int8", data=unseen_inputs(model))


# --------------------------------------------------------------------------- Resize, Concat (FPN heads)


def _fpn_model(*, concat_reader: str = "Conv", nested: bool = False):
    """Conv A (8) and Conv B (8) on x, each upsampled by Resize, concatenated with an upsampled x, read by Conv C.

    A has 3 dead channels and B 2 (constant = their bias): removing them is exact once the
    consumer C moves their constants into its bias, at each group's offset in the Concat.
    """
    rng = np.random.default_rng(3)
    wa, wb = (rng.standard_normal((8, 4, 3, 3)).astype(np.float32) for _ in range(2))
    wa[:3] = 0
    wb[5:] = 0
    ba, bb = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    scales = init("scales", [1, 1, 2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "WA", "BA"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "WB", "BB"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"]),
    ]
    nodes += [helper.make_node("Resize", [t, "", "scales"], [f"{t}_up"], mode="nearest") for t in ("a", "br", "x")]
    nodes.append(helper.make_node("Concat", ["a_up", "x_up", "br_up"], ["c"], axis=1))
    inits = [init("WA", wa), init("BA", ba), init("WB", wb), init("BB", bb), scales]
    if concat_reader == "Conv":
        nodes.append(helper.make_node("Conv", ["c", "WC"], ["y"]))
        inits.append(init("WC", rng.standard_normal((6, 20, 1, 1)).astype(np.float32)))
    else:
        nodes.append(helper.make_node(concat_reader, ["c"], ["y"]))
    outputs = [vi("y", [1, 6 if concat_reader == "Conv" else 20, 20, 20])]
    if nested:
        branch = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [], [vi("t", None)])
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
            helper.make_node("Greater", ["sx", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch),
        ]
        inits.append(init("zero", np.zeros((), np.float32)))
        outputs.append(vi("z", None))
    return make_model(nodes, [vi("x", [1, 4, 10, 10])], outputs, inits)


def test_concat_consumer_reads_each_group_at_its_offset():
    from onnxopt.passes.prune.channel_plan import build_channel_plan

    model = _fpn_model()
    groups = {g.key: g for g in find_channel_groups(model.graph, describe_types(model))}
    assert groups["a"].blocked is None and groups["b"].blocked is None
    conv_c = groups["a"].consumers[0]
    assert groups["a"].offset(conv_c) == (0, 20) and groups["b"].offset(conv_c) == (12, 20)
    assert {"a_up", "c"} <= set(groups["a"].tensors)
    data = synthesize_inputs(model, iterations=16)
    plan = build_channel_plan(model, list(data)[:12], multiple=1)
    counts = [{"a": 3, "b": 3}[p.group.key] for p in plan.groups]
    assert sorted(int(c) for c in plan.groups[0].order[:3]) == [0, 1, 2]
    pruned = plan.apply(model, counts)
    shapes = _shapes(pruned)
    assert shapes["WA"][0] == 5 and shapes["WB"][0] == 5 and shapes["WC"][1] == 5 + 4 + 5
    # B loses its 3 dead channels only if the re-fit happened at B's offset (12), not at A's
    assert sorted(int(c) for c in plan.groups[1].order[:3]) == [5, 6, 7]
    assert_equivalent(model, pruned, profile="fp16", data=unseen_inputs(model))


@pytest.mark.parametrize(
    ("reader", "nested", "reason"),
    [
        ("Relu", False, "concatenated into 'c', which is read by Relu"),
        ("Conv", True, "read by a graph nested in If"),
    ],
)
def test_concat_or_nested_readers_block(reader, nested, reason):
    model = _fpn_model(concat_reader=reader, nested=nested)
    groups = {g.key: g for g in find_channel_groups(model.graph, describe_types(model))}
    assert reason in (groups["a"].blocked or "")


def test_resize_of_the_channel_axis_blocks():
    model = _fpn_model()
    for t in model.graph.initializer:
        if t.name == "scales":
            t.CopyFrom(init("scales", [1, 2, 2, 2]))
    groups = {g.key: g for g in find_channel_groups(model.graph, describe_types(model))}
    assert "resizes the channel axis" in (groups["a"].blocked or "")


def test_independent_gram_only_moves_means():
    from onnxopt.passes.prune.channel_math import independent_gram

    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6)) + np.arange(6)  # 5 rows for 6 features: XᵀX is singular
    gram, mean = x.T @ x / 5, x.mean(0)
    system = ConsumerSystem(
        np.concatenate([rng.standard_normal((3, 6)), np.zeros((3, 1))], 1),
        augmented_gram(independent_gram(gram, mean), mean),
        1,
    )
    keep = np.array([0, 2, 3, 4, 5])
    fitted = refit(system, keep, damp=1e-12)
    # kept weights unchanged; the bias takes the removed feature's mean contribution
    np.testing.assert_allclose(fitted[:, :-1], system.weight[:, keep], atol=1e-9)
    np.testing.assert_allclose(fitted[:, -1], system.weight[:, 1] * mean[1], atol=1e-9)


@pytest.mark.parametrize(
    ("scales", "attrs", "blocked"),
    [
        ([2, 2], {"axes": [2, 3]}, None),
        ([2, 2], {"axes": [-1, -2]}, None),
        ([2, 2], {"axes": [1, 2]}, "resizes the channel axis"),
        ([1, 1, 2, 2], {"coordinate_transformation_mode": "tf_crop_and_resize"}, "crops"),
    ],
)
def test_resize_axes_and_crop(scales, attrs, blocked):
    model = _fpn_model()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 18))  # Resize's axes attribute
    model.graph.initializer.append(init("scales_a", scales))
    resize = next(n for n in model.graph.node if n.op_type == "Resize" and n.input[0] == "a")
    resize.input[2] = "scales_a"
    resize.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    group = next(g for g in find_channel_groups(model.graph, describe_types(model)) if g.key == "a")
    assert (group.blocked is None) if blocked is None else blocked in (group.blocked or "")
