"""The int8 profile judges quantized models by whether they still do their job.

Models made by onnxruntime.quantization.quantize_static (the tool users try first):
those whose task agreement with the float model is >= 0.99 must pass, collapsed ones
(agreement < 0.9) must fail; in between either verdict is acceptable.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from benchmarks import inputs as real_inputs
from onnxopt.harness import PROFILES, compare_outputs
from onnxopt.runtime import run_model

pytestmark = pytest.mark.real
quantization = pytest.importorskip("onnxruntime.quantization")


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, samples):
        self._samples = iter(samples)

    def get_next(self):
        return next(self._samples, None)


def _quantize(path, out, calib, **options):
    quantization.quantize_static(
        str(path), str(out), _Reader(calib), quant_format=quantization.QuantFormat.QDQ, **options
    )
    return onnx.load(str(out))


@pytest.mark.parametrize("key", ["ppocr_cls", "ppocr_det"])
def test_int8_profile_separates_working_from_collapsed_quantization(real_model, tmp_path, key):
    path = real_model(key)
    if key == "ppocr_cls":
        calib, held = real_inputs.ppocr_cls_inputs(16, seed=1), real_inputs.ppocr_cls_inputs(48, seed=7)
    else:
        calib = real_inputs.ppocr_det_inputs(6, size=(320, 320), seed=1)
        held = real_inputs.ppocr_det_inputs(6, size=(320, 320), seed=5)
    model = onnx.load(str(path))
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    zeros = [{k: np.full_like(v, 0.01) for k, v in s.items()} for s in calib]
    variants = {
        "all_per_channel": (calib, {"per_channel": True}),
        "last_conv_only": (calib, {"per_channel": True, "nodes_to_quantize": convs[-1:]}),
        "last_three_convs": (calib, {"per_channel": True, "nodes_to_quantize": convs[-3:]}),
        "calibrated_on_constant_input": (zeros, {}),
    }
    reference = run_model(model, held)
    verdicts = {}
    for name, (data, options) in variants.items():
        candidate = run_model(_quantize(path, tmp_path / f"{name}.onnx", data, **options), held)
        agreement = real_inputs.task_agreement(key, reference, candidate)
        passed = compare_outputs(reference, candidate, profile=PROFILES["int8"]).passed
        verdicts[name] = (round(agreement, 4), passed)
    good = [v for v in verdicts.values() if v[0] >= 0.99]
    collapsed = [v for v in verdicts.values() if v[0] < 0.9]
    assert good and collapsed, verdicts  # the test must see both kinds
    assert all(passed for _, passed in good), verdicts
    assert not any(passed for _, passed in collapsed), verdicts
