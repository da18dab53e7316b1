"""AWQ-style input scaling of quantize_weights: the search on arrays, the fold or Mul surgery, the pass."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.layers import find_layers
from onnxopt.passes.common.stats import collect_input_stats
from onnxopt.passes.quantize.awq import apply_input_scales, plan_input_scales, scaled_site
from onnxopt.passes.quantize.nbits_math import awq_search, output_error, quantize_rtn
from onnxopt.passes.quantize.nbits_rewrite import find_sites

from onnxopt.data import Dataset
from onnxopt.pipeline import Context, create_pass
from onnxopt.runtime import run_model
from tests.builders import init, make_model, ops, vi

K, N = 64, 48
OUTLIERS = [3, 17, 40]  # input channels 30x larger than the rest


def _inputs(count: int = 16, rows: int = 8, seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        x = rng.normal(size=(rows, K)).astype(np.float32)
        x[:, OUTLIERS] *= 30
        samples.append({"x": x})
    return Dataset(samples)


def _gram_and_rms(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([s["x"] for s in data]).astype(np.float64)
    return rows.T @ rows / len(rows), np.sqrt((rows**2).mean(axis=0))


def _weight(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _model(*, residual: bool) -> onnx.ModelProto:
    """x -> Mul(gamma) -> h -> two MatMuls reading h (and, with ``residual``, an Add reading h too)."""
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["h"], name="norm_scale"),
        helper.make_node("MatMul", ["h", "w1"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y2"], name="mm2"),
        helper.make_node("Add", ["y1", "y2"], ["y"], name="sum"),
    ]
    outputs = [vi("y", [8, N])]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "h"], ["r"], name="residual"))
        outputs.append(vi("r", [8, K]))
    gamma = np.linspace(0.5, 1.5, K).astype(np.float32)
    inits = [init("gamma", gamma), init("w1", _weight((K, N), 2)), init("w2", _weight((K, N), 3))]
    return make_model(nodes, [vi("x", [8, K])], outputs, inits)


def _quantize(model: onnx.ModelProto, data: Dataset, **params: object):
    params.setdefault("lm_head_bits", 4)
    params.setdefault("target", None)
    result = create_pass("quantize_weights", method="rtn", **params)(copy.deepcopy(model), Context(calibration=data))
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _error(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset) -> float:
    ref, got = run_model(reference, list(data)), run_model(candidate, list(data))
    return float(sum(np.sum((r["y"] - g["y"]) ** 2) for r, g in zip(ref, got, strict=True)))


def test_search_lowers_the_output_error_of_rtn_on_outlier_channels():
    weight = _weight((N, K), 0)
    gram, rms = _gram_and_rms(_inputs())
    scale, alpha, ratio = awq_search([weight], [gram], rms, 4, 32)
    approx = quantize_rtn(weight * scale, 4, 32).dequantize() / scale
    plain = output_error(weight, quantize_rtn(weight, 4, 32).dequantize(), gram)
    assert alpha > 0 and ratio < 0.9
    assert output_error(weight, approx, gram) < 0.9 * plain
    assert scale[OUTLIERS].min() > np.delete(scale, OUTLIERS).max()  # the loud channels get the finer grid


def test_search_keeps_alpha_zero_when_inputs_are_alike():
    weight = _weight((N, K), 0)
    scale, _alpha, ratio = awq_search([weight], [np.eye(K)], np.ones(K), 4, 32)
    assert ratio == 1.0 and np.allclose(scale, 1.0)  # every alpha gives the same s: alpha 0 is kept


def _plans(model: onnx.ModelProto, data: Dataset):
    sites, _ = find_sites(model, embeddings=False, block=32)
    layers = [layer for layer in find_layers(model.graph, ("MatMul",))[0]]
    stats = collect_input_stats(model, layers, list(data))
    plans = plan_input_scales(sites, stats, {s.key: 4 for s in sites}, 32, symmetric=False, shared_weights=set())
    return sites, plans


def _float_with_scaled_weights(model: onnx.ModelProto, data: Dataset) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply the surgery and put ``W·diag(s)`` back as float MatMul weights: the model must not change."""
    scaled = copy.deepcopy(model)
    sites, plans = _plans(scaled, data)
    counts = apply_input_scales(scaled, plans)
    scale_of = {key: plan.scale for plan in plans for key in plan.readers}
    for tensor in scaled.graph.initializer:
        site = next((s for s in sites if s.weight == tensor.name), None)
        if site is not None and site.key in scale_of:
            matrix = scaled_site(site, scale_of[site.key]).matrix  # [N, K]
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(matrix.T), tensor.name))
    onnx.checker.check_model(scaled, full_check=True)
    return scaled, counts


