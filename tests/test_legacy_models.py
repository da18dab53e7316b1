"""Old and odd models (#17): IR-3 models stay valid through int8; fuse keeps the opset unless asked."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxopt.passes.common.graphs import opset_version

from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import save_model
from onnxopt.pipeline import Context, load_recipe
from tests.builders import init, make_model, vi


def _ir3_pad_conv() -> onnx.ModelProto:
    """An IR-3, opset-6 export: Pad with a ``pads`` attribute, weights in Constant nodes."""
    rng = np.random.default_rng(0)

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, f"{name}_value"))

    nodes = [
        const("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        const("b1", rng.standard_normal(8).astype(np.float32)),
        const("w2", rng.standard_normal((4, 8, 3, 3)).astype(np.float32)),
        helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant"),
        helper.make_node("Conv", ["p", "w1", "b1"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 16, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    onnx.checker.check_model(model)
    return model


def test_int8_keeps_an_ir3_model_valid_and_loadable(tmp_path):
    model = _ir3_pad_conv()
    rng = np.random.default_rng(1)
    calib = Dataset([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)])
    spec = load_recipe("int8").with_overrides({"check_latency": False})
    result = spec.build().run(model, Context(calibration=calib))
    written = result.model
    assert written.ir_version == 3
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)
    onnx.checker.check_model(written, full_check=True)
    inputs = {i.name for i in written.graph.input}
    assert all(t.name in inputs for t in written.graph.initializer)
    path = save_model(written, tmp_path / "int8.onnx")
    assert [i.name for i in ort.InferenceSession(str(path)).get_inputs()] == ["x"]
    reference = save_model(model, tmp_path / "ref.onnx")
    assert check(reference, path, calib, profile="int8").passed


def _hardswish_model(opset: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "div"], ["y"]),
    ]
    inits = [
        init("three", np.array(3.0, np.float32)),
        init("zero", np.array(0.0, np.float32)),
        init("six", np.array(6.0, np.float32)),
        init("div", np.array(6.0, np.float32)),
    ]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits, opset=opset)


def test_fuse_keeps_the_opset_unless_the_upgrade_is_allowed():
    model = _hardswish_model(11)
    kept = load_recipe("fuse").build().run(model)
    assert opset_version(kept.model) == 11
    assert sorted(n.op_type for n in kept.model.graph.node) == ["HardSigmoid", "Mul"]
    notes = [n for r in kept.records for n in r.notes]
    assert any("kept opset 11" in n for n in notes)
    upgraded = load_recipe("fuse").with_overrides({"allow_opset_upgrade": True}).build().run(model)
    assert opset_version(upgraded.model) == 14
    assert [n.op_type for n in upgraded.model.graph.node] == ["HardSwish"]


def test_fusions_do_not_write_ops_onnxruntime_cannot_run_in_float64():
    # found by the sweep: HardSigmoid/HardSwish/Gelu have no float64 kernel in onnxruntime's CPU provider
    from tests.sweep_models import sweep_cases

    cases = [c for c in sweep_cases() if c.dtype == "float64" and c.opset == 20 and c.ir_version == 10]
    for case in (c for c in cases if c.name in ("HardSwish-pattern", "Gelu-pattern")):
        model = case.build()
        result = load_recipe("fuse").build().run(model)
        ops = {n.op_type for n in result.model.graph.node}
        assert not ops & {"HardSwish", "HardSigmoid", "Gelu"}, case.id
        notes = [n for r in result.records for n in r.notes]
        assert any("no" in n and "kernel for double inputs" in n for n in notes), case.id
        if case.name == "HardSwish-pattern":  # (Erf has no float64 kernel either: that model never ran)
            ort.InferenceSession(result.model.SerializeToString())
