"""Accuracy targets, node sensitivity and latency measurement for ``quantize_int8`` (private).

* A **target** is a string such as ``"cosine>=0.999,sqnr>=30"`` (every float output must
  reach each floor; ``top1>=0.99`` judges score-like outputs), optionally scoped to some
  outputs with ``@``: ``"cosine>=0.999,sqnr>=25@sentence_embedding"`` (names joined by
  ``|``; the sensitivity ranking then measures those outputs only), or a Python callable
  ``metric(reference_outputs, candidate_outputs) -> bool`` on per-sample output dicts.
* **Sensitivity** of a node is measured, not estimated: the model is rebuilt with only that
  node returned to float and the output noise that disappears is its share. Local
  per-tensor noise was tried first and misled on deep CNNs (noise accumulates, so late
  and tiny branches looked worst). Candidates are the weighted anchors, which carry
  both the error and the gain; one or two held-out samples rank them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.common.budget import TaskBudget, declared_budget
from onnxopt.passes.common.layers import is_depthwise

from onnxopt.data import Dataset
from onnxopt.graph import GraphIndex
from onnxopt.harness import PROFILES, Tolerance, compare_outputs
from onnxopt.harness.metrics import split_by_scale
from onnxopt.runtime import Session

__all__ = [
    "DEFAULT_TARGET",
    "Target",
    "depthwise_groups",
    "output_noise",
    "parse_target",
    "rank_by_removal",
    "scale_groups",
]

_GATE = PROFILES["int8"]
#: The default accuracy target is the judge's task metrics (:class:`TaskBudget`): what
#: each output's consumer reads, inferred from the graph (top-1 of a Softmax classifier,
#: CTC sequences of a recognizer, the IoU of a Sigmoid map, mean-pooled embeddings under
#: an ``attention_mask``, detections of a boxes+scores head, signal floors where no task
#: structure shows), at the ``target`` floors of :data:`onnxopt.harness.judge.FLOORS`.
#: The signal floors it replaced (cosine >= 0.995, SQNR >= 20 dB on every float output)
#: passed a detector whose score channels fell to cosine 0.958 and flipped 3.1 % of a
#: 2-class classifier's decisions. ``"task"`` names it; the old floors stay available as
#: ``--target cosine>=0.995,sqnr>=20``.
DEFAULT_TARGET = "task"

Outputs = Sequence[Mapping[str, np.ndarray]]
Metric = Callable[[Outputs, Outputs], bool]

_TERM = re.compile(r"^\s*(cosine|sqnr|top1)\s*>=\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Target:
    """A parsed accuracy target: a tolerance for the harness, or a user metric."""

    text: str
    tolerance: Tolerance | None = None
    metric: Metric | None = None
    outputs: tuple[str, ...] = ()  # the outputs judged; empty: all
    task: TaskBudget | None = None  # the judge's task metrics, bound to the model by HeldOutCheck

    def scoped(self, outputs: Outputs) -> list[dict[str, np.ndarray]]:
        """Return ``outputs`` restricted to the judged outputs."""
        return [{k: v for k, v in o.items() if not self.outputs or k in self.outputs} for o in outputs]

    def judge(self, reference: Outputs, candidate: Outputs) -> tuple[bool, str]:
        """Return (met, the worst figure or failure as text)."""
        if self.metric is not None:
            met = bool(self.metric(reference, candidate))
            return met, f"user metric {'met' if met else 'not met'}"
        if self.tolerance is None:
            raise TypeError("a task target is judged by HeldOutCheck, which binds its metrics to the model")
        result = compare_outputs(self.scoped(reference), self.scoped(candidate), profile=self.tolerance)
        worst = min(result.outputs, key=lambda o: o.cosine, default=None)
        summary = f"cosine {worst.cosine:.5f}, SQNR {worst.sqnr_db:.1f} dB ({worst.name})" if worst else "no outputs"
        return result.passed, summary


def parse_target(target: str | Metric | None) -> Target:
    """Return the :class:`Target` for a string like ``"cosine>=0.999,sqnr>=30"`` or a callable."""
    if target is None:
        target = DEFAULT_TARGET
    if callable(target):
        return Target(getattr(target, "__name__", "user metric"), metric=target)
    if str(target).strip() == "task":
        return Target("task metrics", task=TaskBudget())
    if ":" in str(target):  # declared task metrics, e.g. "output0:detection>=0.99; output0[:, :4]:cosine>=0.999"
        return Target(str(target), task=declared_budget(str(target)))
    terms, _, scope = str(target).partition("@")
    outputs = tuple(name.strip() for name in scope.split("|") if name.strip())
    if scope and not outputs:
        raise ValueError(f"target {target!r}: expected output names after '@'")
    floors: dict[str, float] = {}
    for term in re.split(r",|\band\b", terms):
        if not term.strip():
            continue
        match = _TERM.match(term)
        if not match:
            raise ValueError(f"target term {term.strip()!r}: expected cosine>=X, sqnr>=DB or top1>=X")
        floors[match.group(1)] = float(match.group(2))
    if not floors:
        raise ValueError(f"empty target {target!r}")
    tolerance = Tolerance(
        elementwise=False, min_cosine=floors.get("cosine"), min_sqnr_db=floors.get("sqnr"), min_top1=floors.get("top1")
    )
    return Target(str(target), tolerance=tolerance, outputs=outputs)


def _noise_ratio(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    signal = noise = 0.0
    for r, c in zip(reference, candidate, strict=True):
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        keep = np.isfinite(r64) & np.isfinite(c64)
        signal += float(np.sum(r64[keep] ** 2))
        noise += float(np.sum((r64[keep] - c64[keep]) ** 2))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else 1.0)


def scale_groups(arrays: Sequence[np.ndarray]) -> list[tuple[slice, ...]]:
    """Return index tuples of the channel groups whose scales differ (:func:`split_by_scale`), else the whole.

    The axis with the most groups wins; a YOLOv8 head's boxes (0–1024) and scores (0–1)
    become two groups, so the scores' noise is measured against the scores' signal. An
    axis counts only where every sample alone cuts it the same way: a group is a property
    of the output's layout (box channels, score channels), not of one input's content. The
    rows of a probability map split into text and near-zero background differently in
    each image, and a background row's noise over its ~1e-8 signal (ratios of 1e15 on
    PP-OCR det) would rank nodes by what no task reads.
    """
    first = arrays[0]
    best: list[tuple[slice, ...]] = [(slice(None),)]
    for axis in range(1, first.ndim):
        if 2 <= first.shape[axis] <= 4096:
            groups = split_by_scale(arrays, axis)
            if len(groups) > len(best) and all(split_by_scale([a], axis) == groups for a in arrays):
                best = [(*(slice(None),) * axis, slice(a, b)) for a, b in groups]
    return best


def output_noise(model: onnx.ModelProto, data: Dataset, reference: Outputs) -> float:
    """Return the worst noise-to-signal ratio of ``model`` against ``reference`` over float outputs.

    Each output is measured per scale group (:func:`scale_groups`), so a part of an output
    that is small in value (a detector's scores next to its boxes) ranks nodes by its own
    noise: the judge's detection metric reads it, and its noise vanishes in the whole.
    """
    with Session(model, optimization="default", label="int8 model") as session:  # as it deploys
        outputs = [session.run(sample) for sample in data]
    worst = 0.0
    for name, value in reference[0].items():
        if np.issubdtype(value.dtype, np.floating):
            ref = [r[name] for r in reference]
            for index in scale_groups(ref):
                worst = max(worst, _noise_ratio([r[index] for r in ref], [o[name][index] for o in outputs]))
    return worst


def rank_by_removal(
    build: Callable[[set[str]], onnx.ModelProto],
    candidates: Sequence[str],
    data: Dataset,
    reference: Outputs,
    tick: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Return, per candidate, the output noise removed by keeping it alone in float (higher: worse).

    ``build(float_nodes)`` returns the quantized model with ``float_nodes`` kept float.
    """
    base = output_noise(build(set()), data, reference)
    gains = {}
    for name in candidates:
        gains[name] = base - output_noise(build({name}), data, reference)
        if tick is not None:
            tick()
    return gains


def depthwise_groups(model: onnx.ModelProto, nodes: Mapping[str, onnx.NodeProto]) -> dict[str, list[str]]:
    """Return the quantized depthwise convolutions to try in float, as nested groups (label → names).

    onnxruntime's int8 depthwise kernel is slow for kernels above 3x3 on small inputs
    (PP-OCR cls, 48x192: a 5x5 depthwise QLinearConv took 3-10x its float Conv), so the
    groups are "depthwise convs larger than 3x3" then "all depthwise convs"; empty ones are left out.
    """
    index = GraphIndex(model.graph)
    large: list[str] = []
    every: list[str] = []
    for name, node in nodes.items():
        weight = index.constant(node.input[1]) if is_depthwise(node, index) else None
        if weight is None or weight.ndim != 4:  # 2-D kernels: where the slow int8 kernel was measured
            continue
        every.append(name)
        if weight.shape[2] * weight.shape[3] > 9:
            large.append(name)
    groups = {"depthwise convs above 3x3": large, "depthwise convs": every}
    return {
        label: names for label, names in groups.items() if names and not (label == "depthwise convs" and names == large)
    }
