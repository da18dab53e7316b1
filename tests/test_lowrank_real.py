"""split_lowrank on the PyTorch-exported encoder with its default budget."""

from __future__ import annotations

import onnx
import pytest
from onnxopt.passes.lowrank.split import SplitLowRank

from onnxopt.data import Dataset
from onnxopt.normalize import normalize
from onnxopt.pipeline import Context
from tests.builders import assert_equivalent

# The default-budget search on the encoder takes about 4 minutes on 2 cores: kept out of CI.
pytestmark = [pytest.mark.real, pytest.mark.slow]


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
    assert_equivalent(model, result.model, profile="int8", data=calibration.split()[1])
