"""The math of low-rank splitting, on numpy arrays: factorizations, ranks and allocation.

A layer computes ``y = x·W`` with ``W`` of shape ``k×n``. It is replaced by ``(x·A)·B``
with ``A = W·V_r`` (``k×r``) and ``B = V_rᵀ`` (``r×n``), where ``V_r`` holds ``r``
orthonormal directions of the output space:

* plain truncated SVD: ``V`` are the right singular vectors of ``W`` (minimizes
  ``‖W − AB‖``);
* activation-aware ("whitened") SVD: ``V`` are the top eigenvectors of
  ``Wᵀ·G·W`` with ``G = XᵀX`` the second moment of the layer's calibration inputs. As
  ``‖X(W − W')‖² = ‖Lᵀ(W − W')‖²`` for ``G = LLᵀ``, the best rank-``r`` ``W'`` is the
  truncated SVD of ``LᵀW`` mapped back, which equals ``W·V_r·V_rᵀ``; no inverse of the
  Cholesky factor is needed, so an ill-conditioned ``G`` is harmless. The relative
  error of the layer output is exactly the discarded fraction of the eigenvalues.
  Equivalently (SVD-LLM) ``B`` is the least-squares solution of ``min ‖X·A·B − X·W‖``
  for that ``A``, so a closed-form update of ``B`` after truncation changes nothing.

``G`` is estimated from a few hundred calibration rows, fewer than the features of a
wide layer, so the split overfits it: on a sentence encoder the held-out output error
was 4–20× the calibration one. ``G`` is therefore shrunk towards its diagonal (which
keeps each feature's scale, outlier features included, and drops unseen correlations)
by as much as its off-diagonal entries are noise (:func:`shrinkage_intensity`, the
Schäfer–Strimmer estimate with the calibration sample as the independent unit), and
ranks are allocated on *cross-validated* error curves (:func:`held_out_error`: factors
from one half of the calibration data, error measured with the other's ``G``).

The factors save parameters and multiply-adds per row only when ``r·(k+n) < k·n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from onnxopt.passes.common.stats import GramSpread

__all__ = [
    "SHRINKAGE",
    "Factorization",
    "RankCandidate",
    "WidthCandidate",
    "allocate_ranks",
    "factorize",
    "held_out_error",
    "max_rank",
    "rank_for_energy",
    "shrink_gram",
    "shrinkage_intensity",
    "split_factors",
]


@dataclass(frozen=True)
class Factorization:
    """Output directions of one weight, best first, and the energy each carries."""

    basis: np.ndarray
    energy: np.ndarray
    whitened: bool

    @property
    def relative_error(self) -> np.ndarray:
        """Return, for ranks 0..m, the fraction of output energy lost (``[m + 1]``)."""
        total = float(self.energy.sum())
        if total <= 0:
            return np.zeros(len(self.energy) + 1)
        kept = np.concatenate([[0.0], np.cumsum(self.energy)])
        return np.clip(1.0 - kept / total, 0.0, 1.0)


#: Weight of the diagonal in :func:`shrink_gram` where :func:`shrinkage_intensity` has too
#: few samples to estimate one (fewer than two).
SHRINKAGE = 0.3


def shrinkage_intensity(gram: np.ndarray, rows: int, spread: GramSpread | None, group: int = 0) -> float:
    """Return how far to shrink ``G = gram / rows`` towards its diagonal: the noise share of its off-diagonal.

    The Schäfer–Strimmer (2005) estimate for a diagonal target, ``λ = Σ_{i≠j} Var(G_ij) /
    Σ_{i≠j} G_ij²`` clipped to [0, 1], where ``Var(G_ij)`` is the sampling variance of the
    entry with the *sample* as the unit (from ``spread``; rows within a sample are not
    independent). It needs no tuning: many samples whose products agree give λ near 0 (a
    recognizer's 32 lines × 40 positions: 0.01), few samples of wide layers more (an
    encoder's 32 sentences: 0.02–0.7 by layer). Without two samples, :data:`SHRINKAGE`.
    """
    if spread is None or spread.samples < 2 or rows <= 0:
        return SHRINKAGE
    total = np.asarray(gram[group], dtype=np.float64)
    mean = total / rows
    off_mean = float(np.sum(mean**2) - np.sum(np.diag(mean) ** 2))
    if off_mean <= 0:
        return SHRINKAGE
    weighted = spread.weighted[group]
    cross = float(np.sum(weighted * mean) - np.sum(np.diag(weighted) * np.diag(mean)))
    # Σ_k Σ_{i≠j} (G_k − r_k·mean)² expanded over the accumulated sums
    deviations = float(spread.off_squares[group]) - 2.0 * cross + spread.rows_squared * off_mean
    n = spread.samples
    variance = max(deviations, 0.0) * n / (n - 1) / rows**2
    return float(np.clip(variance / off_mean, 0.0, 1.0))


def shrink_gram(gram: np.ndarray, shrinkage: float = SHRINKAGE) -> np.ndarray:
    """Return ``(1 − s)·G + s·diag(G)`` plus a tiny ridge, the regularized second moment.

    With fewer calibration rows than input features ``XᵀX`` is rank-deficient and its
    off-diagonal part is noisy; the ridge (``1e-6·mean(diag)``) keeps directions never
    seen from being thrown away for free.
    """
    gram = np.asarray(gram, dtype=np.float64)
    diagonal = np.diag(np.diag(gram))
    ridge = 1e-6 * float(np.mean(np.diag(gram))) * np.eye(len(gram))
    return (1.0 - shrinkage) * gram + shrinkage * diagonal + ridge


def factorize(weight: np.ndarray, gram: np.ndarray | None = None, shrinkage: float = 0.0) -> Factorization:
    """Return the output directions of ``weight`` (``k×n``), whitened by ``gram`` (``k×k``) if given.

    ``gram`` is first regularized by :func:`shrink_gram` with ``shrinkage``.
    """
    w = np.asarray(weight, dtype=np.float64)
    if gram is None:
        _, singular, vt = np.linalg.svd(w, full_matrices=False)
        return Factorization(vt.T, singular**2, whitened=False)
    gram = shrink_gram(gram, shrinkage)
    moment = w.T @ gram @ w
    moment = (moment + moment.T) / 2
    values, vectors = scipy.linalg.eigh(moment)
    order = np.argsort(values)[::-1][: min(w.shape)]
    return Factorization(vectors[:, order], np.clip(values[order], 0.0, None), whitened=True)


def held_out_error(weight: np.ndarray, factorization: Factorization, gram: np.ndarray) -> np.ndarray:
    """Return, for ranks 0..m, the relative output error of the split on inputs with second moment ``gram``.

    With ``M = Wᵀ·G·W`` and the split's orthonormal basis ``V``, the error at rank ``r``
    is ``1 − Σ_{i≤r} v_iᵀ·M·v_i / tr(M)`` (the basis spans the row space of ``W``).
    """
    w = np.asarray(weight, dtype=np.float64)
    moment = w.T @ np.asarray(gram, dtype=np.float64) @ w
    total = float(np.trace(moment))
    if total <= 0:
        return np.zeros(factorization.basis.shape[1] + 1)
    basis = factorization.basis
    captured = np.sum(basis * (moment @ basis), axis=0)  # v_jᵀ·M·v_j by BLAS (3-operand einsum: 20x slower)
    kept = np.concatenate([[0.0], np.cumsum(captured)])
    return np.clip(1.0 - kept / total, 0.0, 1.0)


def split_factors(weight: np.ndarray, factorization: Factorization, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``A`` (``k×rank``) and ``B`` (``rank×n``) with ``A·B`` the rank-``rank`` approximation.

    The columns of ``A`` and rows of ``B`` are balanced to equal norms, which keeps both
    factors in similar ranges (friendlier to a later int8 pass).
    """
    basis = factorization.basis[:, :rank]
    a = np.asarray(weight, dtype=np.float64) @ basis
    b = basis.T.copy()
    scale = np.sqrt(np.maximum(np.linalg.norm(a, axis=0), 1e-30))
    return (a / scale).astype(np.float32), (b * scale[:, None]).astype(np.float32)


def max_rank(k: int, n: int, min_saving: float = 0.0) -> int:
    """Return the largest rank whose factors keep at most ``1 - min_saving`` of ``k·n`` parameters."""
    limit = (1.0 - min_saving) * k * n / (k + n)
    rank = math.ceil(limit) - 1 if limit == int(limit) else math.floor(limit)
    return max(0, min(rank, min(k, n)))


def rank_for_energy(energy: np.ndarray, fraction: float) -> int:
    """Return the smallest rank keeping at least ``fraction`` of the total energy (Σσ²)."""
    total = float(np.sum(energy))
    if total <= 0:
        return 1
    kept = np.cumsum(energy) / total
    return min(len(energy), int(np.searchsorted(kept, fraction - 1e-12)) + 1)


@dataclass(frozen=True)
class RankCandidate:
    """One splittable layer for allocation: its error curve and shape."""

    relative_error: np.ndarray
    k: int
    n: int
    limit: int
    weight: float = 1.0

    def params(self, rank: int) -> int:
        """Return the parameters kept at ``rank`` (0 means dense)."""
        return self.k * self.n if rank == 0 else rank * (self.k + self.n)


@dataclass(frozen=True)
class WidthCandidate:
    """One group of projections narrowed in place (attention heads) for allocation.

    ``rank`` is the width kept (0 = unchanged); the parameters scale linearly with it.
    """

    relative_error: np.ndarray
    per_rank: int
    full: int
    limit: int
    weight: float = 1.0

    def params(self, rank: int) -> int:
        """Return the parameters kept at ``rank`` (0 means unchanged)."""
        return self.full if rank == 0 else rank * self.per_rank


def allocate_ranks(candidates: Sequence[RankCandidate | WidthCandidate], price: float) -> list[int]:
    """Return a rank per layer (0 = keep dense) minimizing ``weight·error + price·params/total``.

    A larger ``price`` of parameters gives smaller ranks and more error; each layer
    decides alone, which is the Lagrangian relaxation of "fewest parameters for a total
    error". Monotone in ``price``.
    """
    total = sum(c.params(0) for c in candidates) or 1
    ranks = []
    for c in candidates:
        if c.limit < 1:
            ranks.append(0)
            continue
        r = np.arange(1, c.limit + 1)
        cost = c.weight * c.relative_error[r] + price * np.array([c.params(int(i)) for i in r]) / total
        best = int(np.argmin(cost))
        dense_cost = price * c.params(0) / total
        ranks.append(int(r[best]) if cost[best] < dense_cost else 0)
    return ranks
