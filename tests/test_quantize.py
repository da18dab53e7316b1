"""quantize_int8 on tiny graphs: placement rules, weights/bias math, fallback; each result checked by the harness."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.quantize.kernels import integer_kernels_saturate

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.pipeline import Context, create_pass
from tests.builders import assert_equivalent, init, make_model, vi

RNG = np.random.default_rng(0)


def _data(shape, n=12, scale=1.0, seed=0, name="x"):
    rng = np.random.default_rng(seed)
    return Dataset([{name: (rng.normal(size=shape) * scale).astype(np.float32)} for _ in range(n)])


def _quantize(model, data, **params):
    params.setdefault("check_latency", False)
    params.setdefault("target", None)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return create_pass("quantize_int8", **params)(work, Context(calibration=data))


def _fails_first(count):
    """Return a target metric that fails its first ``count`` judgements, then holds."""
    calls = []

    def metric(reference, candidate):
        calls.append(1)
        return len(calls) > count

    return metric


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _dq_of(model, weight_base):
    """Return the DequantizeLinear node whose int8 input was made from initializer ``weight_base``."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.startswith(weight_base + "_dq"):
            return node, numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[1]])
    raise AssertionError(f"no DequantizeLinear for {weight_base}")


def _conv_model(opset=17, weight_as_constant=False):
    w = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[2] *= 0.01  # a channel with much smaller weights: per-channel scales must differ
    b = RNG.normal(size=4).astype(np.float32)
    w2 = RNG.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits = [init("b", b), init("w2", w2)]
    if weight_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    else:
        inits.append(init("w", w))
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 2, 8, 8])], inits, opset=opset), w, b


def test_refuses_without_calibration_data():
    model, _, _ = _conv_model()
    with pytest.raises(CalibrationDataError, match="needs calibration data: pass --calib"):
        create_pass("quantize_int8")(model, Context())


def test_conv_per_channel_axis_bias_int32_and_relu_absorbed():
    model, w, b = _conv_model()
    data = _data([1, 3, 8, 8])
    result = _quantize(model, data)
    q = result.model
    node, w_q, w_scale = _dq_of(q, "w")
    assert w_q.dtype == np.int8 and helper.get_attribute_value(node.attribute[0]) == 0
    assert w_scale.shape == (4,) and w_scale[2] < w_scale[0] / 20
    levels = 64 if integer_kernels_saturate() else 127  # 7-bit weights where the kernels saturate
    assert result.stats["weight_levels"] == levels
    np.testing.assert_allclose(w_scale, np.abs(w).reshape(4, -1).max(axis=1) / levels, rtol=1e-6)
    _, b_q, b_scale = _dq_of(q, "b")
    assert b_q.dtype == np.int32
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    x_scale = next(inits[n.input[1]] for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)
    np.testing.assert_allclose(b_q * b_scale, b, atol=float(b_scale.max()))
    assert "Relu" not in _ops(q)  # absorbed: the output quantizer saturates at 0
    assert result.stats["activations_absorbed"] == 1
    assert_equivalent(model, q, profile="int8", data=data)


def test_opset_upgraded_for_per_channel():
    model, _, _ = _conv_model(opset=11)
    data = _data([1, 3, 8, 8])
    result = _quantize(model, data)
    assert any("opset 11 to 13" in n for n in result.notes)
    assert result.model.opset_import[0].version == 13
    assert_equivalent(model, result.model, profile="int8", data=data)


def test_constant_node_weights_are_quantized():
    model, _, _ = _conv_model(weight_as_constant=True)
    data = _data([1, 3, 8, 8])
    q = _quantize(model, data).model
    _, w_q, _ = _dq_of(q, "w")
    assert w_q.dtype == np.int8
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name == "w" for t in q.graph.initializer)
    assert "Constant" not in _ops(q)
    assert_equivalent(model, q, profile="int8", data=data)


