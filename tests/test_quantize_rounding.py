"""quantize_int8: error-compensating (GPTQ) weight rounding, depthwise convs, latency reference."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxopt.passes.quantize.gptq import damping, gptq_round, output_error, round_weights

from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.pipeline import Context, Pass, PassManager, PassResult, create_pass
from tests.builders import init, make_model, vi
from tests.test_quantize import _quantize


def _nearest(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(weight / scale), -127, 127)


def _correlated_rows(n: int, features: int, seed: int) -> np.ndarray:
    """Rows whose features are strongly correlated (three latent factors, mixed the same way for every seed)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    mixing = np.random.default_rng(12345).normal(size=(3, features))
    return (latent @ mixing + 0.05 * rng.normal(size=(n, features))).astype(np.float64)


def test_gptq_equals_nearest_rounding_for_uncorrelated_inputs():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(2, 5, 12))
    scale = np.abs(weight).max(axis=2, keepdims=True) / 127
    gram = np.stack([np.eye(12) * 3.0, np.eye(12)])  # diagonal XᵀX: nothing to compensate with
    q = gptq_round(weight, gram, np.broadcast_to(scale, weight.shape))
    np.testing.assert_array_equal(q, _nearest(weight, scale))


def test_gptq_lowers_the_output_error_on_correlated_inputs_and_stays_on_the_grid():
    rng = np.random.default_rng(1)
    x = _correlated_rows(2000, 24, seed=2)
    weight = rng.normal(size=(1, 8, 24))
    scale = np.broadcast_to(np.abs(weight).max(axis=2, keepdims=True) / 127, weight.shape)
    gram = (x.T @ x)[None]
    q = gptq_round(weight, gram, scale, damp=damping(24, 2000))
    assert q.min() >= -127 and q.max() <= 127 and q.dtype == np.int64
    nearest = _nearest(weight, scale)
    error_gptq = output_error(weight, q * scale, gram)
    error_nearest = output_error(weight, nearest * scale, gram)
    assert error_gptq < 0.5 * error_nearest
    # the same holds on fresh rows from the same distribution, not only on the calibration rows
    fresh = _correlated_rows(2000, 24, seed=3)
    held = (fresh.T @ fresh)[None]
    assert output_error(weight, q * scale, held) < output_error(weight, nearest * scale, held)


def test_damping_is_smaller_with_more_rows_per_feature():
    assert damping(100, 500) == 0.01
    assert damping(100, 1_000_000) == 0.001
    assert 0.001 < damping(100, 5_000) < 0.01


def _correlated_matmul():
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(24, 16)).astype(np.float32)
    w1[0] *= 20  # one large input row per output column: a coarse grid, so weight rounding dominates the error
    w2 = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, [vi("x", [1, 64, 24])], [vi("y", [1, 64, 8])], [init("w1", w1), init("w2", w2)])
    data = Dataset([{"x": _correlated_rows(64, 24, seed=10 + i).astype(np.float32)[None]} for i in range(16)])
    return model, data


def _weight(model, base):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith(base + "_dq"))
    return inits[dq.input[0]], inits[dq.input[1]]


def test_pass_stores_gptq_integers_on_the_nearest_rounding_scale_and_is_closer():
    model, data = _correlated_matmul()
    gptq = _quantize(model, data)
    nearest = _quantize(model, data, weight_rounding="nearest")
    assert gptq.stats["weights_error_compensated"] == 2 and "weights_error_compensated" not in nearest.stats
    assert any("rounded to compensate" in note for note in gptq.notes)
    q_gptq, s_gptq = _weight(gptq.model, "w1")
    q_near, s_near = _weight(nearest.model, "w1")
    np.testing.assert_array_equal(s_gptq, s_near)  # same grid, different points on it
    assert q_gptq.dtype == np.int8 and np.any(q_gptq != q_near)
    fresh = Dataset([{"x": _correlated_rows(64, 24, seed=100 + i).astype(np.float32)[None]} for i in range(4)])
    sqnr_gptq = check(model, gptq.model, fresh, profile="int8", levels=("disabled",)).levels[0].outputs[0].sqnr_db
    sqnr_near = check(model, nearest.model, fresh, profile="int8", levels=("disabled",)).levels[0].outputs[0].sqnr_db
    assert sqnr_gptq > sqnr_near


