"""Lazy external data: weights stay in their files through load, passes, sessions and save."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.data import Dataset
from onnxopt.errors import ExternalDataError
from onnxopt.external import (
    Spill,
    check_model,
    has_lazy_tensors,
    is_lazy,
    lazy_bytes,
    release,
    replace_initializer,
    tensor_array,
    tensor_digest,
)
from onnxopt.harness import check
from onnxopt.model import load_model, model_stats, save_model
from onnxopt.pipeline import Context, PassManager, load_recipe
from onnxopt.runtime import Session
from tests.builders import init, make_model, vi


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """Two MatMul+Add layers, a LayerNorm-free MLP with a duplicated weight and an Identity."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("Identity", ["r"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w2"], ["g"]),
        helper.make_node("MatMul", ["x", "w1_copy"], ["k"]),
        helper.make_node("Concat", ["g", "k"], ["y"], axis=1),
    ]
    inits = [
        init("w1", w1),
        init("b1", rng.standard_normal(32)),
        init("w2", rng.standard_normal((32, 16))),
        init("w1_copy", w1.copy()),
    ]
    return make_model(nodes, [vi("x", [2, 16])], [vi("y", [2, 48])], inits)


@pytest.fixture
def external_model(tmp_path):
    path = save_model(_mlp(), tmp_path / "src" / "mlp.onnx", external_data=True)
    return path


def _data() -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset([{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(2)])


def test_external_model_loads_lazily_and_reads_through_the_accessor(external_model):
    model = load_model(external_model)
    lazy = [t for t in model.graph.initializer if is_lazy(t)]
    assert {t.name for t in lazy} == {"w1", "w2", "w1_copy", "b1"} - {"b1"}  # b1 is under 1 KB: inline
    assert all(not t.raw_data for t in lazy)
    eager = load_model(external_model, lazy=False)
    assert not has_lazy_tensors(eager)
    for tensor, reference in zip(model.graph.initializer, eager.graph.initializer, strict=True):
        array = tensor_array(tensor)
        np.testing.assert_array_equal(array, onnx.numpy_helper.to_array(reference))
    mapped = tensor_array(lazy[0])
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    assert lazy_bytes(model) == 3 * 16 * 32 * 4
    assert model_stats(model).bytes >= lazy_bytes(model)
    assert tensor_digest(lazy[0]) == tensor_digest(eager.graph.initializer[0])


def test_lazy_model_checks_and_runs_without_reading_weights_into_the_proto(external_model):
    model = load_model(external_model)
    check_model(model, full_check=True)  # the checker sees placeholders, not the data
    reference = Session(external_model)
    lazy = Session(model)
    sample = _data()[0]
    np.testing.assert_array_equal(lazy.run(sample)["y"], reference.run(sample)["y"])


def test_checker_still_catches_a_broken_lazy_model(external_model):
    model = load_model(external_model)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError):
        check_model(model, full_check=True)


def test_streaming_save_copies_lazy_tensors_and_leaves_the_model_lazy(external_model, tmp_path):
    model = load_model(external_model)
    before = [t.SerializeToString() for t in model.graph.initializer]
    out = save_model(model, tmp_path / "out" / "copy.onnx")
    assert (tmp_path / "out" / "copy.onnx.data").is_file()
    assert [t.SerializeToString() for t in model.graph.initializer] == before  # still pointing at the source
    saved = onnx.load(str(out), load_external_data=False)
    for tensor in saved.graph.initializer:
        keys = {e.key for e in tensor.external_data}
        assert "basepath" not in keys
    assert check(external_model, out, _data(), levels=("disabled",)).passed
    assert not list((tmp_path / "out").glob(".onnxopt-*")), "the temporary folder is removed"


def test_saving_over_the_source_rebinds_lazy_tensors(external_model):
    model = load_model(external_model)
    expected = {t.name: np.array(tensor_array(t)) for t in model.graph.initializer}
    extra = init("extra", np.arange(1024, dtype=np.float32))
    model.graph.initializer.insert(0, extra)  # shifts every offset in the rewritten data file
    save_model(model, external_model)
    for tensor in model.graph.initializer[1:]:
        np.testing.assert_array_equal(tensor_array(tensor), expected[tensor.name])


def test_save_without_external_data_inlines_lazy_tensors(external_model, tmp_path):
    model = load_model(external_model)
    out = save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert check(external_model, out, _data(), levels=("disabled",)).passed


def test_fuse_runs_on_a_lazy_model_and_keeps_untouched_weights_lazy(external_model, tmp_path):
    model = load_model(external_model)
    with Spill(tmp_path) as spill:
        result = load_recipe("fuse").build().run(model, Context(spill=spill))
        names = {t.name for t in result.model.graph.initializer}
        assert "w1_copy" not in names, "the duplicate weight was merged by its digest"
        assert all(is_lazy(t) for t in result.model.graph.initializer if t.name in ("w1", "w2"))
        out = save_model(result.model, tmp_path / "fused" / "mlp.onnx")
    assert "Identity" not in [n.op_type for n in result.model.graph.node]
    assert check(external_model, out, _data(), levels=("disabled",)).passed