@pytest.mark.parametrize(
    ("op", "attrs", "w_shape", "axis"),
    [
        ("ConvTranspose", {}, (3, 5, 2, 2), 1),
        ("Gemm", {"transB": 1}, (5, 3), 0),
        ("Gemm", {}, (3, 5), 1),
        ("MatMul", {}, (3, 5), 1),
    ],
)
def test_per_channel_axis_per_op(op, attrs, w_shape, axis):
    w = RNG.normal(size=w_shape).astype(np.float32)
    if op == "ConvTranspose":
        x_shape, y_shape = [1, 3, 4, 4], [1, 5, 5, 5]
        nodes = [helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)]
    else:
        x_shape, y_shape = ([1, 2, 3], [1, 2, 5]) if op == "MatMul" else ([2, 3], [2, 5])
        nodes = [helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", y_shape)], [init("w", w)])
    data = _data(x_shape)
    q = _quantize(model, data).model
    node, _, scale = _dq_of(q, "w")
    assert helper.get_attribute_value(node.attribute[0]) == axis and scale.shape == (w_shape[axis],)
    assert_equivalent(model, q, profile="int8", data=data)


def test_shared_weight_quantized_once():
    w = RNG.normal(size=(4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="m1"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="m2"),
    ]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [init("w", w)])
    data = _data([2, 4])
    result = _quantize(model, data)
    q = result.model
    assert result.stats["weights_quantized"] == 1
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("w_dq")]
    assert len(dqs) == 1
    readers = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert readers[0].input[1] == readers[1].input[1] == dqs[0].output[0]
    assert_equivalent(model, q, profile="int8", data=data)


def _concat_model():
    w1 = RNG.normal(size=(2, 3, 1, 1)).astype(np.float32)
    w2 = RNG.normal(size=(2, 3, 1, 1)).astype(np.float32) * 500  # "box coordinates"
    w3 = RNG.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="scores_conv"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Conv", ["x", "w2"], ["boxes"], name="box_conv"),
        helper.make_node("Concat", ["s", "boxes"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="head"),
    ]
    return make_model(
        nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])], [init("w1", w1), init("w2", w2), init("w3", w3)]
    )


def test_concat_of_mismatched_ranges_left_float():
    model = _concat_model()
    data = _data([1, 3, 4, 4])
    result = _quantize(model, data)
    q = result.model
    quantized_inputs = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert not any(name.startswith("cat") for name in quantized_inputs)
    assert any("concat" in note and "mix very different ranges" in note for note in result.notes)
    assert_equivalent(model, q, profile="int8", data=data)


def test_concat_of_similar_ranges_shares_one_scale():
    model = _concat_model()
    model.graph.initializer[1].CopyFrom(init("w2", RNG.normal(size=(2, 3, 1, 1)) * 0.1))
    model.graph.node.insert(3, helper.make_node("Sigmoid", ["boxes"], ["boxes_s"], name="sig2"))
    model.graph.node[4].input[1] = "boxes_s"
    data = _data([1, 3, 4, 4])
    q = _quantize(model, data).model
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = {n.name: float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"}
    cat = [v for k, v in scales.items() if k.startswith("cat")]
    s_in = [v for k, v in scales.items() if k.startswith(("s_", "boxes_s"))]
    assert cat and s_in and all(v == cat[0] for v in s_in)
    assert_equivalent(model, q, profile="int8", data=data)


@pytest.mark.parametrize("pattern", ["conv2", "conv[0-9]", "Conv"])
def test_excluded_nodes_stay_float(pattern):
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8])
    result = _quantize(model, data, exclude=[pattern])
    q = result.model
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"  # still the float weight
    assert any("excluded by the user" in note and "conv2" in note for note in result.notes)
    assert_equivalent(model, q, profile="int8", data=data)


def test_negative_infinity_mask_is_not_quantized():
    wq = RNG.normal(size=(4, 4)).astype(np.float32)
    mask = np.zeros((1, 4), np.float32)
    mask[0, 3] = -np.inf
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "wq"], ["y"], name="out"),
    ]
    model = make_model(nodes, [vi("x", [2, 4]), vi("mask", [1, 4])], [vi("y", [2, 4])], [init("wq", wq)])
    rng = np.random.default_rng(5)
    data = Dataset([{"x": rng.normal(size=(2, 4)).astype(np.float32), "mask": mask} for _ in range(8)])
    q = _quantize(model, data, op_types=["MatMul", "Add", "Softmax"]).model
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "mask" not in quantized and not any(t.startswith("masked") for t in quantized)
    assert_equivalent(model, q, profile="int8", data=data)


