"""Calibration: streaming observers, the math that maps statistics to int8 parameters, a collector.

Statistics and parameters are kept apart (as in ``torch.ao.quantization``):

* an **observer** only accumulates statistics from numpy batches, one at a time:
  :class:`MinMaxObserver` (running or moving-average extremes) and
  :class:`HistogramObserver` (one streaming histogram that re-bins when the range grows,
  shared by the percentile, entropy and MSE methods). Non-finite values (attention masks
  use ``-inf``) are counted and otherwise ignored. Memory per tensor is a few numbers or
  one histogram, whatever the number of samples;
* **pure functions** map statistics to :class:`QuantParams`: :func:`affine_qparams`,
  :func:`symmetric_qparams`, :func:`weight_qparams` (per channel), the range choosers
  :func:`percentile_range`, :func:`entropy_range` and :func:`mse_range`, and the int32
  bias math :func:`quantize_bias` (scale ``s_input * s_weight``) with
  :func:`fit_weight_scale_to_bias` guarding the overflow a tiny weight scale causes;
* :func:`collect_statistics` runs onnxruntime over a :class:`~onnxopt.data.Dataset` one
  sample at a time, with intermediate tensors exposed in groups sized to a memory budget,
  and feeds each tensor's observer.

Conventions: ``QuantizeLinear`` rounds half to even and saturates, so
``q = clip(rint(x / scale) + zero_point, qmin, qmax)`` and ``x ≈ (q - zero_point) * scale``.
Every range is widened to include 0, so that 0 (padding, ReLU) is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from onnxopt.data import Dataset
from onnxopt.progress import Progress
from onnxopt.streaming import DEFAULT_MEMORY_BUDGET, stream_tensors

__all__ = [
    "METHODS",
    "HistogramObserver",
    "MinMaxObserver",
    "Observer",
    "QuantParams",
    "SaturatedObserver",
    "TensorHistogram",
    "affine_qparams",
    "choose_range",
    "collect_statistics",
    "dequantize",
    "dtype_limits",
    "entropy_range",
    "fit_weight_scale_to_bias",
    "make_observer",
    "mse_range",
    "percentile_range",
    "quantize",
    "quantize_bias",
    "symmetric_qparams",
    "weight_qparams",
]


#: Calibration methods: how an activation's range is chosen from its statistics.
METHODS = ("minmax", "percentile", "entropy", "mse")

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one quantized tensor (per tensor, or per channel on ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        """Return the integer type of the quantized values."""
        return self.zero_point.dtype

    @property
    def per_channel(self) -> bool:
        """Return True when there is one scale per channel."""
        return self.scale.ndim == 1


def dtype_limits(dtype: np.dtype | type, *, narrow: bool = False) -> tuple[int, int]:
    """Return (qmin, qmax) of an integer type; ``narrow`` drops the lowest signed value.

    Narrow (symmetric) int8 is [-127, 127]: the grid is symmetric around 0, which keeps
    per-channel weights unbiased and avoids the ``-128 * -128`` corner of int8 kernels.
    """
    info = np.iinfo(np.dtype(dtype))
    low = info.min + 1 if narrow and info.min < 0 else info.min
    return int(low), int(info.max)


def affine_qparams(low: float, high: float, dtype: np.dtype | type) -> QuantParams:
    """Return asymmetric per-tensor parameters covering [low, high] (widened to include 0).

    ``scale = (high - low) / (qmax - qmin)``; ``zero_point = rint(qmin - low / scale)``.
    A range of zero width (a constant-zero tensor) gets scale 1.
    """
    qmin, qmax = dtype_limits(dtype)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"cannot quantize a non-finite range [{low}, {high}]")
    width = high - low
    scale = width / (qmax - qmin) if width > 0 else 1.0
    scale = max(scale, float(np.finfo(np.float32).tiny))
    zero_point = int(np.clip(np.rint(qmin - low / scale), qmin, qmax))
    return QuantParams(np.array(scale, dtype=np.float32), np.array(zero_point, dtype=np.dtype(dtype)))


def symmetric_qparams(
    absmax: float | np.ndarray,
    dtype: np.dtype | type = np.int8,
    *,
    axis: int | None = None,
    levels: int | None = None,
) -> QuantParams:
    """Return symmetric parameters (zero point 0 for signed, mid-range for unsigned).

    ``scale = absmax / levels`` on the narrow signed grid (``levels`` 127 for int8 unless
    given: 64 puts weights on 7 bits); an all-zero channel gets scale 1. ``absmax`` may be
    an array (one value per channel on ``axis``).
    """
    dtype = np.dtype(dtype)
    qmin, qmax = dtype_limits(dtype, narrow=True)
    if levels is None:
        levels = (qmax - qmin) // 2
    amax = np.asarray(absmax, dtype=np.float64)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    zero = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    zero_point = np.full(scale.shape, zero, dtype=dtype)
    return QuantParams(scale, zero_point, axis if scale.ndim == 1 else None)


def weight_qparams(
    weight: np.ndarray, axis: int | None, dtype: np.dtype | type = np.int8, *, levels: int | None = None
) -> QuantParams:
    """Return symmetric parameters for a weight: one scale per slice along ``axis`` (or one)."""
    w = np.asarray(weight, dtype=np.float64)
    if axis is None:
        return symmetric_qparams(float(np.max(np.abs(w))) if w.size else 0.0, dtype, levels=levels)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.max(np.abs(w), axis=reduce) if w.size else np.zeros(w.shape[axis])
    return symmetric_qparams(absmax, dtype, axis=axis, levels=levels)


def _broadcast(values: np.ndarray, params: QuantParams, ndim: int) -> np.ndarray:
    if params.axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[params.axis % ndim] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize like ONNX ``QuantizeLinear``: round half to even, add zero point, saturate."""
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(params.scale, params, x.ndim)
    zero = _broadcast(params.zero_point.astype(np.int64), params, x.ndim)
    qmin, qmax = dtype_limits(params.dtype)
    q = np.rint(x.astype(np.float64) / scale) + zero
    return np.clip(q, qmin, qmax).astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """Dequantize like ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` as float32."""
    scale = _broadcast(params.scale, params, q.ndim)
    zero = _broadcast(params.zero_point.astype(np.int64), params, q.ndim)
    return ((q.astype(np.int64) - zero) * scale).astype(np.float32)


