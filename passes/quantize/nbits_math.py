"""Block-wise low-bit weight quantization: pure numpy math on ``[N, K]`` weight matrices.

A weight is seen as ``W[n, k]``: row ``n`` is one output feature, ``k`` the input feature
it reads (``K`` is the reduction axis of the MatMul). Blocks of ``block`` consecutive
``k`` in one row share a scale ``s`` and a zero point ``z``; the stored integers are
``q = clip(round(w / s) + z, 0, 2^bits - 1)`` and the kernel computes with
``(q - z) · s`` (``com.microsoft.MatMulNBits``; the symmetric form has no stored zero
point: ``z = 2^(bits-1)``). ``K`` is padded with zeros to a multiple of ``block``.

Methods (each returns a :class:`BlockQuant`):

* :func:`quantize_rtn`: round to nearest on min/max (asymmetric, zero included in the
  range) or on the signed absolute maximum (symmetric, the extreme value maps to
  ``-2^(bits-1)``), the ranges onnxruntime's own quantizer uses, so the integers match it;
* :func:`quantize_hqq`: calibration-free, the half-quadratic proximal solver of HQQ
  (Badri & Shaji, 2023) on the zero points (kept in float) of an ``l_p`` (p < 1) loss
  that ignores outliers;
* :func:`quantize_gptq`: GPTQ (Frantar et al., 2022) with block-wise scales: one input
  column at a time, the rounding error spread over the columns not yet rounded by the
  inverse-Hessian factor of ``H = E[x xᵀ]``; each block's scale and zero point are taken
  from the *updated* weights when the walk reaches the block;
* :func:`awq_search`: AWQ-style (Lin et al., 2023) per-input-channel scales
  ``s = rms(x)^α`` searched on ``α`` for the least output error ``tr(ΔW H ΔWᵀ)``; the
  weight is quantized as ``W·diag(s)`` and the input must be divided by ``s`` (folded into
  the producer by the rewrite);
* :func:`lowrank_correction`: a rank-``r`` ``U·V ≈ W - deq(Q)`` that minimizes the output
  error on the inputs behind ``H`` (SVD of the error whitened by ``chol(H)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from onnxopt.passes.common.linalg import inverse_factor

__all__ = [
    "BlockQuant",
    "awq_search",
    "lowrank_correction",
    "output_error",
    "pack_blocks",
    "pack_zero_points",
    "quantize_by_rows",
    "quantize_gptq",
    "quantize_hqq",
    "quantize_rtn",
]


@dataclass(frozen=True)
class BlockQuant:
    """A block-quantized ``[N, K]`` weight: integers ``[N, K_padded]``, scales and zero points ``[N, blocks]``."""

    integers: np.ndarray  # uint8, values in [0, 2^bits)
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # float32 [N, blocks]; integral unless float_zero_points
    bits: int
    block: int
    columns: int  # K before padding
    symmetric: bool = False
    float_zero_points: bool = False

    def dequantize(self) -> np.ndarray:
        """Return the float ``[N, K]`` weight the kernel computes with."""
        n, padded = self.integers.shape
        q = self.integers.reshape(n, -1, self.block).astype(np.float32)
        w = (q - self.zero_points[:, :, None]) * self.scales[:, :, None]
        return w.reshape(n, padded)[:, : self.columns]


def _pad(weight: np.ndarray, block: int) -> np.ndarray:
    """Return ``weight`` ``[N, K]`` zero-padded along K to a multiple of ``block`` (float64)."""
    pad = -weight.shape[1] % block
    w = weight.astype(np.float64)
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def _range_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, zero point) of each block ``[..., block]`` from its range, as onnxruntime computes them."""
    levels = (1 << bits) - 1
    if symmetric:
        high, low = blocks.max(axis=-1), blocks.min(axis=-1)
        signed = np.where(np.abs(high) > np.abs(low), high, low)
        scale = signed / -float(1 << (bits - 1))
        return scale, np.full(scale.shape, float(1 << (bits - 1)))
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (high - low) / levels
    safe = np.where(scale == 0, 1.0, scale)
    zero = np.where(scale == 0, float(1 << (bits - 1)), np.clip(np.round(-low / safe), 0, levels))
    return scale, zero


