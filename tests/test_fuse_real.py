"""The ``fuse`` preset on real models and real inputs: outputs equal under the exact profile, fewer nodes."""

from __future__ import annotations

import onnx
import pytest

from benchmarks.common import feeds, model_path
from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import model_stats
from onnxopt.pipeline import load_recipe

pytestmark = pytest.mark.real

SILERO = [
    "silero_vad",
    "silero_vad_op15",
    "silero_vad_sequence",
    "silero_vad_half",
    "silero_vad_op18",
    "silero_vad_openvino",
]


def _real_inputs(key: str) -> Dataset:
    if key == "ppocr_det":
        from benchmarks.inputs import ppocr_det_inputs

        return Dataset(ppocr_det_inputs(2, size=(256, 256)))
    return Dataset(feeds(key, 3))


@pytest.mark.parametrize("key", ["ppocr_det", "ppocr_cls", *SILERO, "encoder"])
def test_fuse_preset_is_exact_and_smaller(real_model, key):
    if key == "encoder":
        pytest.importorskip("torch")
        pytest.importorskip("tokenizers")
        original = onnx.load(str(model_path("encoder")))
    else:
        original = onnx.load(str(real_model(key)))
    result = load_recipe("fuse").build().run(original)
    report = check(original, result.model, _real_inputs(key), profile="exact")
    assert report.passed, "\n".join(report.failures())
    before, after = model_stats(original).nodes, model_stats(result.model).nodes
    assert after < before or key == "silero_vad_op18"
    assert after <= before
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    onnx.checker.check_model(result.model)
