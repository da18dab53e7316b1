"""The math of unstructured pruning, on numpy arrays: masks, repair, errors, allocation.

Weights come in the canonical view ``W[g, r, c]`` (groups, output rows, input features);
``G[g, c, c] = XᵀX`` is the second moment of a layer's inputs and ``‖X_j‖`` their norms.

* Exact sparsity: :func:`lowest_mask` zeroes exactly ``count`` weights, ties broken by
  position, so a target is met even when many weights share a value.
* Scores: magnitude ``|W|`` or activation-aware ``|W|·‖X_j‖`` (Wanda).
* Repair (:func:`sparsegpt`): the OBS update of SparseGPT — columns are pruned left to
  right and each pruning error is spread over the not yet processed columns through the
  inverse Hessian ``(XᵀX + λI)⁻¹``, a least-squares re-fit of the kept weights so the
  layer output stays close. The mask is chosen adaptively per block of columns by the
  OBS saliency ``w²/[H_F⁻¹]_jj`` (``F``: the columns not yet processed; the Cholesky
  diagonal of ``H⁻¹`` squared), or given.
* Upstream compensation (:func:`compensate_upstream`): when earlier layers are already
  pruned, the dense weight that maps the changed inputs to the original outputs.
* Error: the relative output error of a change ``Δ`` is ``Σ_g tr(Δ_g G_g Δ_gᵀ) / Σ_g tr(W_g G_g W_gᵀ)``.
* Allocation (:func:`allocate_counts`): given each layer's error at a few sparsity
  levels, the cheapest per-layer counts for a total, on the lower convex hull of each
  curve (Lagrangian), exact to one weight.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnxopt.passes.common.linalg import inverse_factor, spd_solve

__all__ = [
    "ErrorCurve",
    "activation_scores",
    "allocate_counts",
    "compensate_upstream",
    "cross_validated_error",
    "lowest_mask",
    "nm_mask",
    "parse_nm",
    "relative_layer_error",
    "sparsegpt",
]


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (N zeros in every M consecutive weights), e.g. ``"2:4"``."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError as exc:
        raise ValueError(f"nm must look like '2:4', got {text!r}") from exc
    if not 0 < n < m:
        raise ValueError(f"nm {text!r}: need 0 < N < M")
    return n, m


def lowest_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Return a boolean mask (True = prune) of exactly ``count`` lowest scores; ties by position."""
    flat = np.asarray(scores).ravel()
    count = int(min(max(count, 0), flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    if count:
        mask[np.argsort(flat, kind="stable")[:count]] = True
    return mask.reshape(np.shape(scores))


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Return a mask pruning the ``n`` lowest of every ``m`` consecutive scores on the last axis."""
    if scores.shape[-1] % m:
        raise ValueError(f"the last axis ({scores.shape[-1]}) is not a multiple of M={m}")
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    order = np.argsort(grouped, axis=-1, kind="stable")
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return mask.reshape(scores.shape)


def activation_scores(weight: np.ndarray, norms: np.ndarray | None) -> np.ndarray:
    """Return ``|W|·‖X_j‖`` (``|W|`` when ``norms`` is None) for ``W[g, r, c]`` and norms ``[g, c]``."""
    magnitude = np.abs(weight)
    return magnitude if norms is None else magnitude * norms[:, None, :]


def relative_layer_error(
    weight: np.ndarray, pruned: np.ndarray, gram: np.ndarray | None, norms: np.ndarray | None = None
) -> float:
    """Return ``‖X(W − W')ᵀ‖² / ‖XWᵀ‖²`` from ``XᵀX`` (or its diagonal, ``norms²``, if no gram)."""
    w = weight.astype(np.float64)
    delta = w - pruned
    if gram is None:
        diag = np.ones(w.shape[::2]) if norms is None else norms.astype(np.float64) ** 2
        noise = float(np.einsum("grc,gc->", delta * delta, diag))
        signal = float(np.einsum("grc,gc->", w * w, diag))
    else:
        noise = float(np.einsum("grc,gcd,grd->", delta, gram, delta, optimize=True))
        signal = float(np.einsum("grc,gcd,grd->", w, gram, w, optimize=True))
    return noise / signal if signal > 0 else 0.0


def _block_counts(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over blocks proportionally to ``sizes``, exactly (cumulative rounding)."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    fraction = total / bounds[-1] if bounds[-1] else 0.0
    marks = np.round(bounds * fraction).astype(int)
    return list(np.diff(marks))


def sparsegpt(
    weight: np.ndarray,
    gram: np.ndarray | None,
    *,
    count: int | None = None,
    nm: tuple[int, int] | None = None,
    mask: np.ndarray | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """Prune ``W[g, r, c]`` to ``count`` zeros (or an N:M pattern, or a given ``mask``) and re-fit the kept weights.

    ``gram`` is ``XᵀX`` per group ``[g, c, c]``; ``damp`` adds ``damp·mean(diag)`` to it
    (or ``factor``, :func:`inverse_factor` of both, is given and ``gram`` is not used).
    Exactly ``count`` weights are zeroed (spread over column blocks in proportion), chosen
    per block by the OBS saliency ``w²/[H⁻¹]_jj`` of the weights as updated so far.
    ``mask`` (True = prune) fixes the pattern instead; each row's kept weights are then
    updated column by column, exactly the least-squares re-fit when the mask is a prefix.
    """
    w = weight.astype(np.float64).copy()
    groups, rows, cols = w.shape
    if factor is None:
        if gram is None:
            raise ValueError("sparsegpt needs gram or factor")
        factor = inverse_factor(gram, damp)
    upper = factor
    starts = list(range(0, cols, blocksize))
    sizes = [min(blocksize, cols - s) * rows * groups for s in starts]
    counts = _block_counts(count or 0, sizes) if nm is None else [0] * len(starts)
    for start, block_count in zip(starts, counts, strict=True):
        end = min(start + blocksize, cols)
        w1 = w[:, :, start:end].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        h1 = upper[:, start:end, start:end]
        d = np.einsum("gii->gi", h1)
        if mask is not None:
            block_mask = mask[:, :, start:end]
        elif nm is None:
            block_mask = lowest_mask(w1**2 / d[:, None, :] ** 2, block_count)
        else:
            block_mask = np.zeros(w1.shape, dtype=bool)
        for i in range(end - start):
            if mask is None and nm is not None and i % nm[1] == 0:
                span = slice(i, i + nm[1])
                block_mask[:, :, span] = nm_mask(w1[:, :, span] ** 2 / d[:, None, span] ** 2, *nm)
            column = w1[:, :, i]
            q = np.where(block_mask[:, :, i], 0.0, column)
            q1[:, :, i] = q
            err = (column - q) / d[:, None, i]
            w1[:, :, i:] -= err[:, :, None] * h1[:, None, i, i:]
            err1[:, :, i] = err
        w[:, :, start:end] = q1
        w[:, :, end:] -= np.matmul(err1, upper[:, start:end, end:])
    return w.astype(np.float32)


def cross_validated_error(
    weight: np.ndarray,
    fold_grams: Sequence[np.ndarray],
    counts: Sequence[int],
    *,
    damp: float = 0.01,
    max_rows: int | None = None,
) -> list[float]:
    """Return the held-out relative output error of :func:`sparsegpt` at each of ``counts``, by k-fold.

    ``fold_grams`` holds ``XᵀX`` of disjoint parts of the calibration rows. For each part,
    the layer is pruned and repaired on the others' statistics and its error measured on
    that part; noise and signal are summed over parts. With few rows per input feature
    the repair fits the calibration rows' noise, and this says how much of its gain
    carries over to inputs it has not seen. ``max_rows`` estimates it on evenly spaced
    output rows only (counts scaled alike), which cuts the cost of wide layers.
    """
    w = weight
    if max_rows is not None and weight.shape[1] > max_rows:
        w = weight[:, np.linspace(0, weight.shape[1] - 1, max_rows).round().astype(int)]
    scale = w.size / weight.size
    noise = np.zeros(len(counts))
    signal = 0.0
    total = sum(fold_grams)
    w64 = w.astype(np.float64)
    for held in fold_grams:
        factor = inverse_factor(total - held, damp)
        signal += float(np.einsum("grc,gcd,grd->", w64, held, w64, optimize=True))
        for n, count in enumerate(counts):
            delta = w64 - sparsegpt(w, None, count=round(count * scale), factor=factor)
            noise[n] += float(np.einsum("grc,gcd,grd->", delta, held, delta, optimize=True))
    return (noise / signal if signal > 0 else np.zeros(len(counts))).tolist()


def compensate_upstream(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, *, damp: float = 0.01) -> np.ndarray:
    """Return the dense ``W*`` that best maps the layer's actual inputs to its original outputs.

    With ``X'`` the inputs after upstream layers were pruned and ``X`` the original ones,
    ``gram = X'ᵀX'`` and ``cross = X'ᵀX`` (``[g, c, c]``), ``W*`` minimizes
    ``‖X'W*ᵀ − XWᵀ‖² + λ‖W* − W‖²`` with ``λ = damp·mean(diag X'ᵀX')``: a ridge pulled
    towards the original weight, not towards zero, so few calibration rows cannot drag it far.
    Since ``‖X'W'ᵀ − XWᵀ‖² = ‖X'(W' − W*)ᵀ‖² + const``, pruning ``W*`` under ``gram``
    (:func:`sparsegpt`) then also undoes the upstream error.
    """
    w = weight.astype(np.float64)
    h = gram.astype(np.float64).copy()
    cols = h.shape[-1]
    index = np.arange(cols)
    diag = h[:, index, index]
    ridge = damp * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    h[:, index, index] = diag + ridge
    rhs = np.matmul(cross.astype(np.float64), w.transpose(0, 2, 1)) + ridge[:, :, None] * w.transpose(0, 2, 1)
    return spd_solve(h, rhs).transpose(0, 2, 1).astype(np.float32)


@dataclass(frozen=True)
class ErrorCurve:
    """A layer's (weighted) output error at a few pruned-weight counts, starting at (0, 0)."""

    counts: np.ndarray
    errors: np.ndarray

    def hull(self) -> list[tuple[int, float]]:
        """Return the lower convex hull points, from (0, 0) rightwards."""
        points = sorted(zip(self.counts.tolist(), self.errors.tolist(), strict=True))
        hull: list[tuple[int, float]] = []
        for x, y in points:
            if hull and x == hull[-1][0]:
                continue
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                    hull.pop()
                else:
                    break
            hull.append((x, y))
        return hull


def allocate_counts(curves: Sequence[ErrorCurve], total: int) -> list[int]:
    """Return per-layer pruned counts summing to ``total`` at the least summed error.

    Segments of every layer's convex hull are taken cheapest-slope first; the last one
    partially, so the total is exact. Raises ValueError if ``total`` exceeds the curves.
    """
    segments = []
    for layer, curve in enumerate(curves):
        hull = curve.hull()
        for (x1, y1), (x2, y2) in itertools.pairwise(hull):
            segments.append(((y2 - y1) / (x2 - x1), layer, x2 - x1))
    if total > sum(s[2] for s in segments):
        raise ValueError("the total exceeds what the error curves cover")
    segments.sort(key=lambda s: (s[0], s[1]))
    counts = [0] * len(curves)
    remaining = total
    for _, layer, width in segments:
        if remaining <= 0:
            break
        take = min(width, remaining)
        counts[layer] += take
        remaining -= take
    return counts