def _round(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Return ``clip(round(w / s) + z)`` per block (a zero scale rounds to the zero point)."""
    levels = (1 << bits) - 1
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.where(scale[..., None] == 0, zero[..., None], np.round(blocks / safe) + zero[..., None])
    return np.clip(q, 0, levels)


def quantize_rtn(weight: np.ndarray, bits: int, block: int, *, symmetric: bool = False) -> BlockQuant:
    """Round ``weight`` ``[N, K]`` to nearest on each block's range."""
    w = _pad(weight, block)
    blocks = w.reshape(w.shape[0], -1, block)
    scale, zero = _range_params(blocks, bits, symmetric)
    q = _round(blocks, scale, zero, bits)
    return BlockQuant(
        q.reshape(w.shape).astype(np.uint8),
        scale.astype(np.float32),
        zero.astype(np.float32),
        bits,
        block,
        weight.shape[1],
        symmetric,
    )


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Return the proximal operator of the ``l_p`` norm (generalized soft threshold)."""
    return np.sign(x) * np.maximum(np.abs(x) - (1.0 / beta) * np.power(np.abs(x) + 1e-8, p - 1), 0.0)


def quantize_hqq(
    weight: np.ndarray,
    bits: int,
    block: int,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> BlockQuant:
    """Quantize ``weight`` ``[N, K]`` without data: HQQ's solver on float zero points, min/max scales.

    Alternates ``W_e = shrink_p(W - deq(Q))`` (the outliers the grid may ignore) and the
    closed-form zero point ``z = mean(q - (W - W_e)/s)`` per block, with ``β`` growing by
    ``κ``, and keeps the iterate of least mean absolute error (as the reference does).
    """
    levels = (1 << bits) - 1
    w = _pad(weight, block)
    blocks = w.reshape(w.shape[0], -1, block)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    width = np.where(high - low == 0, 1.0, high - low)
    inv = levels / width  # HQQ works with the inverse scale: q = w·inv + z
    zero = np.round(-low * inv)
    best_zero, best_error = zero.copy(), np.full(zero.shape, np.inf)
    for _ in range(iters):
        q = np.clip(np.round(blocks * inv[..., None] + zero[..., None]), 0, levels)
        restored = (q - zero[..., None]) / inv[..., None]
        error = np.abs(blocks - restored).mean(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_zero = np.where(better, zero, best_zero)
        outliers = _shrink(blocks - restored, beta, p)
        zero = np.mean(q - (blocks - outliers) * inv[..., None], axis=-1)
        beta *= kappa
    scale = 1.0 / inv
    q = np.clip(np.round(blocks * inv[..., None] + best_zero[..., None]), 0, levels)
    return BlockQuant(
        q.reshape(w.shape).astype(np.uint8),
        scale.astype(np.float32),
        best_zero.astype(np.float32),
        bits,
        block,
        weight.shape[1],
        float_zero_points=True,
    )


def output_error(weight: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """Return ``tr(ΔW H ΔWᵀ)`` for ``[N, K]`` weights and ``H`` ``[K, K]``: the output error on those inputs."""
    delta = (weight - approx).astype(np.float64)
    return float(np.sum((delta @ gram) * delta))  # a BLAS product: einsum's three-way loop is ~100x slower


def quantize_gptq(
    weight: np.ndarray,
    gram: np.ndarray,
    bits: int,
    block: int,
    *,
    symmetric: bool = False,
    damp: float = 0.01,
    batch: int = 128,
) -> BlockQuant:
    """Quantize ``weight`` ``[N, K]`` by GPTQ on ``H = gram`` ``[K, K]`` with block-wise scales.

    Columns are walked in their natural order so every block's columns are consecutive;
    a block's scale and zero point are chosen (as :func:`quantize_rtn` would) from its
    weights as updated by the error of the blocks before it. Inputs that never vary
    (zero diagonal) are damped like the rest.
    """
    w = _pad(weight, block)
    n, cols = w.shape
    h = np.zeros((cols, cols))
    h[: gram.shape[0], : gram.shape[1]] = gram
    upper = inverse_factor(h[None], damp)[0]
    batch = max(block, batch // block * block)
    q = np.zeros_like(w)
    blocks = cols // block
    scales = np.zeros((n, blocks))
    zeros = np.zeros((n, blocks))
    levels = (1 << bits) - 1
    for start in range(0, cols, batch):
        end = min(start + batch, cols)
        w1 = w[:, start:end].copy()
        err1 = np.zeros_like(w1)
        h1 = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block == 0:
                b = column // block
                s, z = _range_params(w1[:, i : i + block], bits, symmetric)
                scales[:, b], zeros[:, b] = s, z
            b = column // block
            s, z = scales[:, b], zeros[:, b]
            safe = np.where(s == 0, 1.0, s)
            q_i = np.where(s == 0, z, np.clip(np.round(w1[:, i] / safe) + z, 0, levels))
            q[:, column] = q_i
            err = (w1[:, i] - (q_i - z) * s) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[None, i, i:]
            err1[:, i] = err
        w[:, end:] -= err1 @ upper[start:end, end:]
    return BlockQuant(
        q.astype(np.uint8),
        scales.astype(np.float32),
        zeros.astype(np.float32),
        bits,
        block,
        weight.shape[1],
        symmetric,
    )


def awq_search(
    weights: list[np.ndarray],
    grams: list[np.ndarray],
    rms: np.ndarray,
    bits: int,
    block: int,
    *,
    symmetric: bool = False,
    grid: int = 10,
) -> tuple[np.ndarray, float, float]:
    """Return (per-input-channel scales ``s`` [K], the chosen ``α``, error ratio to ``α = 0``).

    ``weights`` are the ``[N_i, K]`` weights of every layer reading the same input (they
    must share ``s``: the input is divided by it once), ``grams`` their ``H``, ``rms`` the
    input's per-channel RMS. Each ``α`` in ``0, 1/grid, …, 1`` is scored by the summed
    output error of RTN on ``W·diag(s)`` mapped back by ``1/s``.
    """
    safe = np.where(rms > 0, rms, rms[rms > 0].min() if (rms > 0).any() else 1.0)
    best = (np.ones(len(rms)), 0.0, np.inf)
    baseline = np.inf
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        s = safe**alpha
        s = s / np.sqrt(s.max() * s.min())
        total = 0.0
        for weight, gram in zip(weights, grams, strict=True):
            approx = quantize_rtn(weight * s[None, :], bits, block, symmetric=symmetric).dequantize() / s[None, :]
            total += output_error(weight, approx, gram)
        if alpha == 0.0:
            baseline = total
        if total < best[2]:
            best = (s, float(alpha), total)
    ratio = best[2] / baseline if baseline > 0 else 1.0
    return best[0].astype(np.float64), best[1], float(ratio)


def lowrank_correction(
    error: np.ndarray, gram: np.ndarray, rank: int, *, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``U`` [N, r], ``V`` [r, K] minimizing ``tr((E - UV) H (E - UV)ᵀ)`` for the error ``E`` [N, K].

    With ``H + λI = L Lᵀ`` the objective is ``‖(E - UV) L‖²``; the truncated SVD of ``E L``
    gives ``U = P_r Σ_r`` and ``V = Q_rᵀ L⁻¹``.
    """
    h = gram.astype(np.float64).copy()
    diag = np.diag(h).copy()
    h[np.diag_indices_from(h)] = np.where(diag > 0, diag, 1.0) + damp * max(float(diag.mean()), 1e-12)
    lower = scipy.linalg.cholesky(h, lower=True)
    left, sigma, right = np.linalg.svd(error.astype(np.float64) @ lower, full_matrices=False)
    u = left[:, :rank] * sigma[:rank]
    v = scipy.linalg.solve_triangular(lower, right[:rank].T, lower=True, trans="T").T
    return u.astype(np.float32), v.astype(np.float32)


def pack_blocks(quant: BlockQuant) -> np.ndarray:
    """Return the integers in MatMulNBits' B layout: uint8 ``[N, blocks, block·bits/8]``, low bits first."""
    n = quant.integers.shape[0]
    q = quant.integers.reshape(n, -1, quant.block)
    if quant.bits == 8:
        return np.ascontiguousarray(q)
    if quant.bits == 4:
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"bits must be 4 or 8, not {quant.bits}")


