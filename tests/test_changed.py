"""`changed` means changed: every registered pass reports False on a model it cannot act on.

A pass that reports ``changed=True`` without changing anything makes the manager verify and
re-run for nothing and makes tests that count "acted" passes lie (quantize_int8 on Silero VAD
used to say True with zero QuantizeLinear). Each pass runs on models it has nothing to do
with; the result must say False *and* be the input model, byte for byte, and the input must
not be mutated.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.data import Dataset
from onnxopt.pipeline import Context, available_passes, create_pass
from tests.builders import init, make_model, vi


def _relu_only() -> onnx.ModelProto:
    """One Relu: no weight, no constant, nothing to fold, fuse, prune, split or quantize."""
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [1, 16])], [vi("y", [1, 16])])


def _weights_in_if_bodies() -> onnx.ModelProto:
    """MatMul layers only inside If branches (like Silero VAD): lossy passes change the main graph only."""

    def branch(name: str, seed: int) -> onnx.GraphProto:
        weight = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
            name,
            [],
            [vi(f"y_{name}", [1, 64])],
            [init(f"w_{name}", weight)],
        )

    node = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=branch("then", 1), else_branch=branch("else", 2)
    )
    return make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [1, 64])], [vi("y", [1, 64])])


MODELS = {"relu_only": _relu_only, "weights_in_if_bodies": _weights_in_if_bodies}


def _calibration(model: onnx.ModelProto, n: int = 16) -> Dataset:
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(n):
        sample: dict[str, np.ndarray] = {}
        for value in model.graph.input:
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if value.type.tensor_type.elem_type == TensorProto.BOOL:
                sample[value.name] = np.array(True)
            else:
                sample[value.name] = rng.standard_normal(shape).astype(np.float32)
        samples.append(sample)
    return Dataset(samples)


def test_every_registered_pass_is_covered():
    # the cases below are built from the registry: a pass registered later is covered too
    assert {"quantize_int8", "prune_magnitude", "prune_channels", "split_lowrank"} <= set(BUILTIN)


# the project's own passes: other test modules register throwaway passes in the same registry
BUILTIN = sorted(name for name, cls in available_passes().items() if cls.__module__.startswith("onnxopt.passes"))


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("name", BUILTIN)
def test_pass_reports_unchanged_on_a_model_it_cannot_act_on(name, model_key):
    model = MODELS[model_key]()
    before = model.SerializeToString(deterministic=True)
    pass_ = create_pass(name)
    ctx = Context(calibration=_calibration(model)) if not pass_.exact else Context()
    result = pass_(model, ctx)
    assert result.changed is False, (name, model_key, result.stats, result.notes)
    assert result.model.SerializeToString(deterministic=True) == before, (name, model_key, "model differs")
    assert model.SerializeToString(deterministic=True) == before, (name, model_key, "input was mutated")
