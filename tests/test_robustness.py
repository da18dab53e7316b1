"""The presets on what real exports contain: custom domains, every opset 11-21, If/Loop bodies, dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.harness import check, synthesize_inputs
from onnxopt.pipeline import Context, load_recipe
from tests.builders import init, make_model, run_check, unseen_inputs, vi


def _fuse(model: onnx.ModelProto):
    return load_recipe("fuse").build().run(model)


def _cnn(opset: int) -> onnx.ModelProto:
    """Conv + BatchNorm + Relu + Identity + Reshape + MatMul + Add: work for most passes."""
    rng = np.random.default_rng(opset)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Identity", ["r"], ["ri"]),
        helper.make_node("Reshape", ["ri", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["y"]),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3))),
        init("g", rng.uniform(0.5, 1.5, 4)),
        init("b", rng.standard_normal(4)),
        init("m", rng.standard_normal(4)),
        init("v", rng.uniform(0.5, 2, 4)),
        init("shape", [1, 64], np.int64),
        init("fc", rng.standard_normal((64, 5))),
        init("fc_b", rng.standard_normal(5)),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 5])], inits, opset=opset)
    model.ir_version = 7 if opset <= 14 else (8 if opset <= 18 else 9)
    return model


@pytest.mark.parametrize("opset", range(11, 22))
def test_fuse_keeps_every_opset_equal(opset):
    model = _cnn(opset)
    onnx.checker.check_model(model, full_check=True)
    result = _fuse(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", opset)]
    assert result.final.ops.get("BatchNormalization", 0) == 0 and result.final.ops.get("Identity", 0) == 0
    assert check(model, result.model).passed


def test_custom_domain_nodes_are_left_alone():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("FusedMatMul", ["h", "w2"], ["f"], domain="com.microsoft", alpha=0.5),
        helper.make_node("Identity", ["f"], ["fi"]),
        helper.make_node("Normalizer", ["fi"], ["n"], domain="ai.onnx.ml", norm="L2"),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [2, 8])],
        [vi("y", [2, 8])],
        [init("w", rng.standard_normal((8, 8))), init("w2", rng.standard_normal((8, 8)))],
        extra_opsets={"com.microsoft": 1, "ai.onnx.ml": 3},
    )
    result = _fuse(model)
    ops = result.final.ops
    assert ops["com.microsoft::FusedMatMul"] == 1 and ops["ai.onnx.ml::Normalizer"] == 1
    assert {o.domain for o in result.model.opset_import} == {"", "com.microsoft", "ai.onnx.ml"}
    assert check(model, result.model).passed


def test_unknown_custom_op_in_default_position_is_not_folded():
    # An op from a domain nobody can evaluate, fed only by constants: folding must leave it.
    nodes = [helper.make_node("Magic", ["k"], ["m"], domain="vendor.ops"), helper.make_node("Add", ["x", "m"], ["y"])]
    model = make_model(
        nodes, [vi("x", [3])], [vi("y", [3])], [init("k", [1.0, 2.0, 3.0])], extra_opsets={"vendor.ops": 1}
    )
    result = _fuse(model)
    assert result.final.ops.get("vendor.ops::Magic") == 1


def test_loop_body_is_optimized_and_keeps_outer_reads():
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["carry"], ["carry_id"]),
            helper.make_node("MatMul", ["carry_id", "w_outer"], ["mm"]),
            helper.make_node("Relu", ["mm"], ["carry_out"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond", [], TensorProto.BOOL), vi("carry", [1, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("carry_out", [1, 4])],
    )
    nodes = [helper.make_node("Loop", ["trip", "keep_going", "x"], ["y"], body=body)]
    model = make_model(
        nodes,
        [vi("x", [1, 4])],
        [vi("y", [1, 4])],
        [
            init("trip", np.array(3), np.int64),
            init("keep_going", np.array(True), np.bool_),
            init("w_outer", rng.standard_normal((4, 4)) * 0.5),
        ],
    )
    result = _fuse(model)
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    body_out = loop.attribute[0].g
    assert [i.name for i in body_out.input] == ["i", "cond", "carry"]  # positional: never removed
    assert "w_outer" in {t.name for t in result.model.graph.initializer}
    assert all(n.op_type != "Identity" or n.output[0] == "cond_out" for n in body_out.node)
    assert check(model, result.model, synthesize_inputs(model)).passed


def test_dynamic_dims_survive():
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"])]
    model = make_model(nodes, [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 8])])
    result = _fuse(model)
    dims = [d.dim_param for d in result.model.graph.output[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "seq"]
    assert check(model, result.model, synthesize_inputs(model, shapes={"x": [3, 5, 8]})).passed


# --------------------------------------------------------------------------- lossy presets

LOSSY = {"int8": {"check_latency": False}, "prune": {}, "lowrank": {}}


def _lossy(preset: str, model: onnx.ModelProto, data):
    spec = load_recipe(preset)
    if LOSSY[preset]:
        spec = spec.with_overrides(LOSSY[preset])
    return spec.build().run(model, Context(calibration=data))


LOSSY_PASS = {"int8": "quantize_int8", "prune": "prune_magnitude", "lowrank": "split_lowrank"}


def _within_budget(model: onnx.ModelProto, candidate: onnx.ModelProto) -> bool:
    """Judge ``candidate`` on inputs the pass never saw, under the int8 profile's signal floors.

    Top-1 of these small synthetic classifiers is held to 0.85: their rows are near-tied,
    and the passes report a cross-fitted top-1 interval reaching 0.76 on 12 samples (judging
    the calibration samples instead would restate the pass's own verdict).
    """
    overrides = {"*": {"min_top1": 0.85}}
    return run_check(
        model, candidate, profile="int8", data=unseen_inputs(model), overrides=overrides, metrics=["y:top1>=0.85"]
    ).passed


def _lossy_pass_changed(preset: str, result) -> bool:
    """Return whether the preset's lossy pass reported a change (the fusions before it do not count)."""
    return any(r.changed for r in result.records if r.name == LOSSY_PASS[preset])


def _decaying(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Return a trained-like weight: a decaying singular spectrum, so a low-rank split can fit."""
    u, _, vt = np.linalg.svd(rng.standard_normal((rows, cols)), full_matrices=False)
    return (u * np.exp(-np.arange(min(rows, cols)) / 6.0)) @ vt * scale


def _conv_matmul(opset: int) -> onnx.ModelProto:
    """Two wide convs and a MatMul with a decaying spectrum: every lossy pass has work."""
    rng = np.random.default_rng(opset)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["y"]),
    ]
    inits = [
        init("w", rng.standard_normal((32, 16, 3, 3)) * 0.1),
        init("w2", rng.standard_normal((32, 32, 3, 3)) * 0.1),
        init("shape", [1, 32 * 16], np.int64),
        init("fc", _decaying(rng, 32 * 16, 64, 2.0)),
        init("fc_b", rng.standard_normal(64)),
    ]
    model = make_model(nodes, [vi("x", [1, 16, 4, 4])], [vi("y", [1, 64])], inits, opset=opset)
    model.ir_version = 7 if opset <= 14 else (8 if opset <= 18 else 9)
    return model


@pytest.mark.parametrize("preset", sorted(LOSSY))
@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
def test_lossy_presets_write_valid_models_within_budget_on_every_opset(preset, opset):
    model = _conv_matmul(opset)
    data = synthesize_inputs(model, iterations=12)
    result = _lossy(preset, model, data)
    onnx.checker.check_model(result.model, full_check=True)
    assert _within_budget(model, result.model)
    assert _lossy_pass_changed(preset, result), [(r.name, r.notes) for r in result.records]
    if preset == "int8":  # per-channel weights need opset 13: older models are upgraded, newer kept
        assert result.final.ops.get("QuantizeLinear", 0) > 0
        version = next(o.version for o in result.model.opset_import if o.domain == "")
        assert version == max(opset, 13)


def _if_on_a_layer() -> onnx.ModelProto:
    """An If whose condition is computed from a MatMul's output (its branches are MatMuls too)."""
    rng = np.random.default_rng(3)

    def branch(name: str, k: int) -> onnx.GraphProto:
        matmul = helper.make_node("MatMul", ["x", f"w{k}"], [f"o{k}"])
        return helper.make_graph([matmul], name, [], [vi(f"o{k}", [4, 64])])

    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1), else_branch=branch("else", 2)),
    ]
    inits = [
        init("w0", rng.standard_normal((64, 64))),
        init("w1", rng.standard_normal((64, 64))),
        init("w2", rng.standard_normal((64, 64))),
        init("zero", np.array(0.0)),
    ]
    return make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 64])], inits)


