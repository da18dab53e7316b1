"""Model I/O, normalization and graph helpers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt.model as model_module
from onnxopt.errors import ExternalDataError, ModelLoadError
from onnxopt.external import is_lazy, tensor_array
from onnxopt.graph import GraphIndex, NameGenerator, control_tensors, outer_references, remove_unused, toposort
from onnxopt.harness import check
from onnxopt.model import load_model, model_stats, save_model
from onnxopt.normalize import lift_constants, normalize
from tests.builders import init, make_model, vi


def _linear(n: int = 64) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, n])], [vi("y", [1, n])], [init("w", w)]
    )


def _if_model() -> onnx.ModelProto:
    """A model whose If branches read an outer tensor and hold a Constant weight."""
    then_c = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [2], [2, 3]))
    then_g = helper.make_graph([then_c, helper.make_node("Mul", ["h", "k"], ["t"])], "then", [], [vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [], [vi("e", [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    return make_model(nodes, [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])])


def test_load_from_path_bytes_and_proto_roundtrip(tmp_path):
    model = _linear()
    path = save_model(model, tmp_path / "m.onnx")
    assert load_model(path) == model
    assert load_model(path.read_bytes()) == model
    copy = load_model(model)
    copy.graph.node[0].name = "changed"
    assert model.graph.node[0].name == ""  # loading a proto copies it


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"not an onnx file at all \x00\xff", "not a valid ONNX"), (b"\x08\x07", "not an ONNX model")],
)
def test_bad_files_raise_model_load_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_truncated_file_is_detected(tmp_path):
    data = _linear(128).SerializeToString()
    for cut in (len(data) // 3, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load_model(path)


def test_external_data_roundtrip_and_threshold(tmp_path, monkeypatch):
    model = _linear(256)
    # Lower the 2 GB limit so the automatic switch to external data is exercised quickly.
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT", 100_000)
    path = save_model(model, tmp_path / "big.onnx")
    data_file = tmp_path / "big.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size >= 256 * 256 * 4
    assert path.stat().st_size < 10_000
    # The in-memory model is unchanged by saving.
    assert model.graph.initializer[0].HasField("raw_data")
    assert load_model(path, lazy=False) == model
    lazy = load_model(path)  # the default: the weight stays in the data file until read
    assert is_lazy(lazy.graph.initializer[0])
    np.testing.assert_array_equal(tensor_array(lazy.graph.initializer[0]), tensor_array(model.graph.initializer[0]))
    assert not list(tmp_path.glob(".onnxopt-*"))
    small = save_model(_linear(32), tmp_path / "small.onnx")  # 4 KB of weights: stays one file
    assert not (tmp_path / "small.onnx.data").exists() and load_model(small) == _linear(32)


def test_external_data_outside_folder_is_refused(tmp_path):
    model = _linear(64)
    save_model(model, tmp_path / "m.onnx", external_data=True)
    loaded = load_model(tmp_path / "m.onnx", load_external_data=False)
    for entry in loaded.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    evil = tmp_path / "sub"
    evil.mkdir()
    (evil / "m.onnx").write_bytes(loaded.SerializeToString())
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        load_model(evil / "m.onnx")


def test_missing_or_short_external_data(tmp_path):
    save_model(_linear(64), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ExternalDataError, match="shorter"):
        load_model(tmp_path / "m.onnx")
    data.unlink()
    with pytest.raises(ExternalDataError, match="missing"):
        load_model(tmp_path / "m.onnx")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(_linear(), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_lift_constants_in_subgraphs_keeps_outputs():
    model = _if_model()
    reference = load_model(model)
    assert lift_constants(model) == 1
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    assert [t.name for t in then_branch.initializer] == ["k"]
    assert all(n.op_type != "Constant" for n in then_branch.node)
    data = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(flag)} for flag in (True, False)]
    from onnxopt.data import Dataset

    assert check(reference, model, Dataset(data)).passed


def test_normalize_survives_failed_shape_inference():
    # A custom-domain op: shape inference knows nothing of it, normalization still works.
    model = make_model(
        [helper.make_node("Mystery", ["x"], ["y"], domain="custom.ops"), helper.make_node("Relu", ["y"], ["z"])],
        [vi("x", ["n", 4])],
        [vi("z", ["n", 4])],
        extra_opsets={"custom.ops": 1},
    )
    result = normalize(model)
    assert result.model.graph.node[0].domain == "custom.ops"
    assert [o.domain for o in result.model.opset_import] == ["", "custom.ops"]


def test_graph_index_counts_outer_scope_reads_and_remove_unused_keeps_them():
    model = _if_model()
    index = GraphIndex(model.graph)
    assert [n.op_type for n in index.consumers["h"]] == ["If"]
    assert all(outer_references(a.g) == {"h"} for a in model.graph.node[1].attribute)
    model.graph.node.append(helper.make_node("Neg", ["x"], ["dead"]))
    assert remove_unused(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "If"]


def test_toposort_and_name_generator():
    model = _linear()
    model.graph.node.insert(0, helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    toposort(model.graph)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Relu"]
    names = NameGenerator(model)
    assert names.fresh("w") != "w"
    assert names.fresh("brand_new") == "brand_new"
    assert names.fresh("brand_new") != "brand_new"


def test_model_stats_counts_subgraphs_and_constant_weights():
    stats = model_stats(_if_model())
    assert stats.nodes == 5  # Relu, If, Constant, Mul, Neg
    assert stats.subgraphs == 2
    assert stats.weights_in_constants == 2


@pytest.mark.real
@pytest.mark.parametrize(
    "key",
    [
        "ppocr_det",
        "ppocr_cls",
        "silero_vad",
        "silero_vad_op15",
        "silero_vad_sequence",
        "silero_vad_half",
        "silero_vad_op18",
        "silero_vad_openvino",
    ],
)
def test_real_models_roundtrip_identically(real_model, tmp_path, key):
    path = real_model(key)
    original = load_model(path)
    normalized = normalize(load_model(original)).model
    out = save_model(normalized, tmp_path / "n.onnx")
    reloaded = load_model(out)
    assert [(o.domain, o.version) for o in reloaded.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    assert model_stats(reloaded).subgraphs == model_stats(original).subgraphs
    has_sr = any(i.name == "sr" for i in original.graph.input)
    synth = {"int_ranges": {"sr": (16000, 16000)} if has_sr else {}, "dynamic_dim": 512}
    if key == "ppocr_det":
        synth = {"shapes": {"x": [1, 3, 96, 96]}}
    report = check(original, reloaded, synthesize=synth, levels=("disabled",))
    assert report.passed, report.failures()
    for out_cmp in report.levels[0].outputs:
        assert out_cmp.max_abs == 0.0  # normalization is bit-exact


def test_body_returning_an_outer_value_counts_as_a_use():
    body = helper.make_graph([], "then", [], [vi("h", [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [2])])
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["h"]),
            helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other),
        ],
        [vi("x", [2]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [2])],
    )
    assert outer_references(body) == {"h"}
    assert remove_unused(model.graph) == 0


def test_initializer_that_is_an_input_default_survives_remove_unused():
    model = _linear()
    model.graph.initializer.append(init("opt", [1.0]))
    model.graph.input.append(vi("opt", [1]))
    remove_unused(model.graph)
    assert "opt" in {t.name for t in model.graph.initializer}


@pytest.mark.real
@pytest.mark.parametrize(
    ("key", "opset", "inputs", "if_nodes", "constant_nodes"),
    [
        (
            "ppocr_det",
            12,
            ["x: float32[p2o.DynamicDimension.0, 3, p2o.DynamicDimension.1, p2o.DynamicDimension.2]"],
            0,
            342,
        ),
        ("ppocr_cls", 11, ["x: float32[?, 3, ?, ?]"], 0, 308),
        ("silero_vad", 16, ["input: float32[?, ?]", "state: float32[2, ?, 128]", "sr: int64[]"], 25, 341),
        (
            "silero_vad_op18",
            18,
            ["input: float32[batch, sequence]", "sr: int64[]", "state: float32[2, batch, 128]"],
            None,
            0,
        ),
    ],
)
def test_inspect_describes_real_models(real_model, key, opset, inputs, if_nodes, constant_nodes):
    from onnxopt.describe import describe_model

    description = describe_model(real_model(key))
    assert description.opsets == {"ai.onnx": opset}
    assert description.inputs == inputs
    assert description.weights["constant_nodes"] == constant_nodes
    assert description.weights["external_tensors"] == 0
    if if_nodes is not None:
        assert description.subgraphs.get("If", 0) == if_nodes
    assert description.params > 100_000
    assert description.file_bytes == real_model(key).stat().st_size


def test_sparse_initializers_are_seen_by_graph_helpers():
    from onnxopt.graph import GraphIndex

    dense = np.zeros((4, 4), np.float32)
    dense[1, 2], dense[3, 0] = 5.0, -1.0
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.array([5.0, -1.0], np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([6, 12], np.int64), "w_idx"),
        [4, 4],
    )
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    model.graph.sparse_initializer.append(sparse)
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            onnx.numpy_helper.from_array(np.array([1.0], np.float32), "unused"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "unused_idx"),
            [2],
        )
    )
    index = GraphIndex(model.graph)
    assert index.is_constant("w") and np.array_equal(index.constant("w"), dense)
    assert NameGenerator(model).fresh("w") != "w"
    assert remove_unused(model.graph) == 1
    assert [s.values.name for s in model.graph.sparse_initializer] == ["w"]


def test_lossy_passes_say_they_left_subgraph_layers_alone():
    from onnxopt.graph import nested_ops
    from onnxopt.pipeline import Context, create_pass

    rng = np.random.default_rng(0)
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [vi("t", [1, 64])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [1, 64])])
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
        [vi("x", [1, 64]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [1, 64])],
        [init("w", rng.standard_normal((64, 64)))],
    )
    assert nested_ops(model.graph, ["MatMul"]) == 1 and nested_ops(model.graph, ["Conv"]) == 0
    result = create_pass("prune_magnitude", sparsity=0.5)(load_model(model), Context())
    assert not result.changed
    assert any("inside If/Loop/Scan bodies alone" in note for note in result.notes)


def test_control_tensors_follow_values_into_an_if_condition_but_not_through_shape():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["a"])], "then", [], [vi("a", [2, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["b"])], "else", [], [vi("b", [2, 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
        helper.make_node("Greater", ["rows", "one"], ["by_shape"]),
        helper.make_node("If", ["by_shape"], ["y1"], then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["x", "w2"], ["k"]),
        helper.make_node("ReduceSum", ["k"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero_f"], ["by_value"]),
        helper.make_node("If", ["by_value"], ["y2"], then_branch=then, else_branch=other),
    ]
    inits = [
        init("w", np.eye(4)),
        init("w2", np.eye(4)),
        init("zero", np.array(0), np.int64),
        init("one", np.array(1), np.int64),
        init("zero_f", np.array(0.0)),
    ]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("y1", [2, 4]), vi("y2", [2, 4])], inits)
    found = control_tensors(model.graph)
    assert {"by_shape", "rows", "shape"} <= found and "h" not in found  # a shape does not depend on values
    assert {"by_value", "total", "k", "x", "w2"} <= found
