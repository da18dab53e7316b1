from __future__ import annotations

import onnx
import pytest
from onnxopt.passes.prune.magnitude import PruneMagnitude

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent

pytestmark = pytest.mark.real


def test_ppocr_cls_default_budget_search(real_model):
    from benchmarks.inputs import ppocr_cls_inputs

    model = normalize(onnx.load(str(real_model("ppocr_cls")))).model
    calibration = Dataset(ppocr_cls_inputs(32))
    result = PruneMagnitude(min_size=1024)(model, Context(calibration=calibration))
    assert result.changed and result.stats["sparsity"] > 0.05
    # the budget holds on the held-out quarter the pass (and the pipeline's verifier) checks
    assert_equivalent(model, result.model, profile="int8", data=calibration.split()[1])


def test_ppocr_det_channel_pruning_shrinks_the_convs_and_keeps_the_text_masks(real_model):
    """The default budget on PP-OCR det: a quarter of the MACs go (FPN and head convs too)."""
    from onnxopt.passes.prune.channels import PruneChannels

    from benchmarks.inputs import ppocr_det_inputs, task_agreement
    from onnxopt.runtime import run_model

    model = normalize(onnx.load(str(real_model("ppocr_det")))).model
    images = ppocr_det_inputs(72)
    calibration = Dataset(images[:32])
    result = PruneChannels()(model, Context(calibration=calibration))
    assert result.changed and result.stats["macs_removed"] > 0.15
    # groups behind Resize + Concat (the DB head's input) are pruned, not left alone
    assert any(n.startswith("conv2d_494.tmp_0: removed") for n in result.notes)
    assert not any("Concat" in n or "Resize" in n for n in result.notes)
    assert_equivalent(model, result.model, profile="int8", data=calibration.split()[1])
    unseen = images[48:]
    assert task_agreement("ppocr_det", run_model(model, unseen), run_model(result.model, unseen), unseen) >= 0.98
