"""The arithmetic of the fusions, on numpy arrays only (private to ``onnxopt.passes``).

BatchNormalization computes ``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
After a layer ``x = W * u + b`` that is linear per output channel, the pair is the
layer with ``W' = W * s`` (scaled along the output-channel axis) and
``b' = (b - mean) * s + beta``. A per-channel ``Mul(c)`` is the same with ``s = c`` and no
shift; an ``Add(c)`` only shifts the bias. Arithmetic is done in float64 and cast back.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batchnorm_affine", "channel_vector", "scale_output_channels", "shift_bias"]


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, shift) with BN(x) == x * scale + shift, in float64."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, layout: str, group: int = 1) -> np.ndarray:
    """Return ``weight`` with output channel ``k`` multiplied by ``scale[k]``.

    ``layout``: ``"conv"`` ([Cout, Cin/g, ...]), ``"conv_transpose"`` ([Cin, Cout/g, ...]),
    ``"kn"`` (MatMul/Gemm B as [K, N]) or ``"nk"`` (Gemm B with transB, [N, K]).
    """
    w = weight.astype(np.float64)
    if layout == "conv":
        result = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif layout == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w.reshape((group, cin // group, cout_g, *w.shape[2:]))
        factors = scale.reshape((group, 1, cout_g, *(1,) * (w.ndim - 2)))
        result = (grouped * factors).reshape(w.shape)
    elif layout == "kn":
        result = w * scale.reshape(1, -1)
    elif layout == "nk":
        result = w * scale.reshape(-1, 1)
    else:
        raise ValueError(f"unknown weight layout {layout!r}")
    return result.astype(weight.dtype)


def shift_bias(
    bias: np.ndarray | None, scale: np.ndarray | None, shift: np.ndarray | None, channels: int, dtype: np.dtype
) -> np.ndarray:
    """Return ``bias * scale + shift`` as a [channels] vector (a missing bias is zero)."""
    b = np.zeros(channels) if bias is None else np.broadcast_to(bias.astype(np.float64), (channels,))
    if scale is not None:
        b = b * scale
    if shift is not None:
        b = b + shift
    return np.ascontiguousarray(b).astype(dtype)


def channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """Return ``value`` as a [channels] vector if it broadcasts per channel (axis 1) of a rank-``rank`` tensor.

    A scalar or a shape like [C,1,1] or [1,C,1,1] qualifies; anything that varies along
    another axis, or would broaden the result, returns None.
    """
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()
