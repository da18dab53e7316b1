"""Unit tests of the fusions: the math on arrays, each rule on tiny graphs, and where it must not fire."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxopt.passes.fusion.affine_math import batchnorm_affine, channel_vector, scale_output_channels, shift_bias

from tests.builders import assert_equivalent, init, make_model, ops, vi
from tests.builders import run_pass as run

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def bn_inits(channels, prefix="bn"):
    return [
        init(f"{prefix}_g", RNG.uniform(0.5, 2, channels)),
        init(f"{prefix}_b", rand(channels)),
        init(f"{prefix}_m", rand(channels)),
        init(f"{prefix}_v", RNG.uniform(0.5, 2, channels)),
    ]


def bn(x, y, prefix="bn"):
    return helper.make_node(
        "BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y], epsilon=1e-3
    )


# --------------------------------------------------------------------------- math


def test_batchnorm_affine_matches_definition():
    x = rand(5)
    gamma, beta, mean, var = rand(5), rand(5), rand(5), np.abs(rand(5)) + 0.1
    scale, shift = batchnorm_affine(gamma, beta, mean, var, 1e-5)
    np.testing.assert_allclose(x * scale + shift, (x - mean) / np.sqrt(var + 1e-5) * gamma + beta, rtol=1e-5)


def test_scale_output_channels_for_grouped_conv_transpose():
    weight = rand(4, 3, 2, 2)  # Cin=4, group=2 -> Cout = 6
    scale = np.arange(1, 7, dtype=np.float64)
    scaled = scale_output_channels(weight, scale, "conv_transpose", group=2)
    for g in range(2):
        for j in range(3):
            np.testing.assert_allclose(
                scaled[2 * g : 2 * g + 2, j], weight[2 * g : 2 * g + 2, j] * scale[3 * g + j], rtol=1e-6
            )


def test_scale_output_channels_layouts():
    w = rand(3, 4)
    s = np.arange(1, 5, dtype=np.float64)
    np.testing.assert_allclose(scale_output_channels(w, s, "kn"), w * s, rtol=1e-6)
    np.testing.assert_allclose(scale_output_channels(w.T, s, "nk"), (w * s).T, rtol=1e-6)
    np.testing.assert_allclose(shift_bias(None, s, s, 4, np.dtype(np.float32)), s)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((), True),
        ((4, 1, 1), True),
        ((1, 4, 1, 1), True),
        ((1, 1, 1), True),
        ((4, 2, 1), False),
        ((2, 4, 1, 1), False),
        ((1, 1, 1, 1, 4), False),
    ],
)
def test_channel_vector(shape, ok):
    value = np.ones(shape, np.float32)
    assert (channel_vector(value, 4, 4) is not None) == ok


# --------------------------------------------------------------------------- fold_batchnorm


def conv_bn_model(*, transpose=False, group=1, extra_reader=False, output_too=False):
    if transpose:
        layer = helper.make_node("ConvTranspose", ["x", "w", "cb"], ["c"], group=group)
        inits = [init("w", rand(4, 6 // group, 3, 3)), init("cb", rand(6))]
    else:
        layer = helper.make_node("Conv", ["x", "w", "cb"], ["c"], group=group, pads=[1, 1, 1, 1])
        inits = [init("w", rand(6, 4 // group, 3, 3)), init("cb", rand(6))]
    nodes = [layer, bn("c", "y")]
    outputs = [vi("y", None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        outputs.append(vi("r", None))
    if output_too:
        outputs.append(vi("c", None))
    model = make_model(nodes, [vi("x", [1, 4, 5, 5])], outputs, inits + bn_inits(6))
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(("transpose", "group"), [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_fold_batchnorm_into_conv(transpose, group):
    model = conv_bn_model(transpose=transpose, group=group)
    result = run("fold_batchnorm", model)
    assert ops(result.model) == ["ConvTranspose" if transpose else "Conv"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("kwargs", [{"extra_reader": True}, {"output_too": True}])
def test_fold_batchnorm_not_when_conv_output_is_shared(kwargs):
    result = run("fold_batchnorm", conv_bn_model(**kwargs))
    assert "BatchNormalization" in ops(result.model)
    assert any("consumers" in n or "graph output" in n for n in result.notes)


def test_fold_batchnorm_clones_shared_weight():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y"), helper.make_node("Conv", ["x", "w"], ["z"])]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 5, 5])],
        [vi("y", [1, 6, 5, 5]), vi("z", [1, 6, 5, 5])],
        [init("w", rand(6, 4, 1, 1)), *bn_inits(6)],
    )
    result = run("fold_batchnorm", model)
    assert ops(result.model) == ["Conv", "Conv"]
    assert result.model.graph.node[1].input[1] == "w"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_into_gemm(trans_b):
    weight = rand(5, 3) if trans_b else rand(3, 5)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=0.5, beta=2.0), bn("g", "y")]
    model = make_model(
        nodes, [vi("x", [2, 3])], [vi("y", [2, 5])], [init("w", weight), init("c", rand(5)), *bn_inits(5)]
    )
    result = run("fold_batchnorm", model)
    assert ops(result.model) == ["Gemm"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("x_shape", "fires"), [([2, 3], True), (["N", 3], True), ([2, 2, 3], False)])
def test_fold_batchnorm_into_matmul_only_for_2d_input(x_shape, fires):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), bn("m", "y")]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", [*x_shape[:-1], 5])], [init("w", rand(3, 5)), *bn_inits(5)])
    result = run("fold_batchnorm", model)
    assert (ops(result.model) == ["Gemm"]) == fires
    if fires:
        assert_equivalent(model, result.model)


def test_fold_batchnorm_inside_if_body_with_outer_weights():
    body_nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "t")]
    then_graph = helper.make_graph(body_nodes, "then", [], [vi("t", [1, 6, 5, 5])])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["e"])], "else", [], [vi("e", [1, 6, 5, 5])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = make_model(
        [node],
        [vi("x", [1, 4, 5, 5]), vi("cond", [1], onnx.TensorProto.BOOL)],
        [vi("y", [1, 6, 5, 5])],
        [init("w", rand(6, 4, 1, 1)), *bn_inits(6)],
    )
    result = run("fold_batchnorm", model)
    assert "BatchNormalization" not in ops(result.model)
    assert_equivalent(model, result.model)


def test_fold_batchnorm_leaves_unknown_domain_alone():
    nodes = [helper.make_node("MyConv", ["x", "w"], ["c"], domain="com.example"), bn("c", "y")]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 5, 5])],
        [vi("y", None)],
        [init("w", rand(6, 4, 1, 1)), *bn_inits(6)],
        extra_opsets={"com.example": 1},
    )
    result = run("fold_batchnorm", model)
    assert ops(result.model) == ["MyConv", "BatchNormalization"]


# --------------------------------------------------------------------------- fold_conv_affine


@pytest.mark.parametrize(("op", "shape"), [("Mul", (6, 1, 1)), ("Add", (1, 6, 1, 1)), ("Sub", ()), ("Mul", ())])
def test_fold_conv_affine(op, shape):
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c", "k"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 5, 5])],
        [vi("y", [1, 6, 5, 5])],
        [init("w", rand(6, 4, 3, 3)), init("b", rand(6)), init("k", rand(*shape))],
    )
    result = run("fold_conv_affine", model)
    assert ops(result.model) == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("inputs", "shape"), [(["c", "k"], (6, 5, 1)), (["k", "c"], (6, 1, 1))])
def test_fold_conv_affine_not_for_spatial_constant_or_reversed_sub(inputs, shape):
    op = "Mul" if shape == (6, 5, 1) else "Sub"
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node(op, inputs, ["y"])]
    model = make_model(
        nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", rand(6, 4, 3, 3)), init("k", rand(*shape))]
    )
    assert not run("fold_conv_affine", model).changed


# --------------------------------------------------------------------------- fuse_matmul_add


@pytest.mark.parametrize(
    ("x_shape", "bias_shape", "fires"),
    [(["N", 3], (5,), True), ([2, 3], (1, 5), True), ([2, 2, 3], (5,), False), ([2, 3], (2, 5), False)],
)
def test_fuse_matmul_add(x_shape, bias_shape, fires):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["bias", "m"], ["y"])]
    model = make_model(
        nodes,
        [vi("x", x_shape)],
        [vi("y", [*x_shape[:-1], 5])],
        [init("w", rand(3, 5)), init("bias", rand(*bias_shape))],
    )
    result = run("fuse_matmul_add", model)
    assert (ops(result.model) == ["Gemm"]) == fires
    if fires:
        assert_equivalent(model, result.model)


# --------------------------------------------------------------------------- fuse_layernorm


def layernorm_model(opset, last_dim=8, affine=True):
    axes_attr = {} if opset >= 18 else {"axes": [-1]}
    axes_in = ["axes"] if opset >= 18 else []
    nodes = [
        helper.make_node("ReduceMean", ["x", *axes_in], ["mean"], **axes_attr),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", *axes_in], ["var"], **axes_attr),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n" if affine else "y"]),
    ]
    inits = [init("two", 2.0), init("eps", 1e-5)] + ([init("axes", [-1], np.int64)] if opset >= 18 else [])
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["s"]), helper.make_node("Add", ["s", "beta"], ["y"])]
        inits += [init("gamma", rand(8)), init("beta", rand(8))]
    return make_model(nodes, [vi("x", [2, "S", last_dim])], [vi("y", [2, "S", last_dim])], inits, opset=opset)


@pytest.mark.parametrize(("opset", "affine"), [(17, True), (18, True), (18, False)])
def test_fuse_layernorm(opset, affine):
    model = layernorm_model(opset, affine=affine)
    result = run("fuse_layernorm", model)
    assert ops(result.model) == ["LayerNormalization"]
    assert_equivalent(model, result.model)


def test_fuse_layernorm_not_below_opset_17_or_with_dynamic_hidden_dim():
    old = run("fuse_layernorm", layernorm_model(16))
    assert not old.changed and any("opset 17" in n for n in old.notes)
    dynamic = run("fuse_layernorm", layernorm_model(17, last_dim="H"))
    assert not dynamic.changed and any("static" in n for n in dynamic.notes)


# --------------------------------------------------------------------------- fuse_gelu


def gelu_model(arrangement, opset=20):
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
    ]
    if arrangement == "x_first":
        nodes += [helper.make_node("Mul", ["x", "a"], ["p"]), helper.make_node("Mul", ["p", "half"], ["y"])]
    elif arrangement == "half_first":
        nodes += [helper.make_node("Mul", ["a", "half"], ["p"]), helper.make_node("Mul", ["x", "p"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "a"], ["y"])]
    inits = [init("sqrt2", np.sqrt(2.0)), init("one", 1.0), init("half", 0.5)]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits, opset=opset)


@pytest.mark.parametrize("arrangement", ["x_first", "half_first", "half_of_x"])
def test_fuse_gelu_erf(arrangement):
    model = gelu_model(arrangement)
    result = run("fuse_gelu", model)
    assert ops(result.model) == ["Gelu"]
    assert_equivalent(model, result.model)


def test_fuse_gelu_tanh():
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["c"]),
        helper.make_node("Mul", ["c", "k"], ["ck"]),
        helper.make_node("Add", ["x", "ck"], ["inner"]),
        helper.make_node("Mul", ["inner", "r"], ["u"]),
        helper.make_node("Tanh", ["u"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
    ]
    inits = [
        init("three", 3.0),
        init("k", 0.044715),
        init("r", np.sqrt(2 / np.pi)),
        init("one", 1.0),
        init("half", 0.5),
    ]
    model = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits, opset=20)
    result = run("fuse_gelu", model)
    assert ops(result.model) == ["Gelu"]
    assert_equivalent(model, result.model)


def test_fuse_gelu_not_below_opset_20_or_when_intermediate_is_shared():
    old = run("fuse_gelu", gelu_model("x_first", opset=17))
    assert not old.changed and any("opset 20" in n for n in old.notes)
    shared = gelu_model("x_first")
    shared.graph.output.append(vi("a", [2, 8]))
    assert not run("fuse_gelu", shared).changed


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_fold_conv_affine_conv_transpose(op):
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2], group=2),
        helper.make_node(op, ["c", "k"], ["y"]),
    ]
    model = make_model(
        nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 6, 6, 6])], [init("w", rand(4, 3, 2, 2)), init("k", rand(6, 1, 1))]
    )
    result = run("fold_conv_affine", model)
    assert ops(result.model) == ["ConvTranspose"]
    assert_equivalent(model, result.model)


def test_conv_transpose_add_batchnorm_chain_folds_in_the_fuse_stage():
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Add", ["c", "k"], ["a"]),
        bn("a", "y"),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 3, 3])],
        [vi("y", [1, 3, 6, 6])],
        [init("w", rand(4, 3, 2, 2)), init("k", rand(3, 1, 1)), *bn_inits(3)],
    )
    once = run("fold_conv_affine", model)
    twice = run("fold_batchnorm", once.model)
    assert ops(twice.model) == ["ConvTranspose"]
    assert_equivalent(model, twice.model)


def test_fold_conv_affine_not_for_conv_transpose_input_channel_constant():
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])]
    model = make_model(
        nodes, [vi("x", [1, 4, 3, 3])], [vi("y", None)], [init("w", rand(4, 3, 2, 2)), init("k", rand(4, 1, 1))]
    )
    assert not run("fold_conv_affine", model).changed


# --------------------------------------------------------------------------- fuse_hardswish


def hardswish_nodes(form: str, *, add=3.0, high=6.0, divisor=6.0, other_x=False):
    """Paddle's hard-swish/hard-sigmoid decompositions around Clip(x + 3, 0, 6)."""
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"])]
    x = "z" if other_x else "x"
    if form == "product_first":
        nodes += [helper.make_node("Mul", [x, "c"], ["p"]), helper.make_node("Div", ["p", "div"], ["y"])]
    elif form == "gate_first":
        nodes += [helper.make_node("Mul", ["c", "sixth"], ["g"]), helper.make_node("Mul", ["g", x], ["y"])]
    else:  # hard sigmoid only
        nodes += [helper.make_node("Div", ["c", "div"], ["y"])]
    inits = [
        init("three", np.array(add)),
        init("zero", np.array(0.0)),
        init("six", np.array(high)),
        init("div", np.array(divisor)),
        init("sixth", np.array(1 / divisor)),
    ]
    return nodes, inits


