"""Latency of models relative to a baseline, measured in interleaved rounds.

A shared machine's load drifts by tens of percent within a minute, so two models timed
one after the other are not comparable. Here every round runs the baseline and each
candidate once, back to back, and the figure reported is the median over rounds of the
candidate's time divided by the baseline's time in the same round; the spread of those
per-round ratios (half the interquartile range) is the noise, and the standard error of
the median follows from it. A round times each model over at least ``min_round_seconds``
(several runs of a fast model, averaged), so a single preempted run of a 2 ms model does
not make the round's ratio meaningless. Sessions run at onnxruntime's default
optimization level with a fixed number of intra-op threads.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxopt.data import Sample
from onnxopt.errors import UnsupportedModelError

__all__ = ["Latency", "interleaved_ratios", "latency_session", "ratio_summary"]

#: Fewer rounds than this do not give a median worth reporting.
MIN_ROUNDS = 3


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


def latency_session(model: onnx.ModelProto | str | Path, *, threads: int = 1) -> ort.InferenceSession:
    """Return a CPU session at onnxruntime's default optimization level with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load a model to time it: {first}") from exc


def ratio_summary(ratios: Sequence[float]) -> tuple[float, float]:
    """Return (median, half the interquartile range) of per-round ratios."""
    if not ratios:
        raise ValueError("no rounds to summarize")
    if len(ratios) < 4:
        return statistics.median(ratios), (max(ratios) - min(ratios)) / 2
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (q3 - q1) / 2


def interleaved_ratios(
    baseline: onnx.ModelProto | str | Path,
    candidates: Sequence[onnx.ModelProto | str | Path],
    sample: Sample,
    *,
    threads: int = 1,
    rounds: int = 20,
    warmup: int = 2,
    deadline: float | None = None,
    min_round_seconds: float = 0.02,
) -> list[Latency]:
    """Time ``candidates`` against ``baseline`` in interleaved rounds; one :class:`Latency` each.

    ``deadline`` (a :func:`time.monotonic` value) ends the rounds early, though never
    before :data:`MIN_ROUNDS` of them, so a tight budget still yields a figure.
    """
    sessions = [latency_session(m, threads=threads) for m in (baseline, *candidates)]
    single = math.inf
    for session in sessions:
        for _ in range(max(warmup, 1)):
            started = time.perf_counter()
            session.run(None, sample)
            if session is sessions[0]:
                single = min(single, time.perf_counter() - started)
    repeats = max(1, math.ceil(min_round_seconds / max(single, 1e-6)))
    times: list[list[float]] = [[] for _ in sessions]
    for index in range(rounds):
        if deadline is not None and index >= MIN_ROUNDS and time.monotonic() > deadline:
            break
        for i, session in enumerate(sessions):
            started = time.perf_counter()
            for _ in range(repeats):
                session.run(None, sample)
            times[i].append((time.perf_counter() - started) / repeats)
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
