"""The lossy presets on the six Silero VAD models: If bodies, recurrent state, shape-driven If conditions.

Real models from the silero-vad wheel, speech-like audio chunks (benchmarks.inputs).
Each preset must write a model the gate's int8 profile passes on all calibration chunks.
"""

from __future__ import annotations

import pytest

from benchmarks import inputs as real_inputs
from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import load_model
from onnxopt.pipeline import Context, load_recipe

pytestmark = pytest.mark.real

SILERO = [
    "silero_vad",
    "silero_vad_op15",
    "silero_vad_sequence",
    "silero_vad_half",
    "silero_vad_op18",
    "silero_vad_openvino",
]


#: models whose every layer sits inside If bodies: no lossy pass may act (nor claim it did)
ALL_IN_IF_BODIES = ("silero_vad", "silero_vad_op18")


def _acted(record) -> bool:
    """Return what a lossy pass's record shows it did to the model, independent of its ``changed``."""
    if record.name == "quantize_int8":
        # Q/DQ inserted, or weights stored as int8 for float compute (Cast and Mul, no DequantizeLinear)
        before, after = record.before, record.after
        return after.ops != before.ops or after.param_bytes_by_dtype != before.param_bytes_by_dtype
    if record.name == "prune_magnitude":
        return record.stats.get("sparsity", 0.0) > 0
    return record.stats.get("layers_split", 0) > 0  # split_lowrank


@pytest.mark.parametrize("key", SILERO)
def test_lossy_presets_on_silero_stay_within_the_int8_profile(real_model, key):
    model = load_model(real_model(key))
    data = Dataset(real_inputs.vad_inputs(key, 24))
    acted = []
    for preset in ("int8", "prune", "lowrank"):
        result = load_recipe(preset).build().run(model, Context(calibration=data))
        report = check(model, result.model, data, profile="int8")
        assert report.passed, (preset, report.failures())
        notes = [n for record in result.records for n in record.notes]
        # shape-driven If conditions (op15, half) must not freeze every layer
        assert not any("decide an If/Loop condition" in n for n in notes), (preset, notes)
        for record in result.records:
            if record.name in ("quantize_int8", "prune_magnitude", "split_lowrank"):
                # `changed` means changed: quantize_int8 used to say True with no Q/DQ inserted
                assert record.changed == _acted(record), (preset, record.name, record.stats)
                if record.changed:
                    acted.append(record.name)
    if key in ALL_IN_IF_BODIES:
        assert acted == [], acted
    else:
        assert acted, "no lossy pass acted on a model with main-graph layers"
