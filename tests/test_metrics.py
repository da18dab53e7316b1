"""Task metrics on plain arrays (onnxopt.harness.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxopt.harness import metrics as m

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (3, 7), elements=FINITE))
def test_identical_outputs_agree_fully_on_every_metric(a):
    for name in ("cosine", "top1", "iou", "equal"):
        score = m.METRICS[name]([a], [a.copy()], None, None)
        assert score.value == pytest.approx(1.0), name
    assert m.sqnr([a], [a.copy()]).value == 200.0


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (4, 5), elements=st.integers(-1000, 1000).map(float)), st.floats(0.1, 10))
def test_cosine_ignores_scale_and_top1_ignores_monotone_maps(a, factor):
    scaled = a * np.float32(factor)
    assert m.cosine([a], [scaled]).value == pytest.approx(1.0, abs=1e-5)
    assert m.topk([a], [scaled * 2 + 1]).value == 1.0


def test_top1_counts_flips_and_reports_near_ties_apart():
    reference = np.array([[0.9, 0.1], [0.5, 0.5 - 1e-5], [0.2, 0.8], [0.3, 0.7]], np.float32)
    candidate = np.array([[0.8, 0.2], [0.49, 0.51], [0.6, 0.4], [0.3, 0.7]], np.float32)
    score = m.topk([reference], [candidate])
    assert score.count == 4 and score.value == 0.5
    assert score.near_ties == 1 and score.binary
    assert m.topk([reference], [candidate], None, "2").value == 1.0


def test_top1_leaves_out_rows_without_a_winner():
    score = m.topk([np.zeros((2, 3), np.float32)], [np.eye(2, 3, dtype=np.float32)])
    assert score.count == 0 and score.value == 1.0


def test_iou_of_thresholded_masks():
    ref = np.zeros((1, 1, 4, 4), np.float32)
    ref[..., :2, :] = 0.9  # 8 pixels
    cand = ref.copy()
    cand[..., 1, :] = 0.1  # 4 of them lost
    assert m.iou([ref], [cand], None, "0.3").value == pytest.approx(0.5)
    assert m.iou([np.zeros(4)], [np.zeros(4)]).value == 1.0
    assert m.iou([ref], [np.full_like(ref, np.nan)]).value == 0.0


def test_iou_pools_over_samples_so_empty_masks_neither_sink_nor_lift_it():
    ref = np.zeros((1, 1, 10, 10), np.float32)
    ref[..., :5, :] = 0.9  # 50 pixels
    cand = ref.copy()
    cand[..., 4, :] = 0.1  # 10 of them lost: IoU 0.8
    empty = np.zeros_like(ref)
    stray = empty.copy()
    stray[..., 0, 0] = 0.9  # one stray pixel where the reference has no mask
    # per-sample means would give (0.8 + 0) / 2 and (0.8 + 1) / 2; pooled: 40 / 51 and 40 / 50
    score = m.iou([ref, empty], [cand, stray])
    assert score.value == pytest.approx(40 / 51) and score.count == 2
    score = m.iou([ref, empty], [cand, empty])
    assert score.value == pytest.approx(0.8) and score.count == 1  # both-empty carries no evidence


def test_pooled_iou_interval_narrows_with_samples_and_says_how_many_would_resolve():
    from onnxopt.harness.judge import MetricSpec, judge

    rng = np.random.default_rng(0)
    spec = MetricSpec("y", "iou", 0.9, arg="0.5")

    def verdict(n: int):
        refs, cands = [], []
        for _ in range(n):
            r = (rng.random((1, 1, 16, 16)) > 0.7).astype(np.float32)
            c = np.where(rng.random(r.shape) < 0.05, 1 - r, r)  # 5 % of pixels flipped
            refs.append({"y": r})
            cands.append({"y": c})
        return judge(refs, cands, None, [spec]).results[0]

    few, many = verdict(4), verdict(64)
    assert few.low <= few.value <= few.high and many.low <= many.value <= many.high
    assert many.high - many.low < few.high - few.low
    assert few.high <= 1.0


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 0.45), st.floats(0.55, 0.95), st.integers(50, 2000), st.integers(5, 500))
def test_mask_threshold_falls_in_the_gap_of_a_bimodal_map(low_mode, high_mode, background, objects):
    rng = np.random.default_rng(background + objects)
    values = np.concatenate(
        [
            np.clip(rng.normal(low_mode, 0.01, background), 0, 1),
            np.clip(rng.normal(high_mode, 0.01, objects), 0, 1),
        ]
    )
    threshold = m.mask_threshold(values)
    assert low_mode + 0.02 < threshold < high_mode - 0.02
    assert np.array_equal(values > threshold, values > (low_mode + high_mode) / 2)  # the same mask


def test_mask_threshold_of_a_constant_map_is_its_value():
    assert m.mask_threshold(np.full(10, 0.25)) == 0.25
    assert m.mask_threshold(np.array([np.nan, np.inf])) == 0.5


def test_ctc_collapses_repeats_and_blanks():
    assert m.collapse_ctc(np.array([0, 3, 3, 0, 3, 5, 5, 0])) == (3, 3, 5)
    eye = np.eye(6, dtype=np.float32)
    path_a = eye[[0, 3, 3, 0, 5]][None]  # "3 5"
    path_b = eye[[3, 0, 0, 5, 5]][None]  # also "3 5": other alignment
    path_c = eye[[3, 3, 3, 5, 0]][None]  # "3 5"
    path_d = eye[[3, 0, 3, 5, 0]][None]  # "3 3 5"
    assert m.ctc([path_a, path_a], [path_b, path_c]).value == 1.0
    assert m.ctc([path_a, path_a], [path_b, path_d]).value == 0.5


def test_pooled_cosine_reads_only_the_masked_tokens():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(1, 6, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0]], np.int64)
    padded_changed = hidden.copy()
    padded_changed[:, 3:] = rng.normal(size=(1, 3, 8))
    assert m.pooled([hidden], [padded_changed], [{"attention_mask": mask}]).value == pytest.approx(1.0)
    real_changed = hidden.copy()
    real_changed[:, :3] = -real_changed[:, :3]
    assert m.pooled([hidden], [real_changed], [{"attention_mask": mask}]).value == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        m.pooled([hidden], [hidden], [{"input_ids": mask}])


def _yolo(boxes: list[tuple[float, float, float, float]], classes: list[int], scores: list[float], n=20, c=3):
    out = np.zeros((1, 4 + c, n), np.float32)
    out[0, :4] = 1.0
    for i, (box, cls, score) in enumerate(zip(boxes, classes, scores, strict=True)):
        out[0, :4, i] = box
        out[0, 4 + cls, i] = score
    return out


def test_detection_matches_by_class_and_box_and_counts_extra_detections():
    ref = _yolo([(100, 100, 50, 50), (300, 300, 80, 40)], [0, 2], [0.9, 0.6])
    same = _yolo([(102, 99, 50, 52), (301, 300, 80, 40)], [0, 2], [0.8, 0.55])
    assert m.detection([ref], [same]).value == 1.0
    wrong_class = _yolo([(100, 100, 50, 50), (300, 300, 80, 40)], [0, 1], [0.9, 0.6])
    assert m.detection([ref], [wrong_class]).value == pytest.approx(1 / 3)  # 1 match, 1 miss, 1 extra
    lost = _yolo([(100, 100, 50, 50), (300, 300, 80, 40)], [0, 2], [0.9, 0.1])
    assert m.detection([ref], [lost]).value == 0.5
    # anchors-first layout gives the same verdict
    assert m.detection([ref.transpose(0, 2, 1)], [lost.transpose(0, 2, 1)]).value == 0.5


def test_nms_keeps_one_of_overlapping_boxes_of_a_class():
    boxes = np.array([[10, 10, 10, 10], [11, 10, 10, 10], [11, 10, 10, 10]], float)
    scores = np.array([[0.9, 0], [0.8, 0], [0, 0.7]])
    kept = m.nms(boxes, scores, 0.25)
    assert [(cls, round(s, 2)) for cls, s, _ in kept] == [(0, 0.9), (1, 0.7)]


def test_split_by_scale_separates_boxes_from_scores():
    rng = np.random.default_rng(1)
    out = np.concatenate([rng.uniform(0, 640, (1, 4, 50)), rng.uniform(0, 1, (1, 6, 50)) ** 4], axis=1)
    assert m.split_by_scale([out], axis=1) == [(0, 4), (4, 10)]
    assert m.split_by_scale([out[:, 4:]], axis=1) == [(0, 6)]
    assert m.split_by_scale([np.ones((1, 1, 5))], axis=1) == [(0, 1)]
    ragged = [out, np.concatenate([out, out[:, :1]], axis=1)]  # variable sizes along the axis
    assert m.split_by_scale(ragged, axis=1) == [(0, 10)]


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.floats(1e3, 1e6))
def test_split_by_scale_cuts_exactly_at_a_scale_jump(big, small, jump):
    rng = np.random.default_rng(big * 10 + small)
    out = np.concatenate([rng.normal(size=(1, big, 30)) * jump, rng.normal(size=(1, small, 30))], axis=1)
    assert m.split_by_scale([out], axis=1) == [(0, big), (big, big + small)]


def test_equal_and_nan_candidates():
    assert m.equal([np.array([1, 2, 3])], [np.array([1, 2, 4])]).value == pytest.approx(2 / 3)
    a = np.ones(4, np.float32)
    assert m.cosine([a], [np.full(4, np.nan, np.float32)]).value == 0.0
    assert m.sqnr([a], [np.full(4, np.nan, np.float32)]).value == -np.inf
