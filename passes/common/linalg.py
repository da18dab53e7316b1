"""Linear algebra on calibration statistics that more than one pass family uses.

Pure functions of numpy arrays: the second moment of inputs augmented by a constant 1
(a bias as one more input), the inverse-Hessian factor that SparseGPT pruning and GPTQ
rounding both walk column by column, and the inverse and solves of the symmetric
positive-definite (damped) moments, by Cholesky (``scipy.linalg``) rather than by general
LU inverses: half the work, and a matrix that is not positive definite fails loudly
instead of giving a meaningless factor.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["augmented_gram", "inverse_factor", "spd_inverse", "spd_solve"]


def spd_inverse(h: np.ndarray) -> np.ndarray:
    """Return the inverse of symmetric positive-definite ``h`` (batched over leading axes), symmetrized."""
    eye = np.broadcast_to(np.eye(h.shape[-1]), h.shape)
    inverse = scipy.linalg.solve(h, eye, assume_a="pos")
    return (inverse + np.swapaxes(inverse, -1, -2)) / 2


def spd_solve(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Return ``h⁻¹ · rhs`` for symmetric positive-definite ``h`` (batched over leading axes)."""
    return scipy.linalg.solve(h, rhs, assume_a="pos")


def augmented_gram(gram: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Return ``E[x̃ x̃ᵀ]`` for ``x̃ = [x, 1]`` from ``E[x xᵀ]`` and ``E[x]``."""
    features = gram.shape[0]
    h = np.empty((features + 1, features + 1))
    h[:features, :features] = gram
    h[:features, -1] = h[-1, :features] = mean
    h[-1, -1] = 1.0
    return h


def inverse_factor(gram: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Return the upper Cholesky factor ``U`` of ``(XᵀX + λI)⁻¹ = UᵀU`` per group, ``λ = damp·mean(diag)``.

    It depends on the statistics and the damping only, so it can be computed once and
    shared by every :func:`sparsegpt` call on the same layer (different counts).
    """
    h = gram.astype(np.float64).copy()
    index = np.arange(h.shape[-1])
    diag = h[:, index, index]
    diag[diag <= 0] = 1.0  # inputs that are always zero: any weight there is harmless
    h[:, index, index] = diag + damp * diag.mean(axis=1, keepdims=True)
    return scipy.linalg.cholesky(spd_inverse(h), lower=False)