def test_scales_folded_into_the_producer_keep_the_float_model_exact():
    model, data = _model(residual=False), _inputs()
    scaled, counts = _float_with_scaled_weights(model, data)
    assert counts == {"awq_folded": 1, "awq_inserted": 0}
    assert ops(scaled) == ops(model)  # no node added: gamma became gamma / s
    for ref, got in zip(run_model(model, list(data)), run_model(scaled, list(data)), strict=True):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-3)


def test_scales_go_to_an_inserted_mul_when_the_producer_has_other_readers():
    model, data = _model(residual=True), _inputs()
    scaled, counts = _float_with_scaled_weights(model, data)
    assert counts == {"awq_folded": 0, "awq_inserted": 1}
    assert ops(scaled).count("Mul") == 2
    for ref, got in zip(run_model(model, list(data)), run_model(scaled, list(data)), strict=True):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(got["r"], ref["r"])  # the other reader still sees h unscaled


def test_pass_with_awq_loads_in_onnxruntime_and_beats_rtn_on_outlier_inputs():
    model, data = _model(residual=True), _inputs()
    held = _inputs(seed=5)
    with_awq = _quantize(model, data, awq=True)
    without = _quantize(model, data, awq=False)
    assert ops(with_awq.model).count("MatMulNBits") == 2
    assert with_awq.stats["awq_inserted"] == 1 and any("AWQ input scales" in n for n in with_awq.notes)
    assert _error(model, with_awq.model, held) < 0.9 * _error(model, without.model, held)


def test_shared_weight_and_missing_data_leave_the_inputs_unscaled():
    model, data = _model(residual=False), _inputs()
    sites, _ = find_sites(model, embeddings=False, block=32)
    layers = find_layers(model.graph, ("MatMul",))[0]
    stats = collect_input_stats(model, layers, list(data))
    shared = {s.weight for s in sites}
    assert plan_input_scales(sites, stats, {s.key: 4 for s in sites}, 32, symmetric=False, shared_weights=shared) == []
    no_data = create_pass("quantize_weights", method="rtn", lm_head_bits=4)(copy.deepcopy(model), Context())
    assert no_data.stats["awq_folded"] == no_data.stats["awq_inserted"] == 0
    gamma = next(t for t in no_data.model.graph.initializer if t.name == "gamma")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(gamma), np.linspace(0.5, 1.5, K).astype(np.float32))


def test_a_plan_restricted_to_some_readers_leaves_the_others_reading_the_unscaled_input():
    model, data = _model(residual=False), _inputs()
    sites, plans = _plans(model, data)
    (plan,) = plans
    kept = plan.restricted({"y1"})  # y2's layer stays float: its weight is not rescaled
    assert kept is not None and kept.readers == ("y1",) and plan.restricted(set()) is None
    scaled = copy.deepcopy(model)
    counts = apply_input_scales(scaled, [kept])
    assert counts == {"awq_folded": 0, "awq_inserted": 1}  # the producer has an unscaled reader left: no fold
    site = next(s for s in sites if s.key == "y1")
    for tensor in scaled.graph.initializer:
        if tensor.name == site.weight:
            matrix = scaled_site(site, kept.scale).matrix
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(matrix.T), tensor.name))
    for ref, got in zip(run_model(model, list(data)), run_model(scaled, list(data)), strict=True):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-3)
