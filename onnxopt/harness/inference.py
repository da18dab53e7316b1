"""Which metrics judge each output, inferred from the graph and the reference outputs.

Inference rules, first match wins, per float output:

1. produced (through shape-only ops) by ``Softmax``/``LogSoftmax`` on the last axis:
   rank 2 → ``top1``; rank 3 ``[batch, time, classes]`` → ``ctc`` (blank 0);
2. an ``attention_mask`` input and a ``[batch, tokens, width]`` output → ``pooled``;
3. produced by ``Sigmoid`` with spatial dimensions (rank ≥ 3, last two > 1) → ``iou@T``,
   ``T`` the threshold that splits the reference's values in two (Otsu's,
   :func:`~onnxopt.harness.metrics.mask_threshold`): on a bimodal probability map it
   lies in the gap between background and objects, where any task threshold selects
   the same mask;
4. produced by ``Concat`` of a 4-wide box part and scores in [0, 1] (``[1, 4+C, N]``) →
   ``detection@0.25``;
5. slices along one axis whose RMS spans more than 100× (:func:`split_by_scale`) → each
   group judged by ``cosine`` and ``sqnr`` apart;
6. otherwise ``cosine`` and ``sqnr``, plus ``top1`` for ``[batch, classes]`` rows that are
   not of unit length (a normalized embedding's arg-max means nothing).

Integer and boolean outputs are judged by ``equal``. Floors come from
:data:`~onnxopt.harness.judge.FLOORS` by profile: ``int8`` is the gate's, ``target`` the
lossy passes' default target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from onnxopt.harness.judge import FLOORS, MetricError, MetricSpec, Outputs
from onnxopt.harness.metrics import mask_threshold, split_by_scale

__all__ = ["infer_metrics", "with_floors"]

log = logging.getLogger(__name__)


_SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Transpose"}


def _producer(graph: onnx.GraphProto, name: str) -> tuple[onnx.NodeProto | None, bool]:
    """Return the node producing ``name`` through shape-only ops, and whether a Transpose was crossed."""
    producers = {out: node for node in graph.node for out in node.output}
    transposed = False
    node = producers.get(name)
    for _ in range(16):
        if node is None or node.op_type not in _SHAPE_ONLY or not node.input:
            break
        transposed |= node.op_type == "Transpose"
        node = producers.get(node.input[0])
    return node, transposed


def _softmax_on_last_axis(node: onnx.NodeProto, rank: int, opset: int) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    return axis in (-1, rank - 1) or (opset < 13 and axis == 1 and rank == 2)


def _unit_rows(array: np.ndarray) -> bool:
    norms = np.linalg.norm(np.asarray(array, np.float64).reshape(-1, array.shape[-1]), axis=-1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))


def _signal(output: str, floors: Mapping[str, float], reason: str, slice_: str | None = None) -> list[MetricSpec]:
    return [
        MetricSpec(output, "cosine", floors["cosine"], slice=slice_, reason=reason),
        MetricSpec(output, "sqnr", floors["sqnr"], slice=slice_, reason=reason),
    ]


def _axis_slice(rank: int, axis: int, start: int, stop: int) -> str:
    parts = [":"] * rank
    parts[axis] = f"{start}:{stop}"
    return "[" + ", ".join(parts) + "]"


def _scale_groups(reference: list[np.ndarray]) -> tuple[int, list[tuple[int, int]]] | None:
    """Return (axis, groups) of the axis with the most scale groups, or None when none splits."""
    first = reference[0]
    best: tuple[int, list[tuple[int, int]]] | None = None
    for axis in range(1, first.ndim):
        if first.shape[axis] < 2 or first.shape[axis] > 4096:
            continue
        groups = split_by_scale(reference, axis)
        if len(groups) > 1 and (best is None or len(groups) > len(best[1])):
            best = (axis, groups)
    return best


def _infer_one(
    model: onnx.ModelProto,
    output: str,
    reference: list[np.ndarray],
    input_names: set[str],
    floors: Mapping[str, float],
) -> list[MetricSpec]:
    first = np.asarray(reference[0])
    if not np.issubdtype(first.dtype, np.floating):
        return [MetricSpec(output, "equal", floors["equal"], reason=f"{first.dtype} output: values must match")]
    rank = first.ndim
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    node, transposed = _producer(model.graph, output)
    op = node.op_type if node is not None else None
    if (
        op in ("Softmax", "LogSoftmax")
        and node is not None
        and not transposed
        and _softmax_on_last_axis(node, rank, opset)
    ):
        if rank == 2 and first.shape[-1] > 1:
            return [
                MetricSpec(output, "top1", floors["top1"], reason=f"{op} over the classes of a [batch, classes] output")
            ]
        if rank == 3 and first.shape[1] > 1:
            reason = f"{op} over the last axis of a [batch, time, classes] output: a sequence decoder (CTC, blank 0)"
            return [MetricSpec(output, "ctc", floors["ctc"], arg="0", reason=reason)]
    if "attention_mask" in input_names and rank == 3 and first.shape[1] > 1:
        reason = "an attention_mask input and a [batch, tokens, width] output: the task reads mean-pooled embeddings"
        return [MetricSpec(output, "pooled", floors["pooled"], arg="attention_mask", reason=reason)]
    if op == "Sigmoid" and rank >= 3 and first.shape[-1] > 1 and first.shape[-2] > 1:
        threshold = f"{mask_threshold(np.concatenate([np.ravel(r) for r in reference])):.3g}"
        reason = (
            f"Sigmoid map with spatial dimensions: IoU of the mask at {threshold}, where the reference's values "
            "split in two (Otsu), pooled over samples"
        )
        return [MetricSpec(output, "iou", floors["iou"], arg=threshold, reason=reason)]
    split = _scale_groups(reference)
    if op == "Concat" and rank == 3 and first.shape[0] == 1 and split is not None:
        axis, groups = split
        scores = np.concatenate([np.moveaxis(np.asarray(r), axis, 0)[4:].ravel() for r in reference])
        if groups[0] == (0, 4) and axis in (1, 2) and scores.size and scores.min() >= 0 and scores.max() <= 1:
            reason = f"Concat of 4 box channels and {first.shape[axis] - 4} scores in [0, 1] (axis {axis}): detections"
            return [MetricSpec(output, "detection", floors["detection"], arg="0.25", reason=reason)]
    if split is not None:
        axis, groups = split
        specs = []
        for start, stop in groups:
            reason = f"slices along axis {axis} differ in scale by more than 100x: group {start}:{stop} judged apart"
            specs += _signal(output, floors, reason, _axis_slice(rank, axis, start, stop))
        return specs
    if rank == 2 and first.shape[-1] > 1 and not _unit_rows(first):
        reason = "a [batch, classes] output: signal floors and top-1 of the rows"
        return [*_signal(output, floors, reason), MetricSpec(output, "top1", floors["top1"], reason=reason)]
    reason = "no task structure found: signal floors on the whole output"
    if rank == 2 and first.shape[-1] > 1:
        reason = "rows of unit length (a normalized embedding, no arg-max): signal floors"
    return _signal(output, floors, reason)


def infer_metrics(
    model: onnx.ModelProto,
    reference: Outputs,
    *,
    profile: str = "int8",
    declared: Sequence[MetricSpec] = (),
) -> list[MetricSpec]:
    """Return the declared metrics plus inferred ones for every output no declared metric covers.

    ``reference`` holds the model's outputs on the samples (value ranges decide some
    rules). A declared metric on output ``*`` (a Python callable) covers every output.
    """
    floors = FLOORS[profile]
    covered = {spec.output for spec in declared}
    names = [o.name for o in model.graph.output]
    if reference:
        missing = [s.output for s in declared if s.output != "*" and s.output not in reference[0]]
        if missing:
            raise MetricError(f"metric on {missing[0]!r}: the model has no such output; outputs are {names}")
    if "*" in covered or not reference:
        return list(declared)
    inputs = {i.name for i in model.graph.input}
    specs = list(declared)
    for name in names:
        if name in covered or name not in reference[0]:
            continue
        specs += _infer_one(model, name, [r[name] for r in reference], inputs, floors)
    return specs


def with_floors(specs: Sequence[MetricSpec], profile: str) -> list[MetricSpec]:
    """Return inferred specs with the floors of another profile (declared ones unchanged)."""
    floors = FLOORS[profile]
    return [s if s.reason.startswith("declared") else replace(s, floor=floors.get(s.name, s.floor)) for s in specs]