@pytest.mark.parametrize(
    ("form", "opset", "expected"),
    [
        ("product_first", 14, ["HardSwish"]),
        ("gate_first", 17, ["HardSwish"]),
        ("sigmoid", 12, ["HardSigmoid"]),
        ("product_first", 12, ["HardSwish"]),
    ],
)
def test_fuse_hardswish(form, opset, expected):
    nodes, inits = hardswish_nodes(form)
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])], inits, opset=opset)
    result = run("fuse_hardswish", model, allow_opset_upgrade=True)
    assert ops(result.model) == expected
    if opset < 14 and expected == ["HardSwish"]:
        assert any("opset 12 to 14" in n for n in result.notes)
        assert result.model.opset_import[0].version == 14
    assert_equivalent(model, result.model, float_range=(-8.0, 8.0))


def test_fuse_hardswish_keeps_the_opset_by_default_and_writes_hardsigmoid_product():
    nodes, inits = hardswish_nodes("product_first")
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])], inits, opset=12)
    result = run("fuse_hardswish", model)
    assert ops(result.model) == ["HardSigmoid", "Mul"]
    assert result.model.opset_import[0].version == 12
    assert any("kept opset 12" in n and "allow_opset_upgrade=true" in n for n in result.notes)
    assert_equivalent(model, result.model, float_range=(-8.0, 8.0))


