"""Checks that cannot prove much say so (#17): vacuous reference outputs, layer matching after a BN fold."""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxopt.cli import main
from onnxopt.harness import Verifier, check
from onnxopt.harness.vacuous import vacuous_outputs
from onnxopt.model import save_model
from onnxopt.pipeline import PassManager, create_pass, load_recipe
from tests.builders import init, make_model, vi


def _scaled(scale: float):
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"])]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], [init("s", np.full(8, scale, np.float32))])


def test_vacuous_outputs_finds_near_zero_and_constant_outputs_only():
    rng = np.random.default_rng(0)
    tiny = [{"y": rng.standard_normal(100).astype(np.float32) * 1e-8}]
    constant = [{"y": np.full(100, 3.5, np.float32)}, {"y": np.full(100, 3.5, np.float32)}]
    varied = [{"y": rng.standard_normal(100).astype(np.float32), "ids": np.zeros(100, np.int64)}]
    assert "nearly) zero in 100.0%" in vacuous_outputs(tiny)["y"]
    assert "constant (3.5)" in vacuous_outputs(constant)["y"]
    assert vacuous_outputs(varied) == {}  # integer outputs are not judged


def test_check_warns_about_a_near_zero_reference_output(tmp_path, capsys):
    reference = save_model(_scaled(1e-9), tmp_path / "ref.onnx")
    report = check(reference, reference)
    assert report.passed
    assert any("reference output 'y'" in n and "--data" in n for n in report.notes)
    assert main(["check", str(reference), str(reference)]) == 0
    assert "proves little" in capsys.readouterr().out
    normal = save_model(_scaled(1.0), tmp_path / "normal.onnx")
    assert not any("proves little" in n for n in check(normal, normal).notes)


def test_verify_reports_what_it_checked_and_vacuous_outputs(tmp_path, capsys):
    verifier = Verifier()
    PassManager([create_pass("eliminate_dead_code")], verify=verifier).run(_scaled(1e-9))
    assert verifier.sample_count == 2 and verifier.checked == []
    assert verifier.warnings and "synthesized" in verifier.warnings[0]
    model = save_model(_scaled(1e-9), tmp_path / "m.onnx")
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--verify"]) == 0
    captured = capsys.readouterr()
    assert "verified 0 changed pass run(s) on 2 sample(s)" in captured.out
    assert "onnxopt: warning: reference output 'y'" in captured.err


def _conv_bn():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3))),
        init("g", rng.uniform(2.0, 3.0, 4)),
        init("b", rng.standard_normal(4) + 2.0),
        init("m", rng.standard_normal(4)),
        init("v", rng.uniform(0.2, 0.5, 4)),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def test_layers_match_a_folded_conv_to_the_batchnorm_output_it_replaced(tmp_path):
    model = _conv_bn()
    folded = load_recipe("fuse").build().run(model).model
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    report = check(save_model(model, tmp_path / "ref.onnx"), save_model(folded, tmp_path / "fused.onnx"), layers=True)
    assert report.layers is not None
    assert all(row.passed for row in report.layers), [(r.reference, r.candidate, r.cosine) for r in report.layers]
    assert {row.reference for row in report.layers} == {"bn", "y"}  # the pre-BN tensor has no counterpart
