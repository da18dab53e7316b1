"""Weight layers and the statistics of their input activations over calibration data.

:func:`collect_input_stats` runs the model once per calibration sample with the layers'
inputs exposed as outputs and accumulates, streaming, per layer input:

* ``sq_sum[g, j]``: the sum of squares of input feature ``j`` (activation norms);
* ``total[g, j]``: the sum of feature ``j`` (for means);
* ``gram[g, i, j]``: the second moment ``XᵀX`` of the features (when asked for),
* ``spread``: how much ``XᵀX`` varies from sample to sample (when asked for, see
  :class:`GramSpread`),

never holding more than one sample's tensors of one group (:mod:`onnxopt.streaming`).
Rows of large feature maps are sampled (``max_rows`` per sample), which keeps ``XᵀX`` an
unbiased estimate up to scale.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnxopt.passes.common.layers import Layer, layer_rows

from onnxopt.data import Sample
from onnxopt.progress import Progress
from onnxopt.streaming import DEFAULT_MEMORY_BUDGET, stream_tensors

log = logging.getLogger(__name__)


@dataclass
class GramSpread:
    """What the per-sample ``G_k = X_kᵀX_k`` add up to beyond their sum, for the spread of ``XᵀX``.

    With ``r_k`` the rows of sample ``k``: ``weighted = Σ r_k·G_k`` ``[groups, k, k]``,
    ``off_squares = Σ ‖offdiag(G_k)‖²`` ``[groups]``, ``rows_squared = Σ r_k²`` and the
    sample count. Together with the sum of the ``G_k`` they give the sampling variance of
    every off-diagonal entry of ``XᵀX / rows``, with the *sample* as the independent unit
    (the rows of one sample, the tokens of a sentence, are not independent of each other).
    """

    weighted: np.ndarray
    off_squares: np.ndarray
    rows_squared: float = 0.0
    samples: int = 0

    def __add__(self, other: GramSpread) -> GramSpread:
        return GramSpread(
            self.weighted + other.weighted,
            self.off_squares + other.off_squares,
            self.rows_squared + other.rows_squared,
            self.samples + other.samples,
        )


@dataclass
class InputStats:
    """Streaming statistics of one layer input: row count, feature sums of squares, ``XᵀX``."""

    rows: int
    sq_sum: np.ndarray
    gram: np.ndarray | None = None
    total: np.ndarray | None = None  # per-feature sums [groups, features], for means
    spread: GramSpread | None = None  # sample-to-sample spread of the gram, when asked for

    @property
    def mean(self) -> np.ndarray | None:
        """Return the mean of each input feature ``[groups, features]``, or None when not collected."""
        return None if self.total is None else self.total / max(self.rows, 1)

    @property
    def norms(self) -> np.ndarray:
        """Return the RMS of each input feature, ``[groups, features]``."""
        return np.sqrt(self.sq_sum / max(self.rows, 1))

    @property
    def mean_gram(self) -> np.ndarray | None:
        """Return ``XᵀX / rows`` (float64), or None when not collected."""
        return None if self.gram is None else self.gram / max(self.rows, 1)


def layer_inputs(model: onnx.ModelProto, layers: Sequence[Layer]) -> tuple[dict[tuple, list[Layer]], list[str]]:
    """Group layers that read the same input the same way; return the groups and the tensors to expose.

    Graph inputs need no exposing: a sample already holds them.
    """
    by_signature: dict[tuple, list[Layer]] = {}
    for layer in layers:
        by_signature.setdefault(layer.signature, []).append(layer)
    inputs = {i.name for i in model.graph.input}
    return by_signature, sorted({layer.activation for layer in layers if layer.activation not in inputs})


def collect_input_stats(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    samples: Iterable[Sample],
    *,
    gram: bool = True,
    spread: bool = False,
    max_rows: int = 1024,
    seed: int = 0,
    progress: Progress | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, InputStats]:
    """Return the input statistics of every layer (by key), one calibration sample at a time.

    Layers reading the same activation the same way share one accumulator. ``gram``
    asks for ``XᵀX`` (for layers where :attr:`Layer.has_gram`). For a ConvTranspose the
    gram is over input channels, exact for the output error when strides cover the kernel.
    ``spread`` (with ``gram``) also accumulates :class:`GramSpread`, one more ``k×k`` array
    per layer input. The layer inputs stream through :func:`onnxopt.streaming.stream_tensors`: exposed in
    groups under ``memory_budget`` bytes per sample, so memory stays bounded however many
    layers there are.
    """
    samples = list(samples)
    rng = np.random.default_rng(seed)
    by_signature, exposed = layer_inputs(model, layers)
    accumulators: dict[tuple, InputStats] = {}

    def accumulate(values: dict[str, np.ndarray]) -> None:
        for signature, group in by_signature.items():
            layer = group[0]
            if layer.activation not in values:  # in another group of exposed tensors
                continue
            rows = layer_rows(layer, np.asarray(values[layer.activation], dtype=np.float32), max_rows, rng)
            acc = accumulators.get(signature)
            if acc is None:
                acc = InputStats(
                    0, np.zeros(rows.shape[1:], dtype=np.float64), total=np.zeros(rows.shape[1:], dtype=np.float64)
                )
                if gram and layer.has_gram:
                    acc.gram = np.zeros((rows.shape[1], rows.shape[2], rows.shape[2]), dtype=np.float64)
                    if spread:
                        acc.spread = GramSpread(np.zeros_like(acc.gram), np.zeros(rows.shape[1]))
                accumulators[signature] = acc
            acc.rows += rows.shape[0]
            acc.sq_sum += np.einsum("pgi,pgi->gi", rows, rows, dtype=np.float64)
            acc.total += rows.sum(axis=0, dtype=np.float64)
            if acc.gram is not None:
                grouped = np.ascontiguousarray(rows.transpose(1, 0, 2))
                sample_gram = np.matmul(grouped.transpose(0, 2, 1), grouped).astype(np.float64)
                acc.gram += sample_gram
                if acc.spread is not None:  # one call per sample and group of exposed tensors
                    diagonal = np.diagonal(sample_gram, axis1=1, axis2=2)
                    acc.spread.weighted += rows.shape[0] * sample_gram
                    acc.spread.off_squares += np.sum(sample_gram**2, axis=(1, 2)) - np.sum(diagonal**2, axis=1)
                    acc.spread.rows_squared += rows.shape[0] ** 2
                    acc.spread.samples += 1

    read = list(dict.fromkeys(group[0].activation for group in by_signature.values()))
    stream_tensors(
        model,
        [t for t in read if t not in exposed] + exposed,
        samples,
        accumulate,
        progress=progress,
        task="collecting layer inputs",
        label="model with exposed layer inputs",
        memory_budget=memory_budget,
    )
    return {layer.key: accumulators[sig] for sig, group in by_signature.items() for layer in group}


def collect_fold_stats(
    model: onnx.ModelProto,
    layers: list[Layer],
    samples: list,
    folds: int,
    *,
    gram: bool,
    seed: int,
    progress: Progress | None,
) -> tuple[dict[str, InputStats], dict[str, list[np.ndarray]]]:
    """Return the layers' input statistics over all ``samples`` and the ``XᵀX`` of each of ``folds`` parts.

    Part ``k`` holds samples ``k, k + folds, …``; the statistics are collected once per
    part and summed, so the model runs once per sample as without folds.
    """
    parts = [
        collect_input_stats(model, layers, samples[k::folds], gram=gram, seed=seed + 7919 * k, progress=progress)
        for k in range(folds)
    ]
    totals: dict[int, InputStats] = {}
    merged: dict[str, InputStats] = {}
    fold_grams: dict[str, list[np.ndarray]] = {}
    for key, first in parts[0].items():
        if id(first) not in totals:  # layers reading an input alike share one accumulator
            group = [part[key] for part in parts]
            grams = [g.gram for g in group]
            sums = [g.total for g in group]
            totals[id(first)] = InputStats(
                sum(g.rows for g in group), sum_arrays(g.sq_sum for g in group), sum_or_none(grams), sum_or_none(sums)
            )
        merged[key] = totals[id(first)]
        per_fold = [part[key].gram for part in parts]
        if all(g is not None for g in per_fold):
            fold_grams[key] = [g for g in per_fold if g is not None]
    return merged, fold_grams


def sum_arrays(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Return the elementwise sum of ``arrays`` (the built-in ``sum`` is typed ``int | ndarray``)."""
    return functools.reduce(operator.add, arrays)


def sum_or_none(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Return the elementwise sum, or None when any part is missing."""
    present = [a for a in arrays if a is not None]
    return sum_arrays(present) if present and len(present) == len(arrays) else None