def fit_weight_scale_to_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """Return weight scales raised just enough that ``bias / (s_input * s_weight)`` fits int32.

    A channel whose weights are all tiny (or zero) gets a tiny weight scale; its bias,
    divided by ``s_input * s_weight``, would overflow int32. Raising that channel's weight
    scale costs nothing there (its weights still round to valid values) and keeps the
    bias exact to ``s_input * s_weight / 2``.
    """
    b = np.abs(np.asarray(bias, dtype=np.float64))
    ws = np.asarray(weight_scale, dtype=np.float64)
    needed = b / (float(input_scale) * INT32_MAX * 0.999)  # headroom for float32 rounding of the product
    return np.maximum(ws, needed).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (int32 bias, its scale ``s_input * s_weight``); zero point 0, rounded half to even.

    Call :func:`fit_weight_scale_to_bias` first; values that would still overflow raise.
    """
    scale = (np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)).astype(np.float32)
    q = np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    if q.size and np.max(np.abs(q)) > INT32_MAX:
        raise ValueError("bias overflows int32 at scale s_input * s_weight; raise the weight scale first")
    return q.astype(np.int32), scale


# --------------------------------------------------------------------------- observers


class Observer(Protocol):
    """Accumulates statistics of one tensor, one batch at a time."""

    nonfinite: int

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of values into the statistics."""

    def empty(self) -> bool:
        """Return True while no finite value has been seen."""


def _finite(values: np.ndarray) -> tuple[np.ndarray, int]:
    flat = np.asarray(values).reshape(-1)
    if flat.dtype != np.float32 and flat.dtype != np.float64:
        flat = flat.astype(np.float32)
    mask = np.isfinite(flat)
    if mask.all():
        return flat, 0
    return flat[mask], int(flat.size - np.count_nonzero(mask))


