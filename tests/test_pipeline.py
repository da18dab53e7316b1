"""Pass registry, recipes and the PassManager."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.errors import RecipeError, VerificationError
from onnxopt.graph import set_initializer
from onnxopt.harness import Verifier
from onnxopt.pipeline import (
    CheckerInstrument,
    Context,
    Pass,
    PassManager,
    PassResult,
    available_presets,
    create_pass,
    load_recipe,
    register_pass,
)
from tests.builders import init, make_model, vi


@register_pass
class _AppendIdentity(Pass):
    """Test pass: always adds an Identity in front of the output (never converges)."""

    name = "test_append_identity"

    def __init__(self, *, times: int = 1) -> None:
        self.times = times

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        graph = model.graph
        for _ in range(self.times):
            out = graph.output[0].name
            inner = out + "_inner" + str(len(graph.node))
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == out:
                        node.output[i] = inner
            graph.node.append(helper.make_node("Identity", [inner], [out]))
        return PassResult(model, True, {"added": self.times})


@register_pass
class _ScaleWeight(Pass):
    """Test pass: multiplies the first initializer (breaks equivalence on purpose)."""

    name = "test_scale_weight"

    def __init__(self, *, factor: float = 1.5) -> None:
        self.factor = factor

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        tensor = model.graph.initializer[0]
        value = onnx.numpy_helper.to_array(tensor) * self.factor
        set_initializer(model.graph, tensor.name, value.astype(np.float32))
        return PassResult(model, True)


@register_pass
class _Nothing(Pass):
    """Test pass: changes nothing."""

    name = "test_nothing"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        return PassResult(model, False, notes=["left everything alone"])


@register_pass
class _Crash(Pass):
    """Test pass: half-rewrites the model, then hits a bug."""

    name = "test_crash"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        del model.graph.node[:]
        raise IndexError("simulated bug")


def _model() -> onnx.ModelProto:
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 8])], [vi("y", [2, 8])], [init("w", w)]
    )


def test_manager_never_modifies_its_input_and_records_stats():
    model = _model()
    before = model.SerializeToString()
    result = PassManager([create_pass("test_append_identity", times=2)]).run(model)
    assert model.SerializeToString() == before
    (record,) = result.records
    assert record.changed and record.stats == {"added": 2}
    assert (record.before.nodes, record.after.nodes) == (1, 3)
    assert result.final.ops["Identity"] == 2


def test_fixed_point_stops_at_round_limit_and_says_so():
    result = PassManager([create_pass("test_append_identity")], fixed_point=True, max_rounds=3).run(_model())
    assert result.rounds == 3
    assert not result.converged
    assert any("round limit (3)" in note for note in result.notes)
    assert result.final.nodes == 4


def test_fixed_point_converges_when_nothing_changes():
    result = PassManager([create_pass("test_nothing")], fixed_point=True, max_rounds=5).run(_model())
    assert result.rounds == 1 and result.converged
    assert result.records[0].notes == ["left everything alone"]


def test_verify_hook_names_the_pass_that_broke_equivalence():
    manager = PassManager(
        [create_pass("test_append_identity"), create_pass("test_scale_weight"), create_pass("test_nothing")],
        verify=Verifier(),
    )
    with pytest.raises(VerificationError, match="test_scale_weight") as info:
        manager.run(_model())
    assert info.value.pass_name == "test_scale_weight"


def test_verify_passes_exact_rewrites_and_records_checks():
    result = PassManager(
        [create_pass("test_append_identity")], verify=Verifier(), instruments=[CheckerInstrument()]
    ).run(_model())
    checks = result.records[0].checks
    assert checks["verify"]["passed"] and checks["onnx_checker"] == "ok"


def test_unknown_pass_and_parameter_list_valid_choices():
    with pytest.raises(RecipeError, match=r"valid passes: .*test_nothing"):
        create_pass("no_such_pass")
    with pytest.raises(RecipeError, match="valid parameters: times"):
        create_pass("test_append_identity", count=3)


def test_recipe_file_flat_and_staged(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text(
        '[pipeline]\nfixed_point = true\nmax_rounds = 2\n\n[[pass]]\nname = "test_append_identity"\ntimes = 2\n'
    )
    spec = load_recipe(flat)
    assert spec.stages[0].fixed_point and spec.stages[0].max_rounds == 2
    assert spec.build().run(_model()).final.nodes == 5
    staged = tmp_path / "staged.toml"
    staged.write_text(
        '[[stage]]\n[[stage.pass]]\nname = "test_nothing"\n\n[[stage]]\nfixed_point = true\n'
        'max_rounds = 2\n[[stage.pass]]\nname = "test_append_identity"\n'
    )
    result = load_recipe(staged).build().run(_model())
    assert [r.name for r in result.records] == ["test_nothing", "test_append_identity", "test_append_identity"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[pass]]\nname = "nope"\n', "unknown pass 'nope'"),
        ('[[pass]]\nname = "test_append_identity"\nbogus = 1\n', "no parameter 'bogus'"),
        ("[pipeline]\nfixed_point = true\n", "no \\[\\[pass\\]\\]"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_presets_exist_and_unknown_name_lists_them():
    assert {"fuse", "int8", "prune", "lowrank"} <= set(available_presets())
    with pytest.raises(RecipeError, match="neither a preset"):
        load_recipe("no-such-preset")


def test_overrides_reach_the_passes_that_take_them():
    spec = load_recipe_from_passes(["test_append_identity", "test_nothing"]).with_overrides({"times": 3})
    assert spec.stages[0].passes[0] == ("test_append_identity", {"times": 3})
    with pytest.raises(RecipeError, match="takes 'sparsity'"):
        spec.with_overrides({"sparsity": 0.5})


def load_recipe_from_passes(names):
    from onnxopt.pipeline import PipelineSpec

    return PipelineSpec.single([(n, {}) for n in names])


def test_a_crashing_pass_is_undone_and_reported():
    model = _model()
    result = PassManager([create_pass("test_crash"), create_pass("test_append_identity")]).run(model)
    assert "IndexError: simulated bug" in result.records[0].notes[0]
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Identity"]
    with pytest.raises(IndexError):
        PassManager([create_pass("test_crash")], isolate_failures=False).run(model)


def test_passes_have_one_module_name_and_a_second_registration_under_a_name_fails():
    import sys

    import onnxopt.passes  # noqa: F401

    assert "passes" not in sys.modules  # nothing imports the source folder under a second name
    assert create_pass("fold_constants").name == "fold_constants"

    class Impostor(Pass):
        name = "fold_constants"
        exact = True

    with pytest.raises(ValueError, match="registered already"):
        register_pass(Impostor)


def test_shape_annotations_added_for_the_passes_are_not_written_when_the_input_had_none():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Abs", ["b"], ["y"]),
    ]
    bare = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert not bare.graph.value_info
    result = PassManager([]).run(bare)
    assert not result.model.graph.value_info
    assert any("shape annotations" in note for note in result.notes)
    annotated = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])
    annotated.graph.value_info.append(vi("a", [2, 3]))
    kept = PassManager([]).run(annotated)
    assert {v.name for v in kept.model.graph.value_info} >= {"a"}