def test_shape_logic_tensor_is_not_quantized():
    w = RNG.normal(size=(4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Greater", ["h", "zero"], ["positive"], name="cmp"),
        helper.make_node("Cast", ["positive"], ["y"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w"], ["z"], name="mm2"),
    ]
    model = make_model(
        nodes, [vi("x", [2, 4])], [vi("y", [2, 4]), vi("z", [2, 4])], [init("w", w), init("zero", np.zeros(1))]
    )
    data = _data([2, 4])
    result = _quantize(model, data)
    assert any("feeds integer logic" in note for note in result.notes)
    assert_equivalent(model, result.model, profile="int8", data=data)


def test_embedding_table_stored_as_int8_rows():
    table = RNG.normal(size=(100, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)]
    model = make_model(
        nodes, [vi("ids", [1, 5], onnx.TensorProto.INT64)], [vi("y", [1, 5, 64])], [init("table", table)]
    )
    data = Dataset([{"ids": np.array([[i, 2 * i, 3, 4, 99]], np.int64)} for i in range(6)])
    result = _quantize(model, data)
    q = result.model
    assert result.stats["tables_quantized"] == 1
    assert q.ByteSize() < 0.35 * model.ByteSize()
    assert_equivalent(model, q, profile="int8", data=data)


def test_fallback_returns_nodes_to_float_until_a_callable_metric_holds():
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8], n=8)
    calls = []

    def exact(reference, candidate):
        calls.append(1)
        return all(np.array_equal(r["y"], c["y"]) for r, c in zip(reference, candidate, strict=True))

    result = _quantize(model, data, target=exact, max_fallback=4)
    assert calls and result.stats["fallback_nodes"] >= 1
    assert any("accuracy fallback" in note for note in result.notes)


def test_target_must_hold_on_the_calibration_samples_too():
    # 12 samples: 9 fitted on, 3 held out. A metric that only the 3 held-out ones satisfy
    # must not be reported as met.
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8], n=12)
    sizes = []

    def only_few(reference, candidate):
        sizes.append(len(reference))
        return len(reference) <= 3

    result = _quantize(model, data, target=only_few, max_fallback=2, estimate_folds=0)  # the held-out path
    assert {3, 9} <= set(sizes)
    assert result.stats["target_met"] == 0
    assert any("NOT met" in note for note in result.notes)
    sizes.clear()  # cross-fitted (the default with 8 or more samples): every sample judged at once, each unseen
    result = _quantize(model, data, target=only_few, max_fallback=2)
    assert set(sizes) == {12} and result.stats["target_met"] == 0
    assert any("4-fold cross-fitted" in note for note in result.notes)


def test_a_target_the_fallback_cannot_meet_keeps_the_float_model():
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8], n=8)
    result = _quantize(model, data, target=lambda ref, cand: False, max_fallback=1)
    assert not result.changed and not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    assert result.stats["target_met"] == 0
    assert any("kept the float model: the accuracy target was not met" in note for note in result.notes)


def test_string_target_met_reports_no_fallback():
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8], n=8)
    result = _quantize(model, data, target="cosine>=0.9")
    assert result.stats["target_met"] == 1 and result.stats["fallback_nodes"] == 0


def test_bad_target_is_rejected():
    with pytest.raises(Exception, match="expected cosine>=X"):
        create_pass("quantize_int8", target="accuracy>0.5")


def test_int8_activations():
    model, _, _ = _conv_model()
    data = _data([1, 3, 8, 8])
    q = _quantize(model, data, activation_type="int8").model
    inits = {t.name: t for t in q.graph.initializer}
    zps = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)
    assert_equivalent(model, q, profile="int8", data=data)


def _matmul_chain():
    w1 = RNG.normal(size=(16, 32)).astype(np.float32)
    w2 = RNG.normal(size=(32, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    return make_model(nodes, [vi("x", [2, 4, 16])], [vi("y", [2, 4, 8])], [init("w1", w1), init("w2", w2)])


def test_matmul_kept_float_by_fallback_stores_an_int8_weight():
    model = _matmul_chain()
    data = _data([2, 4, 16])
    result = _quantize(
        model, data, exclude=[], weight_only=True, op_types=["MatMul", "Relu"], target=_fails_first(2), max_fallback=8
    )
    q = result.model
    assert result.stats["weight_only_nodes"] >= 1
    mm = {n.name: n for n in q.graph.node}
    assert all(mm[name].input[1] != w for name, w in (("mm1", "w1"), ("mm2", "w2")))  # both weights dequantized
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name in ("w1", "w2") for t in q.graph.initializer)
    assert_equivalent(model, q, profile="int8", data=data)


def test_fallback_gives_float_weights_back_when_float_compute_is_not_enough():
    # w2 sits on its int8 grid (exact when stored as int8), w1 does not: with every node
    # computing in float the int8 w1 still misses the target, so the fallback goes on and
    # gives w1 its float weight back, and only w1.
    w1 = RNG.normal(size=(16, 32)).astype(np.float32)
    grid = RNG.integers(-127, 128, size=(32, 8)).astype(np.float32)
    grid[0] = 127  # every column's largest magnitude is 127 steps
    w2 = grid / 127
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, [vi("x", [2, 4, 16])], [vi("y", [2, 4, 8])], [init("w1", w1), init("w2", w2)])
    data = _data([2, 4, 16], n=8)

    def close(reference, candidate):  # what int8 activations or int8 w1 cannot reach
        return all(np.abs(r["y"] - c["y"]).max() < 1e-4 for r, c in zip(reference, candidate, strict=True))

    result = _quantize(model, data, exclude=[], weight_only=True, op_types=["MatMul", "Relu"], target=close)
    assert result.stats["target_met"] == 1, result.notes
    assert any("gives float weights back" in note for note in result.notes)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored.get("w1") == onnx.TensorProto.FLOAT  # given back
    assert any(dtype == onnx.TensorProto.INT8 for dtype in stored.values())  # w2 still stored as int8