class _FiniteObserver:
    """What every observer does with a batch: count its non-finite values, fold the finite ones in."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0

    def update(self, values: np.ndarray) -> None:
        """Fold one batch in (non-finite values are counted and skipped)."""
        finite, bad = _finite(values)
        self.nonfinite += bad
        if finite.size:
            self._fold(finite, float(finite.min()), float(finite.max()))

    def _fold(self, finite: np.ndarray, low: float, high: float) -> None:
        """Fold in a batch's finite values, whose extremes are ``low`` and ``high``."""
        raise NotImplementedError


class MinMaxObserver(_FiniteObserver):
    """Running minimum and maximum, or their moving average (``averaging_constant``).

    With ``averaging_constant = c`` each batch moves the estimate by
    ``c * (batch_extreme - estimate)``, which damps rare outliers in long calibrations.
    """

    def __init__(self, averaging_constant: float | None = None) -> None:
        if averaging_constant is not None and not 0 < averaging_constant <= 1:
            raise ValueError("averaging_constant must be in (0, 1]")
        super().__init__()
        self.averaging_constant = averaging_constant
        self.batches = 0

    def _fold(self, finite: np.ndarray, low: float, high: float) -> None:
        if self.batches == 0 or self.averaging_constant is None:
            self.min, self.max = min(self.min, low), max(self.max, high)
        else:
            c = self.averaging_constant
            self.min += c * (low - self.min)
            self.max += c * (high - self.max)
        self.batches += 1

    def empty(self) -> bool:
        """Return True while no finite value has been seen."""
        return self.batches == 0


class SaturatedObserver:
    """Feeds ``inner`` the values clamped to ``[low, high]``: what the tensor's readers can tell apart.

    A tensor read only by saturating activations (``HardSwish`` is 0 for x <= -3, ``Relu``
    for x <= 0, ``HardSigmoid`` constant outside its ramp) needs no resolution beyond the
    bounds, so its range is chosen on the clamped values; on PP-OCR det the pointwise
    convolutions before HardSwish reach -95 while every value below -3 reads as 0.
    """

    def __init__(self, inner: Observer, low: float | None, high: float | None) -> None:
        self.inner = inner
        self.low = -math.inf if low is None else float(low)
        self.high = math.inf if high is None else float(high)

    @property
    def nonfinite(self) -> int:
        """Return the non-finite values the inner observer counted."""
        return self.inner.nonfinite

    def update(self, values: np.ndarray) -> None:
        """Fold one batch in, clamped to the bounds (non-finite values pass through to be counted)."""
        array = np.asarray(values)
        finite = np.isfinite(array)
        clamped = np.clip(array, self.low, self.high)
        self.inner.update(clamped if finite.all() else np.where(finite, clamped, array))

    def empty(self) -> bool:
        """Return True while no finite value has been seen."""
        return self.inner.empty()


@dataclass(frozen=True)
class TensorHistogram:
    """Counts of values in ``bins`` equal bins over [low, high], with the exact extremes."""

    counts: np.ndarray
    low: float
    high: float
    min: float
    max: float

    @property
    def edges(self) -> np.ndarray:
        """Return the bin edges."""
        return np.linspace(self.low, self.high, len(self.counts) + 1)


def _rebin(counts: np.ndarray, old_low: float, old_high: float, new_low: float, new_high: float) -> np.ndarray:
    """Spread histogram counts onto a wider range, each old bin's mass uniform within it."""
    bins = len(counts)
    old_edges = np.linspace(old_low, old_high, bins + 1)
    cdf = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    new_edges = np.linspace(new_low, new_high, bins + 1)
    return np.diff(np.interp(new_edges, old_edges, cdf))


