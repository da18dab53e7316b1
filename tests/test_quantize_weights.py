"""quantize_weights: block-wise 4/8-bit weights (MatMulNBits, GatherBlockQuantized, QDQ) and their math."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxopt.passes.quantize.nbits_math import (
    lowrank_correction,
    output_error,
    pack_blocks,
    pack_zero_points,
    quantize_gptq,
    quantize_hqq,
    quantize_rtn,
)

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.pipeline import Context, create_pass
from onnxopt.runtime import run_model
from tests.builders import init, make_model, ops, vi

K, N = 64, 24


def _weight(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _samples(shape: tuple[int, ...], count: int = 8, name: str = "x") -> Dataset:
    rng = np.random.default_rng(7)
    return Dataset([{name: rng.normal(size=shape).astype(np.float32)} for _ in range(count)])


def _quantize(model: onnx.ModelProto, data: Dataset | None = None, **params: object):
    """Run the pass on a copy (it rewrites in place); a lone layer is the output projection: 4 bits unless told.

    No accuracy target and no AWQ scaling unless told: these tests check the rewrite, which
    the default task target would undo on layers whose 4-bit error is outside its floors
    (AWQ has its own tests in test_quantize_awq.py).
    """
    params.setdefault("lm_head_bits", 4)
    params.setdefault("target", None)
    params.setdefault("awq", False)
    result = create_pass("quantize_weights", **params)(copy.deepcopy(model), Context(calibration=data))
    onnx.checker.check_model(result.model, full_check=True)
    return result


def _outputs(model: onnx.ModelProto, data: Dataset) -> list[np.ndarray]:
    return [next(iter(o.values())) for o in run_model(model, list(data))]


def _within_quantization_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset, bound: float):
    """Assert the candidate's outputs differ from the float model's by a relative RMS error in (0, bound)."""
    ref, got = _outputs(reference, data), _outputs(candidate, data)
    error = np.sqrt(sum(np.sum((r - g) ** 2) for r, g in zip(ref, got, strict=True)))
    scale = np.sqrt(sum(np.sum(r**2) for r in ref))
    assert 0 < error / scale < bound, error / scale


def _matmul(weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [vi("x", [2, weight.shape[0]])], [vi("y", [2, weight.shape[1]])], [init("w", weight)])


# ------------------------------------------------------------------ math


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_matches_onnxruntime_quantizer_bit_for_bit(bits, symmetric):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = _weight((96, 40))  # [K, N] as onnxruntime takes it; 3 blocks of 32
    blocks, per_byte = 3, 8 // bits
    packed = np.zeros((40, blocks, 32 // per_byte), np.uint8)
    zeros = np.zeros((40, (blocks + per_byte - 1) // per_byte), np.uint8)
    scales = np.zeros((40, blocks), np.float32)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(
        packed, weight, scales, zeros, 32, 40, 96, symmetric
    )
    ours = quantize_rtn(weight.T, bits, 32, symmetric=symmetric)
    np.testing.assert_array_equal(pack_blocks(ours), packed)
    np.testing.assert_allclose(ours.scales, scales, rtol=1e-6)
    if not symmetric:
        np.testing.assert_array_equal(pack_zero_points(ours), zeros)


def test_rtn_pads_k_and_dequantizes_within_half_a_step():
    weight = _weight((5, 40))  # K = 40: a full block and a padded one
    quant = quantize_rtn(weight, 4, 32)
    assert quant.integers.shape == (5, 64) and quant.scales.shape == (5, 2)
    step = np.repeat(quant.scales, 32, axis=1)[:, :40]
    assert np.all(np.abs(quant.dequantize() - weight) <= step / 2 + 1e-6)


def test_hqq_lowers_the_weight_error_of_rtn():
    weight = _weight((64, 256), seed=3)
    weight[::7, ::11] *= 6  # outliers, which min/max ranges spend their grid on
    rtn = np.abs(quantize_rtn(weight, 4, 64).dequantize() - weight).mean()
    hqq = quantize_hqq(weight, 4, 64)
    assert hqq.float_zero_points
    assert np.abs(hqq.dequantize() - weight).mean() < rtn


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, 3)) @ rng.normal(size=(3, 64)) + 0.1 * rng.normal(size=(4000, 64))
    gram = x.T @ x / len(x)
    weight = _weight((16, 64), seed=5)
    rtn = output_error(weight, quantize_rtn(weight, 4, 32).dequantize(), gram)
    gptq = output_error(weight, quantize_gptq(weight, gram, 4, 32).dequantize(), gram)
    assert gptq < 0.7 * rtn


def test_lowrank_correction_is_the_best_rank_r_fit_of_the_error():
    rng = np.random.default_rng(6)
    error = rng.normal(size=(12, 20))
    u, v = lowrank_correction(error, np.eye(20), 3, damp=0.0)
    expected = np.linalg.svd(error)
    best = (expected[0][:, :3] * expected[1][:3]) @ expected[2][:3]
    np.testing.assert_allclose(u @ v, best, atol=1e-4)


# ------------------------------------------------------------------ rewrite


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_matmul_becomes_matmulnbits_close_to_float(method):
    model = _matmul(_weight((K, N)))
    data = _samples((2, K))
    result = _quantize(model, data, method=method)
    assert ops(result.model) == ["MatMulNBits"]
    node = result.model.graph.node[0]
    assert node.domain == "com.microsoft"
    assert {a.name: a.i for a in node.attribute} == {"K": K, "N": N, "bits": 4, "block_size": 32, "accuracy_level": 4}
    packed = next(t for t in result.model.graph.initializer if t.name == node.input[1])
    assert packed.data_type == onnx.TensorProto.UINT8 and packed.raw_data  # raw bytes, not int32_data
    assert list(packed.dims) == [N, 2, 16]
    _within_quantization_error(model, result.model, data, 0.15)


def test_file_shrinks_to_about_an_eighth_at_4_bits():
    model = _matmul(_weight((512, 256)))
    result = _quantize(model, method="rtn")
    ratio = result.stats["bytes_after"] / result.stats["bytes_before"]
    assert 0.12 < ratio < 0.2, ratio  # 4 bits + a float scale and 4-bit zero point per 32 weights


def test_gemm_with_trans_b_alpha_and_bias_is_folded():
    weight = _weight((N, K))  # transB: [N, K]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)
    model = make_model([node], [vi("x", [3, K])], [vi("y", [3, N])], [init("w", weight), init("c", _weight((N,), 1))])
    data = _samples((3, K))
    result = _quantize(model, data, method="rtn", bits=8, lm_head_bits=8)
    assert ops(result.model) == ["MatMulNBits"]
    assert len(result.model.graph.node[0].input) == 6  # the bias as the sixth input
    _within_quantization_error(model, result.model, data, 0.01)


def test_gemm_with_trans_a_is_left_alone():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)
    model = make_model([node], [vi("x", [K, 3])], [vi("y", [3, N])], [init("w", _weight((K, N)))])
    result = _quantize(model, method="rtn")
    assert not result.changed and ops(result.model) == ["Gemm"]


def test_shared_weight_is_stored_once_for_both_readers():
    weight = _weight((K, N))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["z", "w"], ["b"])]
    model = make_model(
        nodes, [vi("x", [2, K]), vi("z", [2, K])], [vi("a", [2, N]), vi("b", [2, N])], [init("w", weight)]
    )
    result = _quantize(model, method="rtn")
    assert ops(result.model) == ["MatMulNBits", "MatMulNBits"]
    first, second = result.model.graph.node
    assert first.input[1:] == second.input[1:]
    assert len(result.model.graph.initializer) == 3  # packed, scales, zero points


def test_weight_also_read_by_another_op_stays_float_for_it():
    weight = _weight((K, K))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Add", ["x", "w"], ["b"])]
    model = make_model(nodes, [vi("x", [K, K])], [vi("a", [K, K]), vi("b", [K, K])], [init("w", weight)])
    result = _quantize(model, method="rtn")
    assert ops(result.model) == ["MatMulNBits", "Add"]
    assert "w" in {t.name for t in result.model.graph.initializer}


def test_constant_node_weight_is_quantized():
    weight = _weight((K, N))
    const = helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(weight))
    model = make_model([const, helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, K])], [vi("y", [2, N])])
    data = _samples((2, K))
    result = _quantize(model, data, method="rtn")
    assert ops(result.model) == ["MatMulNBits"]
    _within_quantization_error(model, result.model, data, 0.15)


def test_batched_weight_with_unit_batch_is_squeezed_and_distinct_matrices_are_left():
    unit = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", [1, 2, K])],
        [vi("y", [1, 2, N])],
        [init("w", _weight((1, K, N)))],
    )
    data = _samples((1, 2, K))
    result = _quantize(unit, data, method="rtn")
    assert ops(result.model) == ["MatMulNBits"]
    _within_quantization_error(unit, result.model, data, 0.15)
    distinct = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", [2, 2, K])],
        [vi("y", [2, 2, N])],
        [init("w", _weight((2, K, N)))],
    )
    kept = _quantize(distinct, method="rtn")
    assert not kept.changed and any("batch of matrices" in note for note in kept.notes)


def test_non_float_and_activation_weights_do_not_fire():
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"])]
    model = make_model(nodes, [vi("x", [2, K]), vi("z", [K, N])], [vi("y", [2, N])])
    assert not _quantize(model, method="rtn").changed
    ints = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", [2, K], onnx.TensorProto.INT32)],
        [vi("y", [2, N], onnx.TensorProto.INT32)],
        [init("w", np.ones((K, N)), dtype=np.int32)],
    )
    assert not _quantize(ints, method="rtn").changed


def test_embedding_becomes_gather_block_quantized():
    table = _weight((50, K))
    node = helper.make_node("Gather", ["table", "ids"], ["y"])
    model = make_model([node], [vi("ids", [7], onnx.TensorProto.INT64)], [vi("y", [7, K])], [init("table", table)])
    data = Dataset([{"ids": np.array([0, 3, 49, 7, 7, 12, 30], dtype=np.int64)}])
    result = _quantize(model, method="rtn")
    assert ops(result.model) == ["GatherBlockQuantized"]
    _within_quantization_error(model, result.model, data, 0.15)
    assert not _quantize(model, method="rtn", embeddings=False).changed


def test_output_projection_defaults_to_8_bits():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["logits"])]
    model = make_model(
        nodes, [vi("x", [2, K])], [vi("logits", [2, N])], [init("w1", _weight((K, K))), init("w2", _weight((K, N), 1))]
    )
    result = _quantize(model, method="rtn", lm_head_bits=8)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in result.model.graph.node]
    assert bits == [4, 8]
    assert ops(_quantize(model, method="rtn", lm_head_bits=0).model) == ["MatMulNBits", "MatMul"]


def test_qdq_format_writes_blockwise_dequantize_linear_at_opset_21():
    model = _matmul(_weight((K, N)))
    data = _samples((2, K))
    result = _quantize(model, data, method="rtn", format="qdq")
    assert ops(result.model) == ["DequantizeLinear", "MatMul"]
    dq = result.model.graph.node[0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
    weight = next(t for t in result.model.graph.initializer if t.name == dq.input[0])
    assert weight.data_type == onnx.TensorProto.UINT4 and list(weight.dims) == [K, N]
    assert max(op.version for op in result.model.opset_import if op.domain in ("", "ai.onnx")) >= 21
    nbits = _quantize(_matmul(_weight((K, N))), method="rtn", accuracy_level=0)  # float activations, as QDQ
    np.testing.assert_allclose(_outputs(result.model, data)[0], _outputs(nbits.model, data)[0], rtol=1e-4, atol=1e-4)


def test_calibrated_methods_need_data():
    with pytest.raises(CalibrationDataError):
        _quantize(_matmul(_weight((K, N))), method="gptq")


def test_lowrank_correction_lowers_the_error():
    model = _matmul(_weight((K, N)))
    rng = np.random.default_rng(8)
    mixing = rng.normal(size=(4, K))
    data = Dataset([{"x": (rng.normal(size=(2, 4)) @ mixing).astype(np.float32)} for _ in range(16)])
    plain = _quantize(model, data, method="rtn")
    corrected = _quantize(model, data, method="rtn", lowrank=0.2)
    assert corrected.stats["lowrank_corrections"] == 1
    ref = _outputs(model, data)
    err = [np.linalg.norm(np.concatenate(_outputs(m.model, data)) - np.concatenate(ref)) for m in (plain, corrected)]
    assert err[1] < err[0]


def _two_layers() -> tuple[onnx.ModelProto, Dataset]:
    """Return x -> MatMul -> MatMul -> y and 16 calibration samples."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    model = make_model(
        nodes,
        [vi("x", [2, K])],
        [vi("y", [2, N])],
        [init("w1", _weight((K, K))), init("w2", _weight((K, N), 1))],
    )
    return model, Dataset([{"x": rng.normal(size=(2, K)).astype(np.float32)} for _ in range(16)])


