"""The numeric-equivalence harness: comparison math, profiles, inputs, golden files, layers."""

from __future__ import annotations

import math
from xml.etree import ElementTree

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.harness import (
    PROFILES,
    Tolerance,
    check,
    compare_arrays,
    compare_layers,
    load_golden,
    load_tolerances,
    save_golden,
    synthesize_inputs,
)
from tests.builders import init, make_model, vi

EXACT = PROFILES["exact"]


def _cmp(ref, cand, tol=EXACT):
    return compare_arrays("y", [np.asarray(ref)], [np.asarray(cand)], tol)


def test_identical_outputs_pass_with_zero_error():
    ref = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    result = _cmp(ref, ref.copy())
    assert result.passed and result.max_abs == 0 and math.isinf(result.sqnr_db) and result.top1 == 1.0


def test_a_point_two_percent_change_fails_exact_and_reports_min_tolerance():
    ref = np.random.default_rng(0).uniform(0.5, 2.0, size=1000).astype(np.float32)
    result = _cmp(ref, ref * 1.002)
    assert not result.passed
    assert 1.5e-3 < result.min_rtol < 2.5e-3
    assert "passes with atol>=" in result.reasons[0]
    # The reported minimum really is enough.
    assert _cmp(ref, ref * 1.002, EXACT.replace(rtol=result.min_rtol * 1.001)).passed


def test_float_reassociation_passes_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    ref = x @ w
    reordered = (x[:, ::-1] @ w[::-1, :]).astype(np.float32)
    assert not np.array_equal(ref, reordered)  # the reordering really moves the last bits (by ~3e-5 here)
    assert _cmp(ref, reordered).passed


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e3), st.integers(min_value=0, max_value=2**31 - 1))
def test_relative_error_stays_sane_near_zero(scale, seed):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(200) * scale).astype(np.float64)
    ref[0] = 0.0  # an exact zero in the reference must not make max_rel infinite
    cand = ref + rng.standard_normal(200) * scale * 1e-7
    result = _cmp(ref, cand)
    assert math.isfinite(result.max_rel) and result.max_rel < 1e-3
    assert result.passed


def test_nan_in_candidate_always_fails_and_matching_nan_is_fine():
    ref = np.array([1.0, 2.0, np.nan], np.float32)
    assert _cmp(ref, np.array([1.0, 2.0, np.nan], np.float32)).passed
    bad = _cmp(ref, np.array([1.0, np.inf, np.nan], np.float32), PROFILES["int8"])
    assert not bad.passed and "NaN/Inf" in bad.reasons[0]


def test_shape_and_dtype_changes_fail():
    assert "shape" in _cmp(np.zeros((2, 3)), np.zeros((3, 2))).reasons[0]
    assert "dtype" in _cmp(np.zeros(3, np.float32), np.zeros(3, np.float64)).reasons[0]


def test_integer_outputs_must_match_exactly():
    assert not _cmp(np.array([1, 2, 3]), np.array([1, 2, 4])).passed
    assert _cmp(np.array([1, 2, 3]), np.array([1, 2, 3])).passed


def test_int8_profile_passes_quantization_noise_and_fails_collapse():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 10)).astype(np.float32) * 4
    noisy = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.05
    assert _cmp(logits, noisy, PROFILES["int8"]).passed
    collapsed = np.full_like(logits, logits.mean()) + rng.standard_normal(logits.shape).astype(np.float32) * 0.1
    result = _cmp(logits, collapsed, PROFILES["int8"])
    assert not result.passed and any("cosine" in r for r in result.reasons)


def _two_layer(scale: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 10)).astype(np.float32) * scale
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    return make_model(nodes, [vi("x", ["batch", 16])], [vi("logits", ["batch", 10])], [init("w1", w1), init("w2", w2)])


def test_check_reports_per_level_and_fails_a_changed_model():
    report = check(_two_layer(), _two_layer())
    assert report.passed and [lv.level for lv in report.levels] == ["disabled", "default"]
    bad = check(_two_layer(), _two_layer(scale=1.01))
    assert not bad.passed
    assert bad.failures()[0].startswith("[disabled] logits:")
    assert bad.to_dict()["passed"] is False


def test_missing_output_is_a_failure():
    candidate = _two_layer()
    candidate.graph.output[0].name = "r"
    report = check(_two_layer(), candidate, levels=("disabled",))
    assert not report.passed
    assert any("lacks output" in p for p in report.levels[0].problems)


def test_synthesized_inputs_respect_dtypes_ranges_and_symbols():
    model = make_model(
        [
            helper.make_node("Identity", ["ids"], ["o1"]),
            helper.make_node("Identity", ["mask"], ["o2"]),
            helper.make_node("Identity", ["flag"], ["o3"]),
            helper.make_node("Identity", ["f"], ["o4"]),
        ],
        [
            vi("ids", ["b", "seq"], TensorProto.INT64),
            vi("mask", ["b", "seq"], TensorProto.INT64),
            vi("flag", [], TensorProto.BOOL),
            vi("f", [None, 3, None, None]),
        ],
        [
            vi("o1", None, TensorProto.INT64),
            vi("o2", None, TensorProto.INT64),
            vi("o3", None, TensorProto.BOOL),
            vi("o4", None),
        ],
    )
    data = synthesize_inputs(model, iterations=2, shapes={"ids": [2, 7]}, int_ranges={"ids": (5, 9)})
    sample = data[0]
    assert sample["ids"].shape == (2, 7) and sample["mask"].shape == (2, 7)  # shared symbols
    assert sample["ids"].min() >= 5 and sample["ids"].max() <= 9
    assert set(np.unique(sample["mask"])) <= {0, 1}
    assert sample["flag"].dtype == np.bool_
    assert sample["f"].shape == (1, 3, 64, 64) and sample["f"].min() >= -1 and sample["f"].max() <= 1
    with pytest.raises(CalibrationDataError, match="no model input named"):
        synthesize_inputs(model, shapes={"nope": [1]})