class HistogramObserver(_FiniteObserver):
    """A streaming histogram of a tensor's values with a fixed number of bins.

    The first batch sets the range; a later batch outside it widens the range (with a
    little headroom, so a slowly growing range does not re-bin on every batch) and
    the counts so far are re-binned, each old bin's mass spread uniformly. Memory is
    ``bins`` floats whatever the number of samples.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        super().__init__()
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.low = 0.0
        self.high = 0.0

    def _fold(self, finite: np.ndarray, low: float, high: float) -> None:
        if self.empty():
            self.low, self.high = low, high if high > low else low + max(abs(low), 1.0) * 1e-6
        elif low < self.low or high > self.high:
            span = max(self.high, high) - min(self.low, low)
            new_low = min(self.low, low - 0.1 * span) if low < self.low else self.low
            new_high = max(self.high, high + 0.1 * span) if high > self.high else self.high
            self.counts = _rebin(self.counts, self.low, self.high, new_low, new_high)
            self.low, self.high = new_low, new_high
        self.min, self.max = min(self.min, low), max(self.max, high)
        width = (self.high - self.low) / self.bins
        index = ((finite.astype(np.float64) - self.low) / width).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def empty(self) -> bool:
        """Return True while no finite value has been seen."""
        return not math.isfinite(self.min)

    def histogram(self) -> TensorHistogram:
        """Return the statistics gathered so far."""
        return TensorHistogram(self.counts.copy(), self.low, self.high, self.min, self.max)


def make_observer(method: str, *, averaging_constant: float | None = None, bins: int = 2048) -> Observer:
    """Return a fresh observer suited to calibration ``method``."""
    if method == "minmax":
        return MinMaxObserver(averaging_constant)
    if method in METHODS:
        return HistogramObserver(bins)
    raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------- range choice


def _cdf_at(hist: TensorHistogram, points: np.ndarray) -> np.ndarray:
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts)])
    return np.interp(points, hist.edges, cdf)


def percentile_range(hist: TensorHistogram, percentile: float = 99.999) -> tuple[float, float]:
    """Return the range holding ``percentile`` % of the values, clipping both tails equally."""
    if not 50 < percentile <= 100:
        raise ValueError("percentile must be in (50, 100]")
    total = hist.counts.sum()
    if total <= 0:
        return 0.0, 0.0
    tail = (100.0 - percentile) / 100.0 * total
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts)])
    edges = hist.edges
    low = float(np.interp(tail, cdf, edges)) if tail > 0 else hist.min
    high = float(np.interp(total - tail, cdf, edges)) if tail > 0 else hist.max
    return max(low, hist.min), min(high, hist.max)


def _candidates(hist: TensorHistogram, count: int) -> np.ndarray:
    """Return clipping fractions in (0, 1]: the share of the observed extremes kept."""
    return np.linspace(1.0 / count, 1.0, count)


def _expected_error(hist: TensorHistogram, low: float, high: float, dtype: np.dtype) -> float:
    """Return the expected squared quantization error of the histogram clipped to [low, high]."""
    params = affine_qparams(low, high, dtype)
    qmin, qmax = dtype_limits(dtype)
    scale = float(params.scale)
    zero = float(params.zero_point)
    lo_clip, hi_clip = (qmin - zero) * scale, (qmax - zero) * scale
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    inside = (centers >= lo_clip) & (centers <= hi_clip)
    clipped = np.where(centers < lo_clip, lo_clip - centers, centers - hi_clip)
    rounding = scale * scale / 12.0
    return float(np.sum(hist.counts * np.where(inside, rounding, clipped * clipped + rounding)))


def mse_range(hist: TensorHistogram, dtype: np.dtype | type = np.uint8, candidates: int = 100) -> tuple[float, float]:
    """Return the clipping range that minimizes the expected squared quantization error.

    The upper end is searched first (the lower kept at the observed minimum), then the
    lower end; each candidate keeps a fraction ``k / candidates`` of the observed extreme.
    The error of a range is rounding noise (``scale**2 / 12`` per value) plus the squared
    clipping of values beyond it, computed from the histogram.
    """
    if hist.counts.sum() <= 0:
        return 0.0, 0.0
    dtype = np.dtype(dtype)
    low, high = min(hist.min, 0.0), max(hist.max, 0.0)
    fractions = _candidates(hist, candidates)
    if high > 0:
        high = min((high * float(f) for f in fractions), key=lambda h: _expected_error(hist, low, h, dtype))
    if low < 0:
        low = min((low * float(f) for f in fractions), key=lambda lo: _expected_error(hist, lo, high, dtype))
    return low, high


def _magnitude_histogram(hist: TensorHistogram, bins: int) -> tuple[np.ndarray, float]:
    """Return the histogram of |x| over [0, max|x|] in ``bins`` bins, from the signed one."""
    top = max(abs(hist.min), abs(hist.max))
    edges = np.linspace(0.0, top, bins + 1)
    cdf_abs = _cdf_at(hist, edges) - _cdf_at(hist, -edges)
    cdf_abs[0] = 0.0
    return np.maximum(np.diff(cdf_abs), 0.0), top


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = reference / reference.sum()
    q = candidate / candidate.sum()
    mask = p > 0
    q_safe = np.where(q > 0, q, 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_safe[mask])))


def entropy_range(
    hist: TensorHistogram, dtype: np.dtype | type = np.uint8, *, bins: int = 2048, stride: int = 16
) -> tuple[float, float]:
    """Return the range whose quantization loses the least information (KL divergence).

    The classic TensorRT search on the magnitude histogram: for each threshold ``t``, the
    distribution P of |x| clipped at ``t`` (outliers added to the last bin) is compared
    with Q, P merged into as many levels as the grid has on that side and expanded back.
    A tensor with negative values gets half the levels per side.
    """
    if hist.counts.sum() <= 0:
        return 0.0, 0.0
    qmin, qmax = dtype_limits(dtype)
    signed = hist.min < 0 and hist.max > 0
    levels = (qmax - qmin + 1) // 2 if signed else qmax - qmin + 1
    magnitude, top = _magnitude_histogram(hist, bins)
    if top <= 0:
        return 0.0, 0.0
    best_threshold, best_kl = bins, math.inf
    for stop in range(max(levels, stride), bins + 1, stride):
        reference = magnitude[:stop].copy()
        reference[-1] += magnitude[stop:].sum()
        if reference.sum() <= 0:
            continue
        groups = np.array_split(np.arange(stop), levels)
        candidate = np.zeros(stop)
        for group in groups:
            if group.size == 0:
                continue
            chunk = magnitude[group]
            used = chunk > 0
            if used.any():
                candidate[group[used]] = chunk.sum() / used.sum()
        kl = _kl_divergence(reference, candidate)
        if kl < best_kl:
            best_threshold, best_kl = stop, kl
    threshold = top * best_threshold / bins
    return max(hist.min, -threshold), min(hist.max, threshold)


def choose_range(
    observer: Observer, method: str, dtype: np.dtype | type, *, percentile: float = 99.999
) -> tuple[float, float]:
    """Return the calibrated (low, high) of a tensor from its observer under ``method``."""
    while isinstance(observer, SaturatedObserver):
        observer = observer.inner
    if isinstance(observer, MinMaxObserver):
        return observer.min, observer.max
    if not isinstance(observer, HistogramObserver):
        raise TypeError(f"no range rule for {type(observer).__name__}")
    hist = observer.histogram()
    if method == "percentile":
        return percentile_range(hist, percentile)
    if method == "entropy":
        return entropy_range(hist, dtype)
    if method == "mse":
        return mse_range(hist, dtype)
    return hist.min, hist.max


# --------------------------------------------------------------------------- collector


def collect_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Dataset,
    observer: Callable[[str], Observer],
    *,
    progress: Progress | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, Observer]:
    """Run ``model`` over ``data`` and return an observer per tensor, fed one sample at a time.

    The tensors stream through :func:`onnxopt.streaming.stream_tensors` in groups whose
    estimated size for one sample stays under ``memory_budget`` bytes: memory is one
    sample's activations of one group plus the observers' statistics, never samples ×
    tensors. ``observer(name)`` makes each observer.
    """
    observers = {name: observer(name) for name in tensors}

    def feed(values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            observers[name].update(value)

    stream_tensors(model, list(tensors), list(data), feed, progress=progress, memory_budget=memory_budget)
    return observers
