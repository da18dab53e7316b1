"""The math of structured channel pruning, on numpy arrays: removal order, errors, re-fit.

Removing input channel ``c`` of a linear consumer ``y = W x + b`` (a Conv, ConvTranspose
or MatMul reading a channel group) deletes the features ``F_c`` of ``x`` that channel
feeds (for a k×k Conv the ``k²`` im2col columns of that channel). With the consumer's
augmented second moment ``H = E[x̃ x̃ᵀ]`` over ``x̃ = [x, 1]`` the best re-fit of the kept
weights *and the bias* is least squares, ``W̃'_A = W̃ H_{:,A} H_{AA}⁻¹`` for the kept
features ``A`` (the constant feature is always kept, so a removed channel's mean is
folded into the bias). The error of removing a set ``F`` is the OBS group cost
``tr(W̃_F [H⁻¹]_FF⁻¹ W̃_Fᵀ)``, and after removing it ``W̃`` and ``H⁻¹`` are updated so the
next choice sees the re-fitted layer: :func:`removal_order` is greedy OBS over channels,
summing every consumer's error relative to its output energy ``tr(W̃ H W̃ᵀ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxopt.passes.common.linalg import spd_inverse, spd_solve

__all__ = ["ConsumerSystem", "independent_gram", "refit", "relative_error", "removal_order"]


def independent_gram(gram: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Return the second moment of independent features with the means and variances of ``gram``.

    ``diag(var) + mean meanᵀ``: no feature can stand in for another, so a re-fit on it only
    moves a removed feature's mean into the bias.
    """
    variance = np.maximum(np.diag(gram) - mean**2, 0.0)
    return np.diag(variance) + np.outer(mean, mean)


def _damped(h: np.ndarray, damp: float) -> np.ndarray:
    h = h.copy()
    diag = np.diag(h)[:-1]
    scale = damp * float(diag.mean()) if diag.size and diag.mean() > 0 else damp
    index = np.arange(h.shape[0] - 1)
    h[index, index] += scale
    # features that are always zero (dead channels) carry no information: pin them
    dead = diag <= 0
    h[index[dead], index[dead]] = max(scale, 1e-12)
    return h


@dataclass
class ConsumerSystem:
    """One consumer of a channel group: augmented weight ``[rows, features + 1]`` and ``H``.

    ``per_channel`` features belong to each input channel, channel-major (im2col order).
    ``offset``: the input channel where the pruned group's channels start (a consumer that
    reads several groups through a ``Concat``); channel indices given to :meth:`features`
    count from there.
    """

    weight: np.ndarray
    gram: np.ndarray
    per_channel: int
    offset: int = 0

    @property
    def channels(self) -> int:
        """Return the number of input channels."""
        return (self.weight.shape[1] - 1) // self.per_channel

    def features(self, channels: np.ndarray) -> np.ndarray:
        """Return the feature indices of ``channels``."""
        first = (np.asarray(channels)[:, None] + self.offset) * self.per_channel
        return (first + np.arange(self.per_channel)[None]).ravel()

    def signal(self) -> float:
        """Return the consumer's output energy ``tr(W̃ H W̃ᵀ)``."""
        return float(np.einsum("rf,fg,rg->", self.weight, self.gram, self.weight, optimize=True))


def refit(system: ConsumerSystem, keep: np.ndarray, *, damp: float = 1e-4) -> np.ndarray:
    """Return the re-fitted augmented weight ``[rows, kept features + 1]`` for kept channels ``keep``."""
    h = _damped(system.gram, damp)
    kept = np.concatenate([system.features(np.sort(keep)), [h.shape[0] - 1]])
    rhs = system.weight @ h[:, kept]
    return spd_solve(h[np.ix_(kept, kept)], rhs.T).T


def relative_error(system: ConsumerSystem, keep: np.ndarray, refitted: np.ndarray) -> float:
    """Return ``E‖W̃x̃ − W̃'x̃_A‖² / E‖W̃x̃‖²`` of a re-fit (undamped moments)."""
    kept = np.concatenate([system.features(np.sort(keep)), [system.gram.shape[0] - 1]])
    full = np.zeros_like(system.weight)
    full[:, kept] = refitted
    delta = system.weight - full
    noise = float(np.einsum("rf,fg,rg->", delta, system.gram, delta, optimize=True))
    signal = system.signal()
    return noise / signal if signal > 0 else 0.0


def removal_order(
    systems: list[ConsumerSystem], channels: int, *, steps: int = 64, damp: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Return the greedy OBS removal order of a group's channels and the error after each removal.

    All ``systems`` read the same ``channels``; a channel's cost is the sum over systems of
    its OBS cost relative to that system's output energy. Channels are removed about
    ``channels / steps`` at a time (lowest cost first), with ``W̃`` and ``H⁻¹`` updated after
    each batch. ``errors[j]`` is the summed relative error with the first ``j`` removed.
    """
    weights = [s.weight.astype(np.float64).copy() for s in systems]
    inverses = []
    for s in systems:
        inverses.append(spd_inverse(_damped(s.gram, damp)))
    signals = [max(s.signal(), 1e-30) for s in systems]
    alive = np.ones(channels, dtype=bool)
    order: list[int] = []
    errors = [0.0]
    batch = max(1, -(-channels // steps))
    while alive.sum() > 1:
        candidates = np.flatnonzero(alive)
        costs = np.zeros(candidates.size)
        for s, w, inverse, signal in zip(systems, weights, inverses, signals, strict=True):
            feats = s.features(candidates).reshape(candidates.size, s.per_channel)
            block = inverse[feats[:, :, None], feats[:, None, :]]  # [n, p, p]
            block_inv = spd_inverse(block)  # a principal block of an SPD inverse is SPD
            w_f = w[:, feats].transpose(1, 0, 2)  # [n, rows, p]
            costs += np.einsum("nrp,npq,nrq->n", w_f, block_inv, w_f) / signal
        take = candidates[np.argsort(costs, kind="stable")[: min(batch, candidates.size - 1)]]
        increase = 0.0
        for k, (s, w, inverse, signal) in enumerate(zip(systems, weights, inverses, signals, strict=True)):
            f = s.features(take)
            hff_inv = spd_inverse(inverse[np.ix_(f, f)])
            w_f = w[:, f]
            increase += float(np.einsum("rp,pq,rq->", w_f, hff_inv, w_f)) / signal
            weights[k] = w - w_f @ hff_inv @ inverse[f, :]
            inverses[k] = inverse - inverse[:, f] @ hff_inv @ inverse[f, :]
            weights[k][:, f] = 0.0
        # the batch's joint cost, spread evenly over its channels for the per-count curve
        base = errors[-1]
        for i, channel in enumerate(take):
            order.append(int(channel))
            errors.append(base + increase * (i + 1) / take.size)
        alive[take] = False
    order.extend(int(c) for c in np.flatnonzero(alive))
    errors.append(np.inf)
    return np.array(order), np.array(errors)