def _residual_model():
    """x -> Tanh -> t; y = MatMul(t, w) + t: the residual Add computes in float."""
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "t"], ["y"], name="residual"),
    ]
    inits = [init("w", RNG.normal(size=(16, 16)) * 0.2)]
    return make_model(nodes, [vi("x", [2, 4, 16])], [vi("y", [2, 4, 16])], inits)


def test_float_reader_of_a_float_tensor_reads_the_exact_value():
    # A residual branch that stays float must not carry the quantization error of the
    # MatMul's input (MiniLM: pooled cosine 0.990 -> 0.994 when residual Adds stopped
    # reading the LayerNorm outputs' DequantizeLinear).
    model = _residual_model()
    data = _data([2, 4, 16])
    q = _quantize(model, data).model
    by_name = {n.name: n for n in q.graph.node}
    producer = {o: n for n in q.graph.node for o in n.output}
    assert producer[by_name["mm"].input[0]].op_type == "DequantizeLinear"
    assert by_name["residual"].input[1] == "t" and producer["t"].op_type == "Tanh"
    quantizer = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    assert quantizer.input[0] == "t"
    assert_equivalent(model, q, profile="int8", data=data)


def test_float_reader_of_an_integer_kernel_output_reads_its_dequantized_value():
    # After an int8 Conv the float value does not exist (QLinearConv writes integers):
    # a float reader takes the DequantizeLinear output, which keeps the tensor's name.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Conv", ["c", "w2"], ["d"], name="conv2"),
        helper.make_node("Tanh", ["c"], ["e"], name="tanh"),
        helper.make_node("Add", ["d", "e"], ["y"], name="add"),
    ]
    inits = [init("w", RNG.normal(size=(4, 3, 1, 1))), init("w2", RNG.normal(size=(4, 4, 1, 1)))]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], inits)
    data = _data([1, 3, 4, 4])
    q = _quantize(model, data).model
    producer = {o: n for n in q.graph.node for o in n.output}
    tanh = next(n for n in q.graph.node if n.name == "tanh")
    assert producer[tanh.input[0]].op_type == "DequantizeLinear"
    assert_equivalent(model, q, profile="int8", data=data)


def _wide_conv_model():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [init("w", RNG.normal(size=(16, 8, 3, 3))), init("w2", RNG.normal(size=(8, 16, 3, 3)))]
    return make_model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 8, 6, 6])], inits)


def test_weight_only_not_for_user_exclusions():
    model = _matmul_chain()
    data = _data([2, 4, 16])
    q = _quantize(model, data, exclude=["mm2"]).model
    assert next(n for n in q.graph.node if n.name == "mm2").input[1] == "w2"
    conv = _wide_conv_model()
    q = _quantize(conv, _data([1, 8, 6, 6]), exclude=["conv2"]).model
    assert next(n for n in q.graph.node if n.name == "conv2").input[1] == "w2"


def test_conv_returned_to_float_by_the_fallback_keeps_an_int8_weight():
    model = _wide_conv_model()
    data = _data([1, 8, 6, 6])
    result = _quantize(model, data, target=_fails_first(2), max_fallback=8)
    assert result.stats["fallback_nodes"] >= 1 and result.stats["weight_only_nodes"] >= 1
    assert not any(t.name in ("w", "w2") for t in result.model.graph.initializer)
    assert_equivalent(model, result.model, profile="int8", data=data)
    kept = _quantize(model, data, target=_fails_first(2), max_fallback=8, weight_only=False)
    assert kept.stats["weight_only_nodes"] == 0


