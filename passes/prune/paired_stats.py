"""Paired layer-input statistics for pruning's upstream compensation (private to ``prune``).

The input ``X'`` of a layer in a changed model and the original ``X``, row by row from
the same samples and positions: ``X'ᵀX'`` and ``X'ᵀX`` let a layer re-fit to what it
received before the layers upstream of it were pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.common.layers import Layer, layer_rows
from onnxopt.passes.common.stats import InputStats, layer_inputs

from onnxopt.data import Sample
from onnxopt.runtime import Session, expose_tensors

__all__ = ["PairedStats", "collect_paired_stats"]


@dataclass
class PairedStats:
    """Statistics of one layer's inputs ``X'`` in a changed model, paired row by row with the original ``X``.

    ``stats`` are those of ``X'`` (``gram = X'ᵀX'``); ``cross = X'ᵀX`` ``[g, c, c]``.
    """

    stats: InputStats
    cross: np.ndarray


def collect_paired_stats(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    layers: Sequence[Layer],
    samples: Iterable[Sample],
    *,
    max_rows: int = 1024,
    seed: int = 0,
) -> dict[str, PairedStats]:
    """Return ``X'ᵀX'`` and ``X'ᵀX`` of each layer's input in ``candidate`` (``X'``) and ``reference`` (``X``).

    Both models must name the layers' inputs alike (pruning changes only weights); the
    same rows are sampled from both, one calibration sample at a time.
    """
    by_signature, exposed = layer_inputs(reference, layers)
    accumulators: dict[tuple, PairedStats] = {}
    with (
        Session(expose_tensors(reference, exposed), label="input model, layer inputs exposed") as original,
        Session(expose_tensors(candidate, exposed), label="changed model, layer inputs exposed") as changed,
    ):
        for number, sample in enumerate(samples):
            pair = [session.run(sample, exposed) if exposed else {} for session in (original, changed)]
            for values in pair:
                values.update(sample)  # layers reading graph inputs read them from the sample
            for position, (signature, group) in enumerate(by_signature.items()):
                layer = group[0]
                rows_x, rows_p = (
                    layer_rows(
                        layer,
                        np.asarray(values[layer.activation], dtype=np.float32),
                        max_rows,
                        np.random.default_rng([seed, number, position]),
                    )
                    for values in pair
                )
                acc = accumulators.get(signature)
                if acc is None:
                    features = rows_p.shape[1:]
                    acc = PairedStats(
                        InputStats(0, np.zeros(features), np.zeros((*features, features[1])), np.zeros(features)),
                        np.zeros((*features, features[1])),
                    )
                    accumulators[signature] = acc
                acc.stats.rows += rows_p.shape[0]
                acc.stats.sq_sum += np.einsum("pgi,pgi->gi", rows_p, rows_p, dtype=np.float64)
                acc.stats.total += rows_p.sum(axis=0, dtype=np.float64)
                grouped_p = np.ascontiguousarray(rows_p.transpose(1, 2, 0)).astype(np.float64)
                grouped_x = np.ascontiguousarray(rows_x.transpose(1, 0, 2)).astype(np.float64)
                acc.stats.gram += np.matmul(grouped_p, grouped_p.transpose(0, 2, 1))
                acc.cross += np.matmul(grouped_p, grouped_x)
            del pair
    return {layer.key: accumulators[sig] for sig, group in by_signature.items() for layer in group}