def test_golden_outputs_replace_the_reference(tmp_path):
    model = _two_layer()
    data = synthesize_inputs(model)
    from onnxopt.runtime import run_model

    outputs = run_model(model, data)
    path = save_golden(tmp_path / "golden.npz", data, outputs)
    samples, golden = load_golden(path)
    assert len(samples) == 3 and np.array_equal(golden[1]["logits"], outputs[1]["logits"])
    assert check(None, model, samples, reference_outputs=golden).passed
    assert not check(None, _two_layer(1.05), samples, reference_outputs=golden).passed


def test_tolerance_file_and_junit(tmp_path):
    path = tmp_path / "tol.toml"
    path.write_text("[default]\nrtol = 0.05\n[outputs.logits]\natol = 0.5\n")
    overrides = load_tolerances(path)
    assert overrides == {"*": {"rtol": 0.05}, "logits": {"atol": 0.5}}
    report = check(_two_layer(), _two_layer(1.01), overrides=overrides)
    assert report.passed
    bad = tmp_path / "bad.toml"
    bad.write_text("[outputs.y]\nwhatever = 1\n")
    with pytest.raises(CalibrationDataError, match="unknown tolerance"):
        load_tolerances(bad)
    failing = check(_two_layer(), _two_layer(1.05))
    suite = ElementTree.fromstring(failing.to_junit())
    assert suite.get("failures") == "2" and len(suite.findall("testcase")) == 2


def test_data_that_does_not_fit_is_refused():
    model = _two_layer()
    with pytest.raises(CalibrationDataError, match="expects float32"):
        check(model, model, Dataset([{"x": np.zeros((1, 16), np.float64)}]))
    with pytest.raises(CalibrationDataError, match="missing"):
        check(model, model, Dataset([{"y": np.zeros((1, 16), np.float32)}]))


def test_layers_point_at_the_first_tensor_that_diverges():
    reference = _two_layer()
    candidate = _two_layer()
    # Break the first layer in the candidate and rename its output: matched by producer.
    w1 = onnx.numpy_helper.to_array(candidate.graph.initializer[0]).copy()
    w1[:, :4] *= 1.3
    candidate.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    candidate.graph.node[0].output[0] = "renamed_h"
    candidate.graph.node[1].input[0] = "renamed_h"
    rows = compare_layers(reference, candidate, synthesize_inputs(reference)[0])
    assert [r.matched_by for r in rows] == ["producer", "name", "name"]
    first_bad = next(r for r in rows if not r.passed)
    assert first_bad.reference == "h" and first_bad.candidate == "renamed_h"


def test_tolerance_replace_keeps_the_rest():
    tol = Tolerance().replace(atol=1.0)
    assert tol.atol == 1.0 and tol.rtol == Tolerance().rtol


def test_stacked_npz_with_a_scalar_input_roundtrips(tmp_path):
    from onnxopt.data import load_dataset, save_dataset

    model = make_model([helper.make_node("Mul", ["x", "k"], ["y"])], [vi("x", [1, 4]), vi("k", [])], [vi("y", [1, 4])])
    data = synthesize_inputs(model, iterations=3)
    path = save_dataset(data, tmp_path / "d.npz")
    loaded = load_dataset(path, model)
    assert isinstance(loaded[0]["k"], np.ndarray) and loaded[0]["k"].shape == ()
    assert check(model, model, loaded).passed


def test_comparison_memory_does_not_scale_with_float64_copies_of_all_samples():
    import tracemalloc

    rng = np.random.default_rng(0)
    ref = [rng.random((1, 1, 240, 320), dtype=np.float32) for _ in range(32)]
    cand = [r + np.float32(1e-7) for r in ref]
    size = sum(r.nbytes for r in ref)
    tracemalloc.start()
    result = compare_arrays("y", ref, cand, EXACT)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.passed
    assert peak < 2 * size  # float32 diffs of all samples + one sample's float64 temporaries


def test_top1_ignores_rows_tied_at_the_top():
    ref = np.array([[0.0, 0.0, 0.0], [1.0, 3.0, 2.0]], np.float32)
    cand = np.array([[0.0, 1e-3, 0.0], [1.0, 3.0, 2.0]], np.float32)
    assert _cmp(ref, cand, PROFILES["int8"]).top1 == 1.0
    assert _cmp(np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32), PROFILES["int8"]).top1 is None


def test_top1_is_not_judged_on_unit_length_rows():
    # A normalized embedding is a direction: its arg-max flips under noise that leaves the
    # cosine at 0.999 (MiniLM's sentence_embedding failed the int8 profile that way).
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((1, 384))
    ref /= np.linalg.norm(ref)
    cand = ref + 0.02 * rng.standard_normal((1, 384)) / np.sqrt(384)
    cand /= np.linalg.norm(cand)
    result = _cmp(ref.astype(np.float32), cand.astype(np.float32), PROFILES["int8"])
    assert result.top1 is None and result.passed and result.cosine > 0.999
    probabilities = np.array([[0.7, 0.2, 0.1]], np.float32)  # sums to 1: scores, judged
    flipped = np.array([[0.2, 0.7, 0.1]], np.float32)
    assert _cmp(probabilities, flipped, PROFILES["int8"]).top1 == 0.0
    one_hot = np.array([[0.0, 1.0, 0.0]], np.float32)  # unit length, but a one-hot score row
    assert _cmp(one_hot, np.array([[1.0, 0.0, 0.0]], np.float32), PROFILES["int8"]).top1 == 0.0