def _depthwise_model():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "pw1"], ["a"], name="pw1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "dw"], ["c"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "pw2"], ["y"], name="pw2"),
    ]
    inits = [
        init("pw1", rng.normal(size=(8, 4, 1, 1))),
        init("dw", rng.normal(size=(8, 1, 3, 3))),
        init("pw2", rng.normal(size=(4, 8, 1, 1))),
    ]
    model = make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)
    rng = np.random.default_rng(5)
    return model, Dataset([{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)} for _ in range(8)])


def test_depthwise_conv_stays_float_by_default_and_is_quantized_on_request():
    model, data = _depthwise_model()
    default = _quantize(model, data)
    weights = {n.input[1] for n in default.model.graph.node if n.op_type == "Conv"}
    assert "dw" in weights  # the float depthwise weight is read directly
    assert any("depthwise convolution" in note and "dw" in note for note in default.notes)
    assert check(model, default.model, data, profile="int8").passed
    asked = _quantize(model, data, depthwise=True)
    assert "dw" not in {n.input[1] for n in asked.model.graph.node if n.op_type == "Conv"}
    assert check(model, asked.model, data, profile="int8").passed


class _Recorder(Pass):
    name = "record_reference"

    def __init__(self, *, wants: bool = True) -> None:
        self.wants = wants
        self.seen: list[onnx.ModelProto | None] = []

    def wants_reference(self) -> bool:
        return self.wants

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        self.seen.append(ctx.reference)
        model.graph.node[0].name = "renamed by the pass"  # passes may edit their input in place
        return PassResult(model, True)


def test_pipeline_keeps_its_starting_model_only_for_passes_that_ask():
    model, _ = _correlated_matmul()
    asking, silent = _Recorder(), _Recorder(wants=False)
    PassManager([asking, asking]).run(model)
    PassManager([silent]).run(model)
    assert silent.seen == [None]
    first, second = asking.seen
    assert first is second and first is not None
    assert first.graph.node[0].name == "mm1"  # a copy, untouched by the passes' edits


def test_int8_latency_check_times_against_the_pipelines_starting_model():
    model, data = _correlated_matmul()
    quantize = create_pass("quantize_int8", target=None)
    assert quantize.wants_reference()
    assert not create_pass("quantize_int8", latency_reference="input").wants_reference()
    result = PassManager([quantize]).run(model, Context(calibration=data))
    record = result.records[0]
    assert record.stats["latency_source_ms"] > 0
    assert any("pipeline's starting model" in note for note in record.notes)


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _wide_depthwise_model():
    """The depthwise model with 32 channels: the depthwise weight (288 values) is worth storing as int8."""
    model, data = _depthwise_model()
    model.graph.initializer[0].CopyFrom(init("pw1", np.random.default_rng(7).normal(size=(32, 4, 1, 1))))
    model.graph.initializer[1].CopyFrom(init("dw", np.random.default_rng(6).normal(size=(32, 1, 3, 3))))
    model.graph.initializer[2].CopyFrom(init("pw2", np.random.default_rng(8).normal(size=(4, 32, 1, 1))))
    model.graph.node[2].attribute[0].i = 32  # group
    return model, data


def test_weight_only_conv_reads_cast_and_scale_that_the_runtime_folds(tmp_path):
    model, data = _wide_depthwise_model()
    result = _quantize(model, data)
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    scale = producers[dw.input[1]]
    assert scale.op_type == "Mul" and producers[scale.input[0]].op_type == "Cast"
    cast_source = {t.name: t for t in result.model.graph.initializer}[producers[scale.input[0]].input[0]]
    assert cast_source.data_type == onnx.TensorProto.INT8 and list(cast_source.dims) == [32, 1, 3, 3]
    assert "Cast" not in _optimized_ops(result.model, tmp_path)  # folded into a float weight at load time
    assert check(model, result.model, data, profile="int8").passed


