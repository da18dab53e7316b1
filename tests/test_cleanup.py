"""Unit tests of the exact clean-up passes on tiny graphs, including where they must not fire."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.builders import assert_equivalent, init, make_model, ops, vi
from tests.builders import run_pass as run


def if_model(then_nodes, else_nodes, then_out, else_out, cond_init=None, initializers=(), opset=17):
    then_graph = helper.make_graph(then_nodes, "then", [], [vi(then_out, [2, 3])])
    else_graph = helper.make_graph(else_nodes, "else", [], [vi(else_out, [2, 3])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    inputs = [vi("x", [2, 3])]
    inits = list(initializers)
    if cond_init is None:
        inputs.append(vi("cond", [1], TensorProto.BOOL))  # a 0-D bool input trips synthesize_inputs
    else:
        inits.append(init("cond", cond_init, np.bool_))
    return make_model([node], inputs, [vi("y", [2, 3])], inits, opset=opset)


# --------------------------------------------------------------------------- fold_constants


def test_fold_constants_folds_constant_subgraph():
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [init("a", np.ones(3)), init("b", np.arange(3))],
    )
    result = run("fold_constants", model)
    assert result.stats == {"folded": 1}
    assert ops(result.model) == ["Mul"]
    assert_equivalent(model, result.model)


def test_fold_constants_respects_size_cap():
    shape = init("shape", [1000, 1000], np.int64)
    model = make_model(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])],
        [vi("x", [1000, 1000])],
        [vi("y", [1000, 1000])],
        [shape],
    )
    result = run("fold_constants", model)
    assert "ConstantOfShape" in ops(result.model)
    assert any("size cap" in note for note in result.notes)


@pytest.mark.parametrize("op", ["DequantizeLinear", "RandomUniformLike"])
def test_fold_constants_never_folds_qdq_or_random(op):
    if op == "DequantizeLinear":
        node = helper.make_node(op, ["q", "scale"], ["d"])
        inits = [init("q", [1, 2, 3], np.int8), init("scale", 0.5)]
    else:
        node = helper.make_node(op, ["q"], ["d"])
        inits = [init("q", [1.0, 2.0, 3.0])]
    model = make_model([node, helper.make_node("Add", ["x", "d"], ["y"])], [vi("x", [3])], [vi("y", [3])], inits)
    result = run("fold_constants", model)
    assert op in ops(result.model)
    assert not result.changed


def test_fold_constants_leaves_unknown_domain_alone():
    node = helper.make_node("Twice", ["a"], ["b"], domain="com.example")
    model = make_model(
        [node, helper.make_node("Add", ["x", "b"], ["y"])],
        [vi("x", [3])],
        [vi("y", [3])],
        [init("a", [1.0, 2.0, 3.0])],
        extra_opsets={"com.example": 1},
    )
    result = run("fold_constants", model)
    assert ops(result.model) == ["Twice", "Add"]
    assert any("unknown domain" in note for note in result.notes)


def test_fold_constants_inside_body_reads_outer_constant():
    then_nodes = [helper.make_node("Neg", ["w"], ["nw"]), helper.make_node("Add", ["x", "nw"], ["t"])]
    else_nodes = [helper.make_node("Sub", ["x", "w"], ["e"])]
    model = if_model(then_nodes, else_nodes, "t", "e", initializers=[init("w", [1.0, 2.0, 3.0])])
    result = run("fold_constants", model)
    assert result.stats == {"folded": 1}
    assert "Neg" not in ops(result.model)
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("condition", [True, False])
def test_fold_constants_inlines_if_with_constant_condition(condition):
    then_nodes = [helper.make_node("Relu", ["x"], ["t"])]
    else_nodes = [helper.make_node("Neg", ["x"], ["e"])]
    model = if_model(then_nodes, else_nodes, "t", "e", cond_init=condition)
    result = run("fold_constants", model)
    assert ops(result.model) == ["Relu" if condition else "Neg"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_equivalent(model, result.model)


# --------------------------------------------------------------------------- simplify_shapes


def shape_chain(x_shape, index):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
        helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "df"], ["y"]),
    ]
    return make_model(nodes, [vi("x", x_shape)], [vi("y", x_shape)], [init("i", index, np.int64)])


def test_simplify_shapes_resolves_static_dim_of_dynamic_tensor():
    model = shape_chain(["N", 3], 1)
    result = run("simplify_shapes", model)
    assert "Gather" not in ops(result.model)
    assert_equivalent(model, result.model)


def test_simplify_shapes_keeps_dynamic_dim():
    model = shape_chain(["N", 3], 0)
    result = run("simplify_shapes", model)
    assert not result.changed
    assert ops(result.model)[:2] == ["Shape", "Gather"]


def test_simplify_shapes_reshape_copies_own_dynamic_dims():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", ["N", 3, 4])],
        [vi("y", ["N", 12])],
        [init("zero", 0, np.int64), init("axes", [0], np.int64), init("minus_one", [-1], np.int64)],
    )
    result = run("simplify_shapes", model)
    assert result.stats == {"reshape_targets_resolved": 1}
    cleaned = run("eliminate_dead_code", result.model).model
    assert ops(cleaned) == ["Reshape"]
    assert_equivalent(model, cleaned, shapes={"x": (5, 3, 4)})


# --------------------------------------------------------------------------- remove_identities


def test_remove_identities_keeps_graph_output_name():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    result = run("remove_identities", model)
    assert ops(result.model) == ["Relu"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_equivalent(model, result.model)


def test_remove_identities_keeps_identity_from_input_to_output():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    result = run("remove_identities", model)
    assert ops(result.model) == ["Identity"]


def test_remove_identities_keeps_body_identity_of_outer_value():
    then_nodes = [helper.make_node("Identity", ["x"], ["t"])]
    else_nodes = [helper.make_node("Neg", ["x"], ["e"])]
    model = if_model(then_nodes, else_nodes, "t", "e")
    result = run("remove_identities", model)
    assert "Identity" in ops(result.model)
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    ("node", "inits"),
    [
        (helper.make_node("Dropout", ["r"], ["z"]), []),
        (helper.make_node("Cast", ["r"], ["z"], to=TensorProto.FLOAT), []),
        (helper.make_node("Reshape", ["r", "shape"], ["z"]), [init("shape", [2, -1], np.int64)]),
        (helper.make_node("Transpose", ["r"], ["z"], perm=[0, 1]), []),
        (helper.make_node("Pad", ["r", "pads"], ["z"]), [init("pads", [0, 0, 0, 0], np.int64)]),
        (helper.make_node("Slice", ["r", "st", "en"], ["z"]), [init("st", [0], np.int64), init("en", [99], np.int64)]),
        (helper.make_node("Expand", ["r", "shape"], ["z"]), [init("shape", [1, 1], np.int64)]),
    ],
)
def test_remove_identities_removes_noops(node, inits):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), node, helper.make_node("Neg", ["z"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)
    result = run("remove_identities", model)
    assert ops(result.model) == ["Relu", "Neg"]
    assert_equivalent(model, result.model)


def test_remove_identities_keeps_dropout_with_used_mask_and_dynamic_reshape():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Reshape", ["d", "shape"], ["y"])]
    model = make_model(
        nodes,
        [vi("x", ["N", 3])],
        [vi("y", None), vi("mask", None, TensorProto.BOOL)],
        [init("shape", [-1, 3], np.int64)],
    )
    result = run("remove_identities", model)
    assert ops(result.model) == ["Dropout", "Reshape"]


def test_remove_identities_merges_transposes_and_slices():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 2, 0]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[2, 0, 1]),
        helper.make_node("Slice", ["t2", "s0", "e0", "a0"], ["s1"]),
        helper.make_node("Slice", ["s1", "s0", "e0", "a1"], ["y"]),
    ]
    inits = [init("s0", [1], np.int64), init("e0", [3], np.int64), init("a0", [0], np.int64), init("a1", [2], np.int64)]
    model = make_model(nodes, [vi("x", [4, 5, 6])], [vi("y", [2, 5, 2])], inits)
    result = run("remove_identities", model)
    cleaned = run("eliminate_dead_code", result.model).model
    assert ops(cleaned) == ["Slice"]
    assert_equivalent(model, cleaned)


# --------------------------------------------------------------------------- deduplicate


def test_deduplicate_merges_initializers_and_nodes():
    nodes = [
        helper.make_node("Add", ["x", "a"], ["p"]),
        helper.make_node("Add", ["x", "b"], ["q"]),
        helper.make_node("Mul", ["p", "q"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])], [init("a", [1.0, 2, 3]), init("b", [1.0, 2, 3])])
    result = run("deduplicate", model)
    assert result.stats == {"initializers_merged": 1, "nodes_merged": 1}
    assert ops(result.model) == ["Add", "Mul"]
    assert_equivalent(model, result.model)


def test_deduplicate_never_merges_random_or_graph_outputs():
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
        helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
        helper.make_node("Relu", ["x"], ["y1"]),
        helper.make_node("Relu", ["x"], ["y2"]),
    ]
    model = make_model(nodes, [vi("x", [3])], [vi(n, [3]) for n in ("r1", "r2", "y1", "y2")])
    result = run("deduplicate", model)
    assert not result.changed


# --------------------------------------------------------------------------- eliminate_dead_code


def test_eliminate_dead_code_keeps_inputs_and_defaults():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])]
    model = make_model(
        nodes,
        [vi("x", [3]), vi("extra", [3]), vi("opt", [3])],
        [vi("y", [3])],
        [init("opt", [1.0, 2, 3]), init("dead", [4.0])],
    )
    result = run("eliminate_dead_code", model)
    assert ops(result.model) == ["Relu"]
    assert [i.name for i in result.model.graph.input] == ["x", "extra", "opt"]
    assert [t.name for t in result.model.graph.initializer] == ["opt"]
    assert_equivalent(model, result.model)


def test_eliminate_dead_code_keeps_loop_body_inputs():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc", "one"], ["acc2"]),
            helper.make_node("Neg", ["acc"], ["dead"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc", [1])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc2", [1])],
    )
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)
    model = make_model([loop], [vi("x", [1])], [vi("y", [1])], [init("n", 3, np.int64), init("one", [1.0])])
    result = run("eliminate_dead_code", model)
    assert "Neg" not in ops(result.model)
    assert len(result.model.graph.node[0].attribute[0].g.input) == 3
    assert_equivalent(model, result.model)