def pack_zero_points(quant: BlockQuant) -> np.ndarray:
    """Return integral zero points packed as MatMulNBits reads them: uint8 ``[N, ceil(blocks·bits/8)]``."""
    z = quant.zero_points.astype(np.uint8)
    if quant.bits == 8:
        return np.ascontiguousarray(z)
    if z.shape[1] % 2:  # the unused high nibble holds the default zero point, as onnxruntime writes it
        z = np.pad(z, ((0, 0), (0, 1)), constant_values=1 << (quant.bits - 1))
    return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


#: Elements of one row chunk when a weight is rounded piece by piece (RTN and HQQ treat
#: rows independently; each float64 temporary of a chunk stays near 32 MB).
_CHUNK_ELEMENTS = 4 << 20


def quantize_by_rows(quantize: Callable[[np.ndarray], BlockQuant], matrix: np.ndarray) -> BlockQuant:
    """Apply a row-independent rounding ``quantize`` to ``matrix`` in row chunks and join the parts.

    Bounds the temporaries to one chunk (a 262 MB embedding would otherwise need several
    float64 copies of itself at once) and reads a memory-mapped weight chunk by chunk.
    """
    rows = max(1, _CHUNK_ELEMENTS // max(matrix.shape[1], 1))
    if matrix.shape[0] <= rows:
        return quantize(np.ascontiguousarray(matrix))
    parts = [quantize(np.ascontiguousarray(matrix[i : i + rows])) for i in range(0, matrix.shape[0], rows)]
    return dataclasses.replace(
        parts[0],
        integers=np.concatenate([p.integers for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=np.concatenate([p.zero_points for p in parts]),
    )
