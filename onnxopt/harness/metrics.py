"""Task metrics: how much a candidate's outputs agree with the reference's on the task.

Every metric is a pure numpy function ``metric(reference, candidate, inputs, arg) -> Score``
over one output's arrays across samples (``reference[i]`` and ``candidate[i]`` are sample
``i``'s arrays, ``inputs[i]`` its input feed). A :class:`Score` holds one value per *item*
(a row, a sequence, a detection, a sample); the metric's value is their mean, so the
judge can put an interval on it and say how many items a floor needs.

==================  =====================================================  ===============
name (``@arg``)     what it compares                                       item
==================  =====================================================  ===============
``cosine``          cosine similarity of the whole (sliced) tensor         sample
``sqnr``            signal-to-quantization-noise ratio, dB                 sample
``top1``/``topk@K`` arg-max (top-K) agreement on the last axis             row
``iou@T``           IoU of the masks ``value > T``, pooled over samples    sample (union)
``ctc@BLANK``       arg-max sequence after CTC repeat/blank collapse       sequence
``pooled@MASK``     cosine of mean-pooled vectors under input ``MASK``     row
``detection@T``     detections (NMS at score ``T``) matched by class, IoU  detection
``equal``           exact equality (integer outputs)                       element
==================  =====================================================  ===============

``split_by_scale`` finds the channel groups of an output whose slices differ in scale by
more than :data:`SCALE_SPAN` (a detector's boxes, 0–640, next to its scores, 0–1); the
judge applies a metric to each group and reports the worst.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "METRICS",
    "SCALE_SPAN",
    "Score",
    "collapse_ctc",
    "cosine",
    "ctc",
    "detection",
    "equal",
    "iou",
    "mask_threshold",
    "nms",
    "pooled",
    "split_by_scale",
    "sqnr",
    "topk",
]

Arrays = Sequence[np.ndarray]
Inputs = Sequence[Mapping[str, np.ndarray]] | None

#: Per-slice RMS spanning more than this (max/min) splits an output into groups.
SCALE_SPAN = 100.0
#: Fewest values per sample a scale group may hold: a cosine over fewer is decided by a
#: sign or two (an LSTM state [2, 1, 128] cut at one unit gave groups of 2 values).
MIN_GROUP_VALUES = 4


@dataclass(frozen=True)
class Score:
    """Per-item agreement values of one metric on one output (their mean is the value)."""

    items: np.ndarray
    near_ties: int = 0
    binary: bool = False  # items are 0/1 (an agreement rate), for the interval
    #: per-item weights: the value is then the ratio ``Σ w·item / Σ w`` (a pooled IoU is
    #: ``Σ intersection / Σ union``: items are per-sample IoUs, weights their unions); items
    #: of weight 0 carry no evidence and are not counted
    weights: np.ndarray | None = None

    @property
    def value(self) -> float:
        """The metric's value: the (weighted) mean over items (1.0 when there are none)."""
        if self.weights is not None:
            total = float(np.sum(self.weights))
            return float(np.sum(self.weights * self.items)) / total if total > 0 else 1.0
        return float(np.mean(self.items)) if self.items.size else 1.0

    @property
    def count(self) -> int:
        """How many items the value rests on."""
        if self.weights is not None:
            return int(np.count_nonzero(self.weights))
        return int(self.items.size)