def test_target_widens_the_most_sensitive_layers_to_8_bits():
    model, data = _two_layers()
    loose = _quantize(model, data, method="rtn", target="cosine>=0.9")
    assert loose.stats["layers_widened"] == 0
    strict = _quantize(model, data, method="rtn", target="cosine>=0.9999")
    assert strict.stats["target_met"] == 1 and strict.stats["layers_widened"] >= 1
    assert ops(strict.model) == ["MatMulNBits", "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in strict.model.graph.node)
    assert bits.count(8) == strict.stats["layers_widened"]


def test_target_keeps_the_layers_it_sends_up_in_float_with_widen_bits_0():
    model, data = _two_layers()
    strict = _quantize(model, data, method="rtn", target="cosine>=0.996", widen_bits=0)
    assert strict.stats["target_met"] == 1 and strict.stats["layers_widened"] == 1
    assert sorted(ops(strict.model)) == ["MatMul", "MatMulNBits"]
    _within_quantization_error(model, strict.model, data, 0.15)


def test_default_target_is_the_task_metrics_when_there_are_four_samples_to_judge_on():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    model = make_model(
        nodes, [vi("x", [2, K])], [vi("y", [2, N])], [init("w1", _weight((K, K))), init("w2", _weight((K, N), 1))]
    )
    judged = create_pass("quantize_weights", method="rtn")(copy.deepcopy(model), Context(calibration=_samples((2, K))))
    assert "target_met" in judged.stats and any("accuracy target task metrics" in n for n in judged.notes)
    few = create_pass("quantize_weights", method="rtn")(copy.deepcopy(model), Context(calibration=_samples((2, K), 2)))
    assert "target_met" not in few.stats and ops(few.model) == ["MatMulNBits", "MatMulNBits"]
    assert any("no accuracy target judged" in n for n in few.notes)


def test_presets_int4_and_int8_weights_exist():
    from onnxopt.pipeline import available_presets

    assert {"int4", "int8_weights"} <= set(available_presets())


def test_hqq_keeps_integer_zero_points_at_8_bits_which_the_cpu_kernel_needs():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["logits"])]
    model = make_model(
        nodes, [vi("x", [2, K])], [vi("logits", [2, N])], [init("w1", _weight((K, K))), init("w2", _weight((K, N), 1))]
    )
    data = _samples((2, K))
    result = _quantize(model, method="hqq", lm_head_bits=8)  # the 8-bit output projection falls back to RTN
    zero_types = {t.data_type for t in result.model.graph.initializer if t.name == result.model.graph.node[1].input[3]}
    assert zero_types == {onnx.TensorProto.UINT8}
    _within_quantization_error(model, result.model, data, 0.15)  # onnxruntime loads and runs it