def test_fallback_gives_float_weights_back_to_float_nodes_when_the_target_needs_it():
    model, data = _wide_depthwise_model()

    def exact(reference, candidate):
        return all(np.allclose(r["y"], c["y"], atol=1e-5) for r, c in zip(reference, candidate, strict=True))

    result = _quantize(model, data, target=exact)
    assert any("got their float weights back" in note and "dw" in note for note in result.notes)
    assert "dw" in {n.input[1] for n in result.model.graph.node if n.op_type == "Conv"}


def test_fallback_stops_before_a_step_that_breaks_the_latency_budget():
    from onnxopt.passes.quantize.int8 import QuantizeInt8

    model, data = _correlated_matmul()
    seen = []

    def budget(candidate):
        seen.append(candidate)
        return "2.00x as slow as the pipeline's starting model"

    quantize = QuantizeInt8(target=lambda r, c: False, check_latency=False)
    quantize._latency_budget = lambda work, ctx: budget  # every fallback step is too slow
    result = quantize(model, Context(calibration=data))
    assert seen and result.stats["fallback_nodes"] == 0 and result.stats["target_met"] == 0
    assert any("accuracy fallback stopped at 0 node(s)" in note for note in result.notes)


def test_gptq_keeps_pruned_weights_at_zero():
    rng = np.random.default_rng(9)
    x = _correlated_rows(1000, 16, seed=4)
    weight = rng.normal(size=(1, 6, 16))
    weight[rng.random(weight.shape) < 0.5] = 0.0
    scale = np.broadcast_to(np.abs(weight).max(axis=2, keepdims=True) / 127, weight.shape)
    q = gptq_round(weight, (x.T @ x)[None], scale)
    assert np.all(q[weight == 0] == 0)
    gram = (x.T @ x)[None]
    assert output_error(weight, q * scale, gram) <= output_error(weight, _nearest(weight, scale) * scale, gram)


def test_target_scoped_to_one_output_ignores_the_others():
    from onnxopt.passes.quantize.fallback import parse_target

    from onnxopt.errors import OnnxoptError

    target = parse_target("cosine>=0.99,sqnr>=20@kept|other")
    assert target.outputs == ("kept", "other")
    reference = [{"kept": np.ones(4, np.float32), "noisy": np.ones(4, np.float32)}]
    candidate = [{"kept": np.ones(4, np.float32), "noisy": -np.ones(4, np.float32)}]
    assert target.judge(reference, candidate)[0]
    assert not parse_target("cosine>=0.99").judge(reference, candidate)[0]
    model, data = _correlated_matmul()
    try:
        _quantize(model, data, target="cosine>=0.99@missing")
    except OnnxoptError as error:
        assert "missing" in str(error) and "y" in str(error)
    else:
        raise AssertionError("an unknown output in the target must be refused")


def test_gptq_leaves_layers_with_non_finite_inputs_to_nearest_rounding():
    # An infinity reaching a layer makes its XᵀX non-finite; NaN errors compared as
    # "better" before and GPTQ wrote NaN-derived integers.
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    model = make_model(
        nodes,
        [vi("x", [4, 16])],
        [vi("y", [4, 16])],
        [init("w", rng.normal(size=(16, 16))), init("w2", rng.normal(size=(16, 16)))],
    )
    samples = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(6)]
    finite, _ = round_weights(model, samples, per_channel=True)
    assert {key[0] for key in finite} == {"w", "w2"}
    samples[0]["x"][1, 3] = np.inf
    rounded, _ = round_weights(model, samples, per_channel=True)
    assert not rounded  # both layers see the infinity (h holds inf/nan too)
    assert all(np.isfinite(scale).all() for scale, _ in finite.values())
