"""The ``fuse`` preset on real models: outputs equal under the exact profile, fewer nodes."""

from __future__ import annotations

import onnx
import pytest

from onnxopt.harness import check
from onnxopt.model import model_stats
from onnxopt.pipeline import load_recipe

pytestmark = pytest.mark.real

SILERO = ["silero_vad", "silero_vad_op15", "silero_vad_sequence", "silero_vad_half", "silero_vad_op18",
          "silero_vad_openvino"]


def synthesize_options(key: str, model: onnx.ModelProto) -> dict:
    if key == "ppocr_det":
        return {"shapes": {"x": (1, 3, 256, 256)}, "iterations": 2}
    options: dict = {"dynamic_dim": 512, "iterations": 2}
    if any(i.name == "sr" for i in model.graph.input):
        options["int_ranges"] = {"sr": (16000, 16000)}
    return options


@pytest.mark.parametrize("key", ["ppocr_det", "ppocr_cls", *SILERO])
def test_fuse_preset_is_exact_and_smaller(real_model, key):
    original = onnx.load(str(real_model(key)))
    result = load_recipe("fuse").build().run(original)
    report = check(original, result.model, synthesize=synthesize_options(key, original), profile="exact")
    assert report.passed, "\n".join(report.failures())
    before, after = model_stats(original).nodes, model_stats(result.model).nodes
    assert after < before or key == "silero_vad_op18"
    assert after <= before
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    onnx.checker.check_model(result.model)