@pytest.mark.parametrize("preset", sorted(LOSSY))
def test_lossy_presets_leave_a_layer_deciding_an_if_condition_exact(preset):
    # Pruning w0 to the default budget flipped the branch on 2 of 16 calibration samples
    # (cosine 0.89) although the held-out quarter passed: such layers are left alone.
    model = _if_on_a_layer()
    data = synthesize_inputs(model, iterations=16)
    result = _lossy(preset, model, data)
    notes = [n for record in result.records for n in record.notes]
    assert any("decide" in n and "If/Loop condition" in n for n in notes), notes
    assert any("inside If/Loop/Scan bodies" in n for n in notes), notes
    assert check(model, result.model, data, profile="exact").passed


def test_lossy_presets_keep_custom_domain_nodes():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("FusedMatMul", ["h", "w2"], ["f"], domain="com.microsoft", alpha=0.5),
        helper.make_node("MatMul", ["f", "w3"], ["g"]),
        helper.make_node("Normalizer", ["g"], ["y"], domain="ai.onnx.ml", norm="L2"),
    ]
    model = make_model(  # 128x128 weights: at split_lowrank's default min_params
        nodes,
        [vi("x", [2, 128])],
        [vi("y", [2, 128])],
        [
            init("w", _decaying(rng, 128, 128, 8.0)),
            init("w2", rng.standard_normal((128, 128)) / 8),
            init("w3", _decaying(rng, 128, 128, 8.0)),
        ],
        extra_opsets={"com.microsoft": 1, "ai.onnx.ml": 3},
    )
    data = synthesize_inputs(model, iterations=12)
    for preset in LOSSY:
        result = _lossy(preset, model, data)
        assert _lossy_pass_changed(preset, result), (preset, [(r.name, r.notes) for r in result.records])
        ops = result.final.ops
        assert ops["com.microsoft::FusedMatMul"] == 1 and ops["ai.onnx.ml::Normalizer"] == 1, preset
        assert {o.domain for o in result.model.opset_import} >= {"", "com.microsoft", "ai.onnx.ml"}, preset
        assert check(model, result.model, data, profile="int8").passed, preset


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_channel_pruning_writes_valid_models_within_budget_on_every_opset(opset):
    from onnxopt.passes.prune.channels import PruneChannels

    model = _conv_matmul(opset)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    dead = onnx.numpy_helper.to_array(weight).copy()
    dead[:8] = 0  # 8 of the first conv's 32 channels are dead: removable within any budget
    weight.CopyFrom(onnx.numpy_helper.from_array(dead, "w"))
    data = synthesize_inputs(model, iterations=16)
    result = PruneChannels(multiple=4)(model, Context(calibration=data))
    assert result.changed and result.stats["channels_removed"] >= 8
    onnx.checker.check_model(result.model, full_check=True)
    assert _within_budget(model, result.model)
    assert any("c2" in n and "Reshape" in n for n in result.notes)  # the group read by Reshape is named


def test_channel_pruning_leaves_an_if_condition_exact():
    from onnxopt.passes.prune.channels import PruneChannels

    model = _if_on_a_layer()
    data = synthesize_inputs(model, iterations=16)
    result = PruneChannels(multiple=4)(model, Context(calibration=data))
    assert not result.changed
    assert check(model, result.model, data, profile="exact").passed