@pytest.mark.parametrize("change", [{"add": 2.0}, {"high": 5.0}, {"divisor": 5.0}])
def test_fuse_hardswish_not_for_other_constants(change):
    nodes, inits = hardswish_nodes("product_first", **change)
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits, opset=14)
    result = run("fuse_hardswish", model)
    assert not result.changed
    assert "HardSwish" not in ops(result.model)


def test_fuse_hardswish_product_by_another_tensor_is_only_a_hardsigmoid_when_divided_first():
    nodes, inits = hardswish_nodes("product_first", other_x=True)
    model = make_model(nodes, [vi("x", [2, 3]), vi("z", [2, 3])], [vi("y", [2, 3])], inits, opset=14)
    assert not run("fuse_hardswish", model).changed
    nodes, inits = hardswish_nodes("gate_first", other_x=True)
    model = make_model(nodes, [vi("x", [2, 3]), vi("z", [2, 3])], [vi("y", [2, 3])], inits, opset=14)
    result = run("fuse_hardswish", model)
    assert ops(result.model) == ["HardSigmoid", "Mul"]
    assert_equivalent(model, result.model, float_range=(-8.0, 8.0))


def test_fuse_hardswish_not_when_intermediate_is_read_elsewhere():
    nodes, inits = hardswish_nodes("product_first")
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("c", [2, 3])], inits, opset=14)
    assert not run("fuse_hardswish", model).changed
