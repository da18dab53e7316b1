"""Linear algebra on calibration statistics that more than one pass family uses.

Pure functions of numpy arrays: the second moment of inputs augmented by a constant 1
(a bias as one more input), and the inverse-Hessian factor that SparseGPT pruning and
GPTQ rounding both walk column by column.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augmented_gram", "inverse_factor"]


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
    h_inv = np.linalg.inv(h)
    h_inv = (h_inv + h_inv.transpose(0, 2, 1)) / 2
    return np.linalg.cholesky(h_inv).transpose(0, 2, 1)
