from __future__ import annotations

import onnx
import pytest
from onnxopt.passes.prune import prune_magnitude

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent

pytestmark = pytest.mark.real


def test_ppocr_cls_default_budget_search(real_model):
    from benchmarks.inputs import ppocr_cls_inputs

    model = normalize(onnx.load(str(real_model("ppocr_cls")))).model
    calibration = Dataset(ppocr_cls_inputs(32))
    result = prune_magnitude(min_size=1024)(model, Context(calibration=calibration))
    assert result.changed and result.stats["sparsity"] > 0.05
    # the budget holds on the held-out quarter the pass (and the pipeline's verifier) checks
    assert_equivalent(model, result.model, profile="int8", data=calibration.split()[1])
