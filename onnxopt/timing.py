"""Latency of models relative to each other, measured in interleaved rounds: the one timer.

A shared machine's load drifts by tens of percent within a minute, so two models timed
one after the other are not comparable. Every round runs each model once, back to back
(:func:`interleaved_times`), and figures are per-round ratios to a baseline, which cancel
slow drifts. Two summaries of the same rounds serve two questions:

* :func:`interleaved_ratios` (``tune``, the benchmarks): the median ratio and its noise
  (half the interquartile range), with the standard error of the median;
* :func:`slowdown` (the int8 pass's "not slower" check): the median ratio and a
  distribution-free 95 % interval (the sign test's order statistics), so a candidate is
  called slower only when the whole interval is.

A round may time a fast model over at least ``min_round_seconds`` (several runs,
averaged), so one preempted run of a 2 ms model does not decide a round; and rounds go on
until at least ``min_seconds`` have passed (15 rounds of a 25 us model decided int8 vs
float on noise). Sessions run at onnxruntime's default optimization level with a fixed
number of intra-op threads, built without the model's ``value_info`` (as the pipeline
writes a model whose input had none: onnxruntime's shape-dependent fusions differ with it).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.runtime import Session

__all__ = [
    "MIN_ROUNDS",
    "Latency",
    "Slowdown",
    "interleaved_ratios",
    "interleaved_times",
    "ratio_summary",
    "slowdown",
    "timing_session",
]

#: Fewer rounds than this do not give a median worth reporting.
MIN_ROUNDS = 3

Timed = onnx.ModelProto | str | Path


@dataclass(frozen=True)
class Latency:
    """One model's latency against the baseline: median per-round ratio, its noise, medians in seconds."""

    ratio: float
    noise: float
    seconds: float
    baseline_seconds: float
    rounds: int

    @property
    def error(self) -> float:
        """Return the standard error of the median ratio (from the IQR, as for a normal spread)."""
        if self.rounds < 2:
            return self.noise
        return 1.858 * self.noise / math.sqrt(self.rounds)

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-ready dictionary."""
        return {
            "ratio": round(self.ratio, 4),
            "noise": round(self.noise, 4),
            "seconds": self.seconds,
            "baseline_seconds": self.baseline_seconds,
            "rounds": self.rounds,
            "error": round(self.error, 4),
        }


@dataclass(frozen=True)
class Slowdown:
    """A candidate's time over a reference's: the median per-round ratio and its 95 % interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    def slower(self, tolerance: float) -> bool:
        """Return True when the candidate is slower beyond ``tolerance`` and beyond the noise."""
        return self.low > tolerance

    def describe(self) -> str:
        """Return e.g. ``1.05x [0.97, 1.12] over 40 rounds``."""
        return f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}] over {self.rounds} rounds"


@contextlib.contextmanager
def timing_session(model: Timed, *, threads: int | None = 1, optimization: str = "default") -> Iterator[Session]:
    """Yield a CPU session (onnxruntime's default optimization level unless told), built without ``value_info``."""
    saved = list(model.graph.value_info) if isinstance(model, onnx.ModelProto) else []
    if saved:
        del model.graph.value_info[:]  # type: ignore[union-attr]
    try:
        session = Session(model, optimization=optimization, threads=threads, label="model under timing")
    finally:
        if saved:
            model.graph.value_info.extend(saved)  # type: ignore[union-attr]
    try:
        yield session
    finally:
        session.close()


def interleaved_times(
    models: Sequence[Timed],
    sample: Sample,
    *,
    threads: int | None = 1,
    rounds: int = 20,
    warmup: int = 2,
    min_seconds: float = 0.0,
    budget_seconds: float | None = None,
    deadline: float | None = None,
    min_round_seconds: float = 0.0,
    min_rounds: int = MIN_ROUNDS,
    optimization: str = "default",
) -> list[list[float]]:
    """Return each model's seconds per run in every round; round ``i`` of all models ran back to back.

    At least ``rounds`` rounds and as many more as fill ``min_seconds``; the rounds stop
    early (never before ``min_rounds``) after ``budget_seconds`` or at ``deadline`` (a
    :func:`time.monotonic` value), so a tight budget still yields a figure. A round runs
    each model as often as the first model needs to fill ``min_round_seconds`` and
    records the mean.
    """
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(timing_session(m, threads=threads, optimization=optimization)) for m in models]
        single = math.inf
        for session in sessions:  # warm up: allocations, thread pools
            for _ in range(max(warmup, 1)):
                started = time.perf_counter()
                session.run(sample)
                if session is sessions[0]:
                    single = min(single, time.perf_counter() - started)
        repeats = max(1, math.ceil(min_round_seconds / max(single, 1e-6))) if min_round_seconds else 1
        times: list[list[float]] = [[] for _ in sessions]
        started = time.monotonic()
        stop = deadline if budget_seconds is None else started + budget_seconds
        while len(times[0]) < rounds or time.monotonic() - started < min_seconds:
            if stop is not None and len(times[0]) >= min_rounds and time.monotonic() > stop:
                break
            for i, session in enumerate(sessions):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    session.run(sample)
                times[i].append((time.perf_counter() - t0) / repeats)
        return times


def ratio_summary(ratios: Sequence[float]) -> tuple[float, float]:
    """Return (median, half the interquartile range) of per-round ratios."""
    if not ratios:
        raise ValueError("no rounds to summarize")
    if len(ratios) < 4:
        return statistics.median(ratios), (max(ratios) - min(ratios)) / 2
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (q3 - q1) / 2


def interleaved_ratios(
    baseline: Timed,
    candidates: Sequence[Timed],
    sample: Sample,
    *,
    threads: int = 1,
    rounds: int = 20,
    warmup: int = 2,
    deadline: float | None = None,
    min_round_seconds: float = 0.02,
) -> list[Latency]:
    """Time ``candidates`` against ``baseline`` in interleaved rounds; one :class:`Latency` each."""
    times = interleaved_times(
        [baseline, *candidates],
        sample,
        threads=threads,
        rounds=rounds,
        warmup=warmup,
        deadline=deadline,
        min_round_seconds=min_round_seconds,
    )
    base = times[0]
    results = []
    for own in times[1:]:
        median, noise = ratio_summary([c / b for c, b in zip(own, base, strict=True)])
        results.append(
            Latency(
                ratio=median,
                noise=noise,
                seconds=statistics.median(own),
                baseline_seconds=statistics.median(base),
                rounds=len(base),
            )
        )
    return results


def slowdown(reference: Sequence[float], candidate: Sequence[float], z: float = 1.96) -> Slowdown:
    """Return the median of ``candidate_i / reference_i`` over paired rounds and its interval.

    The interval is the ``k``-th smallest to the ``k``-th largest ratio with
    ``k = floor((n - z·√n) / 2)``: the normal approximation of the sign test's confidence
    interval for a median, which assumes nothing about the noise's distribution.
    With fewer than 6 rounds ``k`` is 0 and the interval is the full range.
    """
    ratios = np.sort(np.asarray(candidate, np.float64) / np.maximum(np.asarray(reference, np.float64), 1e-12))
    n = len(ratios)
    if n == 0:
        return Slowdown(1.0, 0.0, math.inf, 0)
    k = max(math.floor((n - z * math.sqrt(n)) / 2), 0)
    return Slowdown(float(np.median(ratios)), float(ratios[k]), float(ratios[n - 1 - k]), n)
