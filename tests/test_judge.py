"""The judge: declared metrics, inference from the graph, intervals (onnxopt.harness.judge)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.data import Dataset
from onnxopt.harness.inference import infer_metrics
from onnxopt.harness.judge import (
    MetricError,
    MetricSpec,
    callable_metric,
    judge,
    load_metrics,
    parse_metric,
    samples_needed,
    wilson_interval,
)
from onnxopt.harness.metrics import Score
from tests.builders import init, make_model, vi


def test_parse_metric_with_slice_arg_and_floor():
    spec = parse_metric("output0[:, 4:]:detection@0.3>=0.99")
    assert (spec.output, spec.slice, spec.name, spec.arg, spec.floor) == (
        "output0",
        "[:, 4:]",
        "detection",
        "0.3",
        0.99,
    )
    assert parse_metric("probs:top1>=0.98").slice is None
    for bad in ("probs>=0.9", "probs:nosuch>=0.9", "probs[:, x]:top1>=0.9", "probs:top1"):
        with pytest.raises(MetricError):
            parse_metric(bad)


def test_load_metrics_from_toml(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[[metric]]\noutput = "y"\nname = "iou"\narg = 0.3\nfloor = 0.97\nslice = "[:, 0]"\n')
    (spec,) = load_metrics(path)
    assert (spec.output, spec.name, spec.arg, spec.floor, spec.slice) == ("y", "iou", "0.3", 0.97, "[:, 0]")
    path.write_text('[[metric]]\noutput = "y"\n')
    with pytest.raises(MetricError, match="needs output, name, floor"):
        load_metrics(path)


def _samples(values):
    return [{"y": np.asarray(v, np.float32)} for v in values]


def test_judge_applies_slices_and_reports_the_blocking_metric():
    rng = np.random.default_rng(0)
    ref = [np.concatenate([rng.uniform(0, 640, (1, 4, 30)), rng.uniform(0, 1, (1, 3, 30))], axis=1) for _ in range(4)]
    cand = [r.copy() for r in ref]
    for c in cand:
        c[:, 4:] = rng.uniform(0, 1, c[:, 4:].shape)  # scores collapsed, boxes intact
    whole = judge(_samples(ref), _samples(cand), None, [MetricSpec("y", "cosine", 0.995)])
    assert whole.passed  # the boxes dominate the whole-tensor cosine: why slices exist
    parts = [parse_metric("y[:, :4]:cosine>=0.995"), parse_metric("y[:, 4:]:cosine>=0.995")]
    verdict = judge(_samples(ref), _samples(cand), None, parts)
    assert not verdict.passed
    blocking = verdict.blocking()
    assert blocking is not None and blocking.metric == "[:, 4:]:cosine" and blocking.value < 0.9
    assert "[:, 4:]:cosine" in verdict.summary()


def test_callable_metric_receives_outputs_and_inputs():
    seen = {}

    def task(reference, candidate, inputs):
        seen["n"] = (len(reference), len(candidate), len(inputs))
        return 0.5

    verdict = judge(_samples([[1.0]]), _samples([[1.0]]), [{"x": np.zeros(1)}], [callable_metric(task, 0.9)])
    assert seen["n"] == (1, 1, 1)
    assert not verdict.passed and verdict.results[0].metric == "task"


def test_interval_and_unresolved_floor():
    low, high = wilson_interval(8, 8)
    assert 0.6 < low < 0.7 and high == 1.0
    verdict = judge(_samples([[[1.0, 0.0]]] * 8), _samples([[[1.0, 0.0]]] * 8), None, [MetricSpec("y", "top1", 0.99)])
    (result,) = verdict.results
    assert result.passed and result.value == 1.0 and not result.resolved
    assert result.needed == 300  # rule of three: 3 / (1 - 0.99)
    assert "unresolved" in result.describe()
    assert samples_needed(Score(np.array([1.0] * 95 + [0.0] * 5), binary=True), 0.9) == 73


def _softmax_model(shape, axis=-1):
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=axis)]
    return make_model(nodes, [vi("x", shape)], [vi("y", shape)])


def test_inferred_top1_for_softmax_classes_and_ctc_for_softmax_sequences():
    rng = np.random.default_rng(0)
    (spec,) = infer_metrics(_softmax_model([1, 3]), _samples([rng.random((1, 3))]))
    assert spec.name == "top1" and "Softmax" in spec.reason
    (spec,) = infer_metrics(_softmax_model([1, 5, 7]), _samples([rng.random((1, 5, 7))]))
    assert (spec.name, spec.arg) == ("ctc", "0") and "CTC" in spec.reason
    assert (
        infer_metrics(_softmax_model([1, 5, 7]), _samples([rng.random((1, 5, 7))]), profile="target")[0].floor == 0.99
    )


def test_inferred_iou_for_sigmoid_maps_and_signal_floors_otherwise():
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 4, 4])])
    (spec,) = infer_metrics(model, _samples([np.random.default_rng(0).random((1, 1, 4, 4))]))
    assert spec.name == "iou" and 0.0 < float(spec.arg or "nan") < 1.0 and "Otsu" in spec.reason
    bimodal = np.full((1, 1, 4, 4), 0.02)
    bimodal[..., :1, :] = 0.97  # a probability map: background near 0, objects near 1
    (spec,) = infer_metrics(model, _samples([bimodal]))
    assert 0.1 < float(spec.arg or "nan") < 0.9  # inside the gap, not at a mode
    relu = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 8, 4])], [vi("y", [1, 8, 4])])
    names = [s.name for s in infer_metrics(relu, _samples([np.random.default_rng(0).random((1, 8, 4))]))]
    assert names == ["cosine", "sqnr"]


def test_inferred_pooled_embedding_from_an_attention_mask_input():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(
        nodes, [vi("x", [1, 6, 8]), vi("attention_mask", [1, 6], TensorProto.INT64)], [vi("y", [1, 6, 8])]
    )
    (spec,) = infer_metrics(model, _samples([np.ones((1, 6, 8))]))
    assert (spec.name, spec.arg) == ("pooled", "attention_mask") and "attention_mask" in spec.reason


def test_inferred_detection_for_concatenated_boxes_and_scores():
    nodes = [
        helper.make_node("Mul", ["b", "k"], ["boxes"]),
        helper.make_node("Sigmoid", ["s"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1),
    ]
    model = make_model(
        nodes, [vi("b", [1, 4, 30]), vi("s", [1, 3, 30])], [vi("y", [1, 7, 30])], [init("k", np.array(640.0))]
    )
    rng = np.random.default_rng(0)
    ref = [np.concatenate([rng.uniform(0, 640, (1, 4, 30)), rng.uniform(0, 1, (1, 3, 30)) ** 3], axis=1)]
    (spec,) = infer_metrics(model, _samples(ref))
    assert (spec.name, spec.arg) == ("detection", "0.25") and "box" in spec.reason


def test_inferred_scale_groups_without_a_concat_and_declared_metrics_win():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 6, 20])], [vi("y", [1, 6, 20])])
    rng = np.random.default_rng(0)
    ref = [np.concatenate([rng.uniform(0, 500, (1, 2, 20)), rng.uniform(0, 1, (1, 4, 20))], axis=1)]
    specs = infer_metrics(model, _samples(ref))
    assert [(s.name, s.slice) for s in specs] == [
        ("cosine", "[:, 0:2, :]"),
        ("sqnr", "[:, 0:2, :]"),
        ("cosine", "[:, 2:6, :]"),
        ("sqnr", "[:, 2:6, :]"),
    ]
    declared = [parse_metric("y:cosine>=0.9")]
    assert infer_metrics(model, _samples(ref), declared=declared) == declared
    with pytest.raises(MetricError, match="no such output"):
        infer_metrics(model, _samples(ref), declared=[parse_metric("z:cosine>=0.9")])


def test_scale_groups_only_along_axes_every_sample_shares():
    # samples of different sequence lengths (a dynamic axis): axis 1 holds different tokens per sample
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, "s", 4])], [vi("y", [1, "s", 4])])
    rng = np.random.default_rng(0)
    ref = [np.concatenate([rng.uniform(0, 500, (1, n, 1)), rng.uniform(0, 1, (1, n, 3))], axis=2) for n in (5, 7)]
    specs = infer_metrics(model, _samples(ref))
    assert {s.slice for s in specs} == {"[:, :, 0:1]", "[:, :, 1:4]"}  # split along the shared axis 2 only


def test_unit_rows_get_no_top1_but_logit_rows_do():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    unit = np.array([[0.5, 0.5, 0.5, 0.5]])
    assert "top1" not in [s.name for s in infer_metrics(model, _samples([unit]))]
    assert "top1" in [s.name for s in infer_metrics(model, _samples([[[3.0, 1.0, 0.0, 0.0]]]))]
    ints = infer_metrics(model, [{"y": np.array([[1, 2]], np.int64)}])
    assert [s.name for s in ints] == ["equal"]


def test_cross_fitted_verdict_judges_every_sample_with_a_model_that_did_not_see_it():
    from onnxopt.passes.common.budget import TaskBudget
    from onnxopt.passes.common.estimate import cross_fitted_verdict, estimate_notes, fold_members

    assert fold_members(6, 3) == [[0, 3], [1, 4], [2, 5]]
    model = _softmax_model([1, 3])
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 3)).astype(np.float32)} for _ in range(8)]
    seen_sizes = []

    def refit(fit):
        seen_sizes.append(len(fit))
        held = [s for s in samples if not any(s is f for f in fit)]
        assert len(held) == 2  # the fold the model is judged on is never in its fit
        negated = make_model(
            [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Softmax", ["n"], ["y"], axis=-1)],
            [vi("x", [1, 3])],
            [vi("y", [1, 3])],
        )
        return model if len(seen_sizes) % 2 else negated  # half the folds flip every decision

    verdict = cross_fitted_verdict(model, samples, refit, TaskBudget(), folds=4)
    assert seen_sizes == [6, 6, 6, 6]
    (result,) = verdict.results
    assert result.metric == "top1" and result.items == 8 and result.value == 0.5 and not result.passed
    stats, notes = estimate_notes(verdict, 4)
    assert stats["cross_fitted_agreement"] == 0.5 and "NOT met" in notes[0]
    assert cross_fitted_verdict(model, samples[:7], refit, TaskBudget(), folds=4) is None


def test_int8_noise_ranking_measures_each_scale_group_apart():
    from onnxopt.passes.quantize.fallback import scale_groups

    rng = np.random.default_rng(0)
    out = np.concatenate([rng.uniform(0, 640, (1, 4, 40)), rng.uniform(0, 1, (1, 3, 40)) ** 3], axis=1)
    assert scale_groups([out]) == [(slice(None), slice(0, 4)), (slice(None), slice(4, 7))]
    assert scale_groups([out[:, 4:]]) == [(slice(None),)]
    # a probability map whose near-zero background rows sit elsewhere in each image: no
    # group (its rows' scales follow the content, not the layout); boxes/scores still split
    maps = []
    for start in (0, 8, 16):
        m = np.full((1, 1, 24, 32), 1e-8)
        m[:, :, start : start + 6] = rng.uniform(0.5, 1.0, (1, 1, 6, 32))
        maps.append(m)
    assert scale_groups(maps) == [(slice(None),)]
    assert len(scale_groups([out, out * 1.5])) == 2


def test_plan_check_cross_fits_with_enough_samples_and_falls_back_to_the_held_out_quarter():
    from onnxopt.passes.common.budget import TaskBudget
    from onnxopt.passes.common.estimate import CrossFittedCheck, HeldOutPlanCheck, plan_check

    model = _softmax_model([1, 3])
    negated = make_model(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Softmax", ["n"], ["y"], axis=-1)],
        [vi("x", [1, 3])],
        [vi("y", [1, 3])],
    )
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(1, 3)).astype(np.float32)} for _ in range(12)]
    plans: list[frozenset[int]] = []

    def fit(data):  # a plan: which samples it was fitted on
        plan = frozenset(i for i, s in enumerate(samples) if any(s is d for d in data))
        plans.append(plan)
        return plan

    def flips_what_it_saw_first(plan):  # the candidate a plan builds: fails only where sample 0 was seen
        return negated if 0 in plan else model

    shipped, check = plan_check(model, Dataset(samples), fit, TaskBudget(), folds=4)
    assert isinstance(check, CrossFittedCheck) and check.label == "4-fold cross-fitted"
    assert shipped == frozenset(range(12))  # the shipped plan saw every sample
    assert sorted(len(p) for p in plans[:4]) == [9, 9, 9, 9]
    passed, _ = check(flips_what_it_saw_first)
    # three of four fold plans saw sample 0 and flip their 9 unseen samples' decisions
    (result,) = check.last.results
    assert not passed and result.items == 12 and result.value == pytest.approx(3 / 12)
    plans.clear()
    shipped, few = plan_check(model, Dataset(samples[:6]), fit, TaskBudget(), folds=4)
    assert isinstance(few, HeldOutPlanCheck) and few.label == "held-out"
    assert shipped == frozenset(range(4)) and len(plans) == 1  # fitted on the first part, judged on the rest
    assert few(flips_what_it_saw_first)[0] is False