def test_depthwise_groups_large_kernels_first():
    from onnxopt.passes.quantize.fallback import depthwise_groups

    nodes = [
        helper.make_node("Conv", ["x", "dw5"], ["a"], name="dw5", group=4, pads=[2, 2, 2, 2]),
        helper.make_node("Conv", ["a", "dw3"], ["b"], name="dw3", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "pw"], ["y"], name="pw"),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 8, 8])],
        [vi("y", [1, 4, 8, 8])],
        [
            init("dw5", RNG.normal(size=(4, 1, 5, 5))),
            init("dw3", RNG.normal(size=(4, 1, 3, 3))),
            init("pw", RNG.normal(size=(4, 4, 1, 1))),
        ],
    )
    groups = depthwise_groups(model, {n.name: n for n in model.graph.node})
    assert groups == {"depthwise convs above 3x3": ["dw5"], "depthwise convs": ["dw5", "dw3"]}
    only_small = depthwise_groups(model, {n.name: n for n in model.graph.node if n.name != "dw5"})
    assert only_small == {"depthwise convs": ["dw3"]}


@pytest.mark.parametrize(
    ("readers", "expected"),
    [
        (["HardSwish"], (-3.0, None)),
        (["Relu"], (0.0, None)),
        (["HardSigmoid"], (-3.0, 3.0)),
        (["HardSwish", "Relu"], (-3.0, None)),
        (["HardSwish", "Sigmoid"], None),
        (["Identity"], None),
    ],
)
def test_saturation_bounds_from_readers(readers, expected):
    from onnxopt.passes.quantize.saturation import saturation_bounds

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    for i, op in enumerate(readers):
        attrs = {"alpha": 1 / 6, "beta": 0.5} if op == "HardSigmoid" else {}
        nodes.append(helper.make_node(op, ["c"], [f"y{i}"], name=f"r{i}", **attrs))
    model = make_model(
        nodes,
        [vi("x", [1, 3, 4, 4])],
        [vi(f"y{i}", None) for i in range(len(readers))],
        [init("w", RNG.normal(size=(4, 3, 1, 1)))],
        opset=17,
    )
    found = saturation_bounds(model, ["c"]).get("c")
    if expected is None:
        assert found is None
    else:  # compared bound by bound: pytest >= 9.2 refuses None inside approx
        assert found is not None and len(found) == len(expected)
        for got, want in zip(found, expected, strict=True):
            assert (got is None) if want is None else got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(("gate_input", "expected"), [("c", (-3.0, None)), ("other", None)])
def test_saturation_bounds_of_hardswish_written_as_x_times_hardsigmoid(gate_input, expected):
    """Below opset 14 fuse_hardswish writes x * HardSigmoid(x); x is clamped as under HardSwish."""
    from onnxopt.passes.quantize.saturation import saturation_bounds

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Conv", ["x", "w"], ["other"], name="conv2"),
        helper.make_node("HardSigmoid", [gate_input], ["gate"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c", "gate"], ["y"], name="product"),
    ]
    model = make_model(
        nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], [init("w", RNG.normal(size=(4, 3, 1, 1)))], opset=12
    )
    found = saturation_bounds(model, ["c"]).get("c")
    if expected is None:  # a product by another tensor's gate saturates nothing
        assert found is None
    else:
        assert found is not None and found[0] == pytest.approx(-3.0) and found[1] is None


def test_saturation_bounds_not_for_graph_outputs_and_clip_constants():
    from onnxopt.passes.quantize.saturation import saturation_bounds

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"),
    ]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 4, 4])],
        [vi("y", None)],
        [init("w", RNG.normal(size=(4, 3, 1, 1))), init("lo", np.array(-1.0)), init("hi", np.array(2.0))],
    )
    assert saturation_bounds(model, ["c"]) == {"c": (-1.0, 2.0)}
    model.graph.output.append(vi("c", None))
    assert saturation_bounds(model, ["c"]) == {}


def test_hardswish_input_range_is_clamped_and_still_equivalent():
    w = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32) * 4
    w2 = RNG.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("HardSwish", ["c"], ["h"], name="hswish"),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2"),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 2, 8, 8])], [init("w", w), init("w2", w2)])
    data = _data([1, 3, 8, 8])
    on = _quantize(model, data)
    off = _quantize(model, data, saturation_aware=False)
    assert on.stats["ranges_saturation_clamped"] == 1 and off.stats["ranges_saturation_clamped"] == 0

    def scale_of(q):
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "c")
        return float(inits[dq.input[1]])

    assert scale_of(on.model) < scale_of(off.model)  # the negative tail below -3 no longer costs resolution
    assert_equivalent(model, on.model, profile="int8", data=data)
