"""quantize_weights on models in external data: layer by layer, new weights spilled, same result as in memory."""

from __future__ import annotations

import numpy as np
import onnx
import onnxopt.passes.quantize.nbits_math as math_module
import onnxopt.passes.quantize.nbits_rewrite as rewrite_module
import pytest
from onnx import helper
from onnxopt.passes.quantize.nbits_math import quantize_hqq, quantize_rtn

from onnxopt.data import Dataset
from onnxopt.external import Spill, is_lazy
from onnxopt.harness import check
from onnxopt.model import load_model, save_model
from onnxopt.pipeline import Context, create_pass
from tests.builders import init, make_model, vi


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_rounding_by_row_chunks_equals_the_whole_matrix(method, monkeypatch):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((300, 96)).astype(np.float32)
    quantize = {"rtn": lambda m: quantize_rtn(m, 4, 32), "hqq": lambda m: quantize_hqq(m, 4, 32)}[method]
    whole = quantize(matrix)
    monkeypatch.setattr(math_module, "_CHUNK_ELEMENTS", 96 * 7)  # 7 rows a chunk: 43 chunks, the last short
    chunked = math_module.quantize_by_rows(quantize, matrix)
    np.testing.assert_array_equal(chunked.integers, whole.integers)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    assert chunked.columns == whole.columns and chunked.bits == whole.bits


def _decoder_like(width: int = 512, vocab: int = 1024) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w_up"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("MatMul", ["r", "w_down"], ["d"]),
        helper.make_node("MatMul", ["d", "lm_head"], ["logits"]),
    ]
    inits = [
        init("embed", rng.standard_normal((vocab, width)) * 0.1),
        init("w_up", rng.standard_normal((width, 2 * width)) * 0.05),  # 2 MB
        init("w_down", rng.standard_normal((2 * width, width)) * 0.05),
        init("lm_head", rng.standard_normal((width, vocab)) * 0.05),
    ]
    return make_model(nodes, [vi("ids", [1, 4], onnx.TensorProto.INT64)], [vi("logits", [1, 4, vocab])], inits)


def test_a_lazy_model_is_quantized_layer_by_layer_into_the_spill(tmp_path, monkeypatch):
    monkeypatch.setattr(rewrite_module, "_SPILL_BYTES", 4096)  # the test's weights are small
    model = _decoder_like()
    path = save_model(model, tmp_path / "src" / "decoder.onnx", external_data=True)
    in_memory = create_pass("quantize_weights", method="rtn")(load_model(path, lazy=False), Context())
    with Spill(tmp_path) as spill:
        result = create_pass("quantize_weights", method="rtn")(load_model(path), Context(spill=spill))
        packed = [t for t in result.model.graph.initializer if t.name.endswith(("_q4", "_q8"))]
        assert len(packed) == 4 and all(is_lazy(t) for t in packed), "packed weights went to the spill"
        assert spill.written >= sum(4 * 512 * 1024 // 8 for _ in range(2))
        out = save_model(result.model, tmp_path / "out" / "lazy.onnx")
    reference = save_model(in_memory.model, tmp_path / "ref" / "memory.onnx")
    ids = Dataset([{"ids": np.array([[1, 5, 9, 1000]], np.int64)}])
    report = check(reference, out, ids, levels=("disabled",))
    assert report.passed, report.failures()  # the same model either way