def test_spill_holds_new_tensors_on_disk(tmp_path):
    model = _mlp()
    big = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)
    with Spill(tmp_path) as spill:
        tensor = replace_initializer(model.graph, "w2", big[:32, :16].copy(), spill=spill, min_bytes=0)
        assert is_lazy(tensor) and spill.written == 32 * 16 * 4
        np.testing.assert_array_equal(tensor_array(tensor), big[:32, :16])
        small = replace_initializer(model.graph, "b1", np.zeros(32, np.float32), spill=spill)
        assert not is_lazy(small), "under min_bytes: kept in memory"
        out = save_model(model, tmp_path / "spilled.onnx")
        folder = spill.folder
    assert not folder.exists()
    reloaded = load_model(out, lazy=False)
    w2 = next(t for t in reloaded.graph.initializer if t.name == "w2")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w2), big[:32, :16])


def test_pipeline_copy_of_a_lazy_model_is_small(external_model):
    model = load_model(external_model)
    result = PassManager([]).run(model)
    assert result.model.ByteSize() < 4096, "weights were not copied into the pipeline's working model"


def test_missing_data_file_is_reported_at_load(external_model):
    (external_model.parent / "mlp.onnx.data").unlink()
    with pytest.raises(ExternalDataError, match="missing"):
        load_model(external_model)


def test_deduplicate_compares_digests_when_sampled_blocks_agree(tmp_path):
    base = np.arange(10000, dtype=np.float32)
    other = base.copy()
    other[3000] = -1.0  # outside the start, middle and end blocks the fingerprint samples
    same = base.copy()
    nodes = [helper.make_node("Add", ["x", name], [f"y{i}"]) for i, name in enumerate(("a", "b", "c"))]
    nodes.append(helper.make_node("Concat", ["y0", "y1", "y2"], ["y"], axis=0))
    model = make_model(
        nodes, [vi("x", [10000])], [vi("y", [30000])], [init("a", base), init("b", other), init("c", same)]
    )
    path = save_model(model, tmp_path / "dups.onnx", external_data=True)
    result = load_recipe("fuse").build().run(load_model(path))
    kept = sorted(t.name for t in result.model.graph.initializer)
    assert kept == ["a", "b"], kept
    out = save_model(result.model, tmp_path / "out" / "dups.onnx")
    sample = Dataset([{"x": np.ones(10000, np.float32)}])
    assert check(path, out, sample, levels=("disabled",)).passed


def test_a_fusion_writes_its_new_large_weight_to_the_spill(tmp_path):
    rng = np.random.default_rng(2)
    channels = 256
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    inits = [
        init("w", rng.standard_normal((channels, 128, 3, 3)) * 0.05),  # 1.2 MB: over the spill threshold
        init("gamma", rng.uniform(0.5, 1.5, channels)),
        init("beta", rng.standard_normal(channels)),
        init("mean", rng.standard_normal(channels)),
        init("var", rng.uniform(0.5, 1.5, channels)),
    ]
    model = make_model(nodes, [vi("x", [1, 128, 6, 6])], [vi("y", [1, channels, 6, 6])], inits)
    path = save_model(model, tmp_path / "conv.onnx", external_data=True)
    with Spill(tmp_path) as spill:
        result = load_recipe("fuse").build().run(load_model(path), Context(spill=spill))
        assert [n.op_type for n in result.model.graph.node] == ["Conv"]
        weight = next(t for t in result.model.graph.initializer if t.name == result.model.graph.node[0].input[1])
        assert is_lazy(weight) and spill.written >= channels * 128 * 9 * 4
        out = save_model(result.model, tmp_path / "out" / "conv.onnx")
    sample = Dataset([{"x": rng.standard_normal((1, 128, 6, 6)).astype(np.float32)}])
    assert check(path, out, sample, levels=("disabled",)).passed


def test_release_drops_the_pages_of_a_mapped_weight(external_model):
    model = load_model(external_model)
    tensor = next(t for t in model.graph.initializer if t.name == "w2")
    mapped = tensor_array(tensor)
    view = mapped.T
    expected = np.array(view)
    assert release(view) and release(mapped)
    np.testing.assert_array_equal(view, expected)  # still readable: re-read from the file
    assert not release(np.zeros(4)), "an in-memory array is not mapped"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_release_lowers_the_resident_size(tmp_path):
    big = np.ones((2048, 2048), np.float32)  # 16 MiB
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = make_model([node], [vi("x", [1, 2048])], [vi("y", [1, 2048])], [init("w", big)])
    del big
    path = save_model(model, tmp_path / "w.onnx", external_data=True)
    mapped = tensor_array(load_model(path).graph.initializer[0])

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    assert float(mapped.sum()) == 2048 * 2048  # touches every page
    touched = resident()
    release(mapped)
    after = resident()
    assert touched - before > 12 << 20 and touched - after > 12 << 20, (before, touched, after)


def test_spill_adopts_a_packed_tensor(tmp_path):
    packed = onnx.helper.make_tensor("q", onnx.TensorProto.UINT4, [4096], bytes(range(256)) * 8, raw=True)
    with Spill(tmp_path) as spill:
        tensor = spill.adopt(packed)
        assert is_lazy(tensor) and not tensor.raw_data and spill.written == 2048
        expected = onnx.numpy_helper.to_array(
            onnx.helper.make_tensor("q", onnx.TensorProto.UINT4, [4096], bytes(range(256)) * 8, raw=True)
        )
        np.testing.assert_array_equal(tensor_array(tensor), expected)  # packed types are read and unpacked
