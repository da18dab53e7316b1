"""Layer-wise comparison: where inside the graph the error first exceeds tolerance."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.harness.compare import PROFILES, compare_arrays
from onnxopt.runtime import Session, expose_tensors

log = logging.getLogger(__name__)


@dataclass
class LayerComparison:
    """One intermediate tensor matched between the two models."""

    reference: str
    candidate: str
    op_type: str
    matched_by: str
    shape: list[int]
    max_abs: float
    cosine: float
    sqnr_db: float
    passed: bool


def _producers(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """Return (tensor, op_type, occurrence of that op type) for main-graph node outputs."""
    seen: dict[str, int] = {}
    result = []
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}"
        n = seen.get(key, 0)
        seen[key] = n + 1
        for slot, out in enumerate(node.output):
            if out:
                result.append((out, node.op_type, n * 16 + slot))
    return result


def compare_layers(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    sample: Sample,
    *,
    profile: str = "exact",
) -> list[LayerComparison]:
    """Compare intermediate tensors of two models on one sample, in reference order.

    Tensors are matched by name where the name survived, otherwise by producer (the
    same op type at the same position among nodes of that type, with equal shape) --
    but never to a candidate tensor whose name the reference also has: that name means
    the reference's tensor. (A Conv+BatchNorm fold makes the Conv write the BatchNorm's
    output; the folded Conv is compared with that output, not with the Conv before it.)
    """
    ref_prod = _producers(reference)
    cand_prod = _producers(candidate)
    with Session(expose_tensors(reference, [t for t, _, _ in ref_prod]), label="reference") as s:
        ref_values = s.run(sample)
    with Session(expose_tensors(candidate, [t for t, _, _ in cand_prod]), label="candidate") as s:
        cand_values = s.run(sample)
    ref_names = {t for t, _, _ in ref_prod} | {i.name for i in reference.graph.input}
    cand_by_slot = {(op, pos): t for t, op, pos in cand_prod if t not in ref_names}
    tolerance = PROFILES[profile]
    rows = []
    for tensor, op_type, pos in ref_prod:
        ref = ref_values.get(tensor)
        if ref is None or not np.issubdtype(ref.dtype, np.floating):
            continue
        if tensor in cand_values:
            other, how = tensor, "name"
        elif (op_type, pos) in cand_by_slot:
            other, how = cand_by_slot[(op_type, pos)], "producer"
        else:
            continue
        cand = cand_values.get(other)
        if cand is None or cand.shape != ref.shape or cand.dtype != ref.dtype:
            continue
        result = compare_arrays(tensor, [ref], [cand], tolerance)
        rows.append(
            LayerComparison(
                tensor,
                other,
                op_type,
                how,
                list(ref.shape),
                result.max_abs,
                result.cosine,
                result.sqnr_db,
                result.passed,
            )
        )
    return rows