def _f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _cosine_rows(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cosine of matching rows (last axis); 1 where both rows are zero, 0 where one is."""
    dot = np.sum(r * c, axis=-1)
    norm = np.sqrt(np.sum(r * r, axis=-1) * np.sum(c * c, axis=-1))
    both_zero = (np.sum(r * r, axis=-1) == 0) & (np.sum(c * c, axis=-1) == 0)
    out = np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(out, -1.0, 1.0))


def _finite_pair(r_in: np.ndarray, c_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the values where the reference is finite; a non-finite candidate value becomes NaN."""
    r, c = _f64(r_in).ravel(), _f64(c_in).ravel()
    keep = np.isfinite(r)
    c = c[keep]
    return r[keep], np.where(np.isfinite(c), c, np.nan)


def cosine(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Cosine similarity per sample over the whole array; a non-finite candidate value scores 0."""
    items = []
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, c = _finite_pair(r_in, c_in)
        items.append(0.0 if np.isnan(c).any() else float(_cosine_rows(r, c)))
    return Score(np.array(items))


def sqnr(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """SQNR in dB per sample (``10·log10(Σr² / Σ(c−r)²)``, capped at 200 dB); NaN scores -inf."""
    items = []
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, c = _finite_pair(r_in, c_in)
        noise = float(np.sum((c - r) ** 2))
        if math.isnan(noise):
            items.append(-math.inf)
        else:
            items.append(
                200.0 if noise == 0 else min(200.0, 10 * math.log10(max(float(np.sum(r * r)), 1e-300) / noise))
            )
    return Score(np.array(items))


def _rows(array: np.ndarray) -> np.ndarray:
    a = _f64(array)
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


#: A reference row whose top two values differ by at most this share of its largest magnitude is a near-tie.
TIE_MARGIN = 1e-3


def topk(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Top-K agreement on the last axis: the reference's arg-max is in the candidate's top K (K = ``arg``, 1).

    Rows of the reference whose top two values are within :data:`TIE_MARGIN` of the
    row's largest magnitude are near-ties: counted, and reported apart. Rows with an exact tie at
    the top (no winner at all, an all-zero ReLU row) are left out.
    """
    k = int(arg) if arg else 1
    items: list[np.ndarray] = []
    ties = 0
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, c = _rows(r_in), _rows(c_in)
        top_two = -np.partition(-r, 1, axis=-1)[:, :2] if r.shape[-1] > 1 else np.hstack([r, r - 1])
        margin = top_two[:, 0] - top_two[:, 1]
        decided = margin > 0
        best = np.argmax(r, axis=-1)
        c = np.where(np.isfinite(c), c, -np.inf)
        kk = min(k, c.shape[-1])
        top = np.argpartition(-c, kk - 1, axis=-1)[:, :kk] if kk < c.shape[-1] else np.tile(np.arange(kk), (len(c), 1))
        hit = np.any(top == best[:, None], axis=-1)
        ties += int(np.count_nonzero(decided & (margin <= TIE_MARGIN * np.abs(r).max(axis=-1))))
        items.append(hit[decided].astype(np.float64))
    return Score(np.concatenate(items) if items else np.zeros(0), near_ties=ties, binary=True)


def iou(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """IoU of the masks ``value > T`` pooled over samples (``Σ intersection / Σ union``; T = ``arg``, 0.5).

    Pooled, not averaged per sample: a sample whose reference mask is empty (a photo
    crop without text) would otherwise score 0 for a handful of stray candidate pixels,
    and one with both masks empty a full 1, so the mean moved with how many samples
    happen to hold no object. Items are the samples (their IoU, weighted by their union);
    samples with both masks empty carry no evidence. 1.0 when no sample has a mask.
    """
    threshold = float(arg) if arg else 0.5
    items, unions = [], []
    for r, c in zip(reference, candidate, strict=True):
        rm, cm = _f64(r) > threshold, np.nan_to_num(_f64(c), nan=-np.inf) > threshold
        union = int(np.count_nonzero(rm | cm))
        items.append(1.0 if union == 0 else int(np.count_nonzero(rm & cm)) / union)
        unions.append(float(union))
    return Score(np.array(items), weights=np.array(unions))


def mask_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Return the threshold that splits ``values`` into two classes best (Otsu's, on a histogram).

    It maximizes the between-class variance ``w0·w1·(μ0 − μ1)²``, so on a bimodal map
    (a sigmoid probability map: background near 0, objects near 1) it falls in the gap
    between the modes, where every threshold selects the same pixels: the mask the task
    reads does not depend on the post-processing's own choice inside that gap (DB text
    detection thresholds at 0.3, a segmenter at 0.5). Returns the midpoint of the range
    when all values lie in one bin (a constant map has no mask to find).
    """
    finite = _f64(values).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.5
    low, high = float(finite.min()), float(finite.max())
    if high - low <= 0:
        return low
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)[:-1].astype(np.float64)
    weight1 = finite.size - weight0
    sums = np.cumsum(counts * centres)[:-1]
    total = float(np.sum(counts * centres))
    valid = (weight0 > 0) & (weight1 > 0)
    if not valid.any():
        return (low + high) / 2
    mean0 = np.where(valid, sums / np.where(valid, weight0, 1), 0.0)
    mean1 = np.where(valid, (total - sums) / np.where(valid, weight1, 1), 0.0)
    between = np.where(valid, weight0 * weight1 * (mean0 - mean1) ** 2, -1.0)
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    # ties (a wide empty gap): the middle of the tied cuts, so the threshold sits mid-gap
    return float(edges[1 + int(best[len(best) // 2])])


def collapse_ctc(labels: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Return a CTC path's decoded sequence: repeats merged, then blanks dropped."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        return ()
    keep = np.ones(labels.size, dtype=bool)
    keep[1:] = labels[1:] != labels[:-1]
    merged = labels[keep]
    return tuple(int(x) for x in merged[merged != blank])


def ctc(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Share of sequences decoded the same (greedy CTC on ``[..., time, classes]``, blank = ``arg``, 0)."""
    blank = int(arg) if arg else 0
    items = []
    for r_in, c_in in zip(reference, candidate, strict=True):
        r, c = _f64(r_in), np.nan_to_num(_f64(c_in), nan=-np.inf)
        r = r.reshape(-1, *r.shape[-2:]) if r.ndim >= 2 else r.reshape(1, -1, 1)
        c = c.reshape(r.shape)
        for rs, cs in zip(np.argmax(r, axis=-1), np.argmax(c, axis=-1), strict=True):
            items.append(float(collapse_ctc(rs, blank) == collapse_ctc(cs, blank)))
    return Score(np.array(items), binary=True)


def pooled(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Cosine of mean-pooled ``[batch, tokens, width]`` rows under the input mask ``arg`` (``attention_mask``)."""
    name = arg or "attention_mask"
    if inputs is None:
        raise ValueError(f"the pooled metric needs the inputs (for {name!r})")
    items = []
    for r_in, c_in, feed in zip(reference, candidate, inputs, strict=True):
        if name not in feed:
            raise ValueError(f"the pooled metric needs an input named {name!r}; inputs are {sorted(feed)}")
        r, c = _f64(r_in), np.nan_to_num(_f64(c_in), nan=0.0)
        r = r.reshape(-1, r.shape[-2], r.shape[-1])
        c = c.reshape(r.shape)
        mask = _f64(feed[name]).reshape(r.shape[0], r.shape[1], 1)
        weight = np.maximum(mask.sum(axis=1), 1e-9)
        items.extend(_cosine_rows((r * mask).sum(axis=1) / weight, (c * mask).sum(axis=1) / weight).tolist())
    return Score(np.array(items))


def equal(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Share of elements exactly equal (integer and boolean outputs)."""
    items = [
        (np.asarray(r) == np.asarray(c)).ravel().astype(np.float64) for r, c in zip(reference, candidate, strict=True)
    ]
    return Score(np.concatenate(items) if items else np.zeros(0), binary=True)


# --------------------------------------------------------------------------- detection


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[cx, cy, w, h]`` box with each of ``boxes``."""
    x1 = np.maximum(box[0] - box[2] / 2, boxes[:, 0] - boxes[:, 2] / 2)
    y1 = np.maximum(box[1] - box[3] / 2, boxes[:, 1] - boxes[:, 3] / 2)
    x2 = np.minimum(box[0] + box[2] / 2, boxes[:, 0] + boxes[:, 2] / 2)
    y2 = np.minimum(box[1] + box[3] / 2, boxes[:, 1] + boxes[:, 3] / 2)
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = np.abs(box[2] * box[3]) + np.abs(boxes[:, 2] * boxes[:, 3]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


#: Boxes overlapping more than this are one detection (NMS) and match (agreement).
BOX_IOU = 0.5
#: At most this many highest-scoring anchors enter NMS per sample.
MAX_CANDIDATES = 300


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[tuple[int, float, np.ndarray]]:
    """Return the detections ``(class, score, box)`` of per-class greedy NMS above ``threshold``.

    ``boxes`` is ``[anchors, 4]`` (``cx, cy, w, h``), ``scores`` ``[anchors, classes]``.
    """
    classes = np.argmax(scores, axis=-1)
    best = scores[np.arange(len(scores)), classes]
    order = np.argsort(-best, kind="stable")[:MAX_CANDIDATES]
    order = order[best[order] > threshold]
    kept: list[tuple[int, float, np.ndarray]] = []
    alive = np.ones(len(order), dtype=bool)
    for i, index in enumerate(order):
        if not alive[i]:
            continue
        kept.append((int(classes[index]), float(best[index]), boxes[index]))
        rest = order[i + 1 :]
        overlap = _box_iou(boxes[index], boxes[rest]) > BOX_IOU
        alive[i + 1 :] &= ~(overlap & (classes[rest] == classes[index]))
    return kept


def _split_detections(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (boxes ``[anchors, 4]``, scores ``[anchors, classes]``) of a ``[1, 4+C, N]`` or ``[1, N, 4+C]`` output."""
    a = _f64(array).reshape(array.shape[-2], array.shape[-1])
    rows = a.T if a.shape[0] <= a.shape[1] else a
    return rows[:, :4], rows[:, 4:]


def detection(reference: Arrays, candidate: Arrays, inputs: Inputs = None, arg: str | None = None) -> Score:
    """Score the detections the candidate reproduces: NMS at score ``arg`` (0.25) on both, matched by class and IoU.

    The output holds one image's anchors as ``[1, 4 + classes, anchors]`` (or anchors
    first, whichever axis is longer), boxes as ``cx, cy, w, h``. Each reference
    detection scores 1 when a candidate detection of the same class overlaps it by more
    than :data:`BOX_IOU` (each candidate matched once); each candidate detection left
    unmatched adds a 0. Reference detections within 10 % of the threshold are near-ties.
    """
    threshold = float(arg) if arg else 0.25
    items: list[float] = []
    ties = 0
    for r_in, c_in in zip(reference, candidate, strict=True):
        rb, rs = _split_detections(r_in)
        cb, cs = _split_detections(np.nan_to_num(_f64(c_in), nan=0.0))
        ref_dets, cand_dets = nms(rb, rs, threshold), nms(cb, cs, threshold)
        used = np.zeros(len(cand_dets), dtype=bool)
        cand_boxes = np.array([d[2] for d in cand_dets]).reshape(-1, 4)
        cand_classes = np.array([d[0] for d in cand_dets], dtype=np.int64)
        for cls, score, box in ref_dets:
            ties += int(score < threshold * 1.1)
            overlap = _box_iou(box, cand_boxes) if len(cand_dets) else np.zeros(0)
            fits = (~used) & (cand_classes == cls) & (overlap > BOX_IOU)
            if fits.any():
                used[int(np.argmax(np.where(fits, overlap, -1.0)))] = True
                items.append(1.0)
            else:
                items.append(0.0)
        items.extend([0.0] * int(np.count_nonzero(~used)))
    return Score(np.array(items), near_ties=ties, binary=True)


# --------------------------------------------------------------------------- scale groups


def split_by_scale(reference: Arrays, axis: int, span: float = SCALE_SPAN) -> list[tuple[int, int]]:
    """Return contiguous ``[start, stop)`` groups along ``axis`` whose slices share a scale.

    One group when the per-slice RMS (over all samples) spans at most ``span`` (max/min);
    otherwise the axis is cut between neighbours whose RMS differs by more than
    ``sqrt(span)``. All-zero slices join their neighbour's group, and so does a group of
    fewer than :data:`MIN_GROUP_VALUES` values per sample. Samples whose sizes along
    ``axis`` differ (variable-length inputs) give one group.
    """
    size = reference[0].shape[axis]
    if any(np.ndim(r) != np.ndim(reference[0]) or np.shape(r)[axis] != size for r in reference):
        return [(0, size)]
    sums = np.zeros(size)
    counts = 0
    for r in reference:
        a = np.moveaxis(_f64(r), axis, 0).reshape(size, -1)
        a = np.where(np.isfinite(a), a, 0.0)
        sums += np.sum(a * a, axis=1)
        counts += a.shape[1]
    rms = np.sqrt(sums / max(counts, 1))
    live = rms[rms > 0]
    if size < 2 or live.size < 2 or live.max() / live.min() <= span:
        return [(0, size)]
    cuts = [0]
    last = rms[0]
    for i in range(1, size):
        if rms[i] > 0 and last > 0 and max(rms[i], last) / min(rms[i], last) > math.sqrt(span):
            cuts.append(i)
        if rms[i] > 0:
            last = rms[i]
    groups = [(a, b) for a, b in zip(cuts, [*cuts[1:], size], strict=True)]
    per_slice = max(int(np.size(reference[0])) // max(size, 1), 1)
    while len(groups) > 1:
        small = next((i for i, (a, b) in enumerate(groups) if (b - a) * per_slice < MIN_GROUP_VALUES), None)
        if small is None:
            break
        other = small - 1 if small > 0 else 1  # join the previous group (the first joins the next)
        low, high = sorted((small, other))
        groups[low : high + 1] = [(groups[low][0], groups[high][1])]
    return groups


MetricFunction = Callable[[Arrays, Arrays, Inputs, "str | None"], Score]

#: The metrics by name (``topk@K``'s name is ``topk``; ``top1`` is ``topk`` with K = 1).
METRICS: dict[str, MetricFunction] = {
    "cosine": cosine,
    "sqnr": sqnr,
    "top1": topk,
    "topk": topk,
    "iou": iou,
    "ctc": ctc,
    "pooled": pooled,
    "detection": detection,
    "equal": equal,
}
