"""split_lowrank on the PyTorch-exported encoder with its default budget.

The whole-encoder search takes minutes (marked slow, kept out of CI); the feed-forward
block of one real MiniLM layer, cut out of the exported graph and fed the hidden states
real sentences produce, runs in CI in a few tens of seconds of CPU.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import helper
from onnx.utils import Extractor
from onnxopt.passes.lowrank.split import SplitLowRank

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent

pytestmark = pytest.mark.real

#: the feed-forward block of MiniLM layer 1: LayerNorm output -> MatMul 384x1536 -> GELU ->
#: MatMul 1536x384 -> residual Add -> LayerNorm
_FFN_IN = "/layer.1/attention/output/LayerNorm/Add_1_output_0"
_FFN_OUT = "/layer.1/output/LayerNorm/Add_1_output_0"


def _encoder() -> onnx.ModelProto:
    pytest.importorskip("torch")  # exports the encoder once (cached); CI=true makes a skip a failure
    pytest.importorskip("tokenizers")
    from benchmarks.encoder import encoder_model_path

    return onnx.load(str(encoder_model_path()))


def _hidden_states(encoder: onnx.ModelProto, n: int, offset: int) -> Dataset:
    """Return the FFN block's real inputs: the encoder's hidden states on ``n`` sentences from ``offset``."""
    from benchmarks.inputs import encoder_inputs
    from onnxopt.runtime import run_model

    probe = onnx.ModelProto()
    probe.CopyFrom(encoder)
    probe.graph.output.append(helper.make_empty_tensor_value_info(_FFN_IN))
    return Dataset([{_FFN_IN: o[_FFN_IN]} for o in run_model(probe, encoder_inputs(n, offset=offset))])


def test_real_transformer_ffn_split_within_default_budget_on_unseen_sentences():
    encoder = _encoder()
    block = normalize(Extractor(onnx.shape_inference.infer_shapes(encoder)).extract_model([_FFN_IN], [_FFN_OUT]))
    block_model = block.model
    assert sum(n.op_type == "MatMul" for n in block_model.graph.node) == 2
    calibration, unseen = _hidden_states(encoder, 16, 0), _hidden_states(encoder, 16, 100)
    result = SplitLowRank()(block_model, Context(calibration=calibration))
    # measured: the 1536x384 output projection at rank 204 of 384, 16.8 % of the block's
    # MatMul parameters saved; asserted with margin: at least 10 %
    assert result.changed and result.stats["layers_split"] >= 1, result.notes
    assert result.stats["params_saved"] >= 0.10 * result.stats["params_before"], result.stats
    # judged on 16 sentences the pass never saw: measured cosine 0.9973, SQNR 22.6 dB
    # against the int8 floors 0.995 / 20 dB
    assert_equivalent(block_model, result.model, profile="int8", data=unseen)


@pytest.mark.slow  # the default-budget search on the whole encoder: about 4 minutes on 2 cores
def test_encoder_split_within_default_budget():
    from benchmarks.encoder import encoder_model_path
    from benchmarks.inputs import encoder_inputs

    model = normalize(onnx.load(str(encoder_model_path()))).model
    calibration = Dataset(encoder_inputs(12))
    result = SplitLowRank()(model, Context(calibration=calibration))
    assert result.changed and result.stats["params_saved"] > 0
    # every attention block's query/key pair is matched and planned for joint head narrowing
    assert result.stats["head_pairs"] > 0
    assert sum(1 for n in result.notes if n.startswith("heads ")) == result.stats["head_pairs"]
    # judged on 12 sentences the pass never saw, not on the held-out quarter it tuned on
    assert_equivalent(model, result.model, profile="int8", data=Dataset(encoder_inputs(12, offset=100)))
