"""The rules of the tune search: its rows, which candidates cannot win, the choice, the timing phase.

Pure bookkeeping over :class:`CandidateResult` rows, apart from the search itself
(:mod:`onnxopt.tune`) so each rule can be tested alone.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.timing import Latency, interleaved_ratios
from onnxopt.tune_candidates import Candidate
from onnxopt.tune_judge import Judgement
from onnxopt.tune_workers import BuildOutcome

__all__ = ["FULL_ROUNDS", "QUICK_ROUNDS", "CandidateResult", "Search", "choose", "time_candidates"]

#: Rounds of the quick and of the full latency measurement.
QUICK_ROUNDS = 5
FULL_ROUNDS = 20


@dataclass(frozen=True)
class CandidateResult:
    """One row of the tune table: a candidate, what happened to it and what it measured."""

    name: str
    recipe: str
    status: str  # baseline, chosen, accepted, rejected, pruned, stopped, failed, not run
    reason: str = ""
    judgement: Judgement | None = None
    latency: Latency | None = None
    size_bytes: int = 0
    size_ratio: float = math.nan
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    path: str = ""
    host: str = ""
    notes: tuple[str, ...] = ()
    pass_statuses: tuple[tuple[str, str, str], ...] = ()

    @property
    def measured(self) -> bool:
        """True when the candidate met the target and has a latency figure."""
        return self.latency is not None and self.status in ("accepted", "chosen", "baseline")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "judgement": self.judgement.to_dict() if self.judgement else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "size_bytes": self.size_bytes,
            "size_ratio": None if math.isnan(self.size_ratio) else round(self.size_ratio, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds": round(self.seconds, 2),
            "host": self.host,
            "notes": list(self.notes),
            "pass_statuses": [{"pass": n, "status": st, "reason": r} for n, st, r in self.pass_statuses],
            "recipe": self.recipe,
        }


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Search:
    """Phase 1 bookkeeping: ladders, duplicates and the rows so far (per-run state, not reused)."""

    def __init__(self) -> None:
        self.rows: list[CandidateResult] = []
        self.met: dict[str, tuple[float, str]] = {}
        self.missed: dict[str, tuple[float, str]] = {}
        self.recipes: dict[str, str] = {}
        self.digests: dict[str, str] = {}

    def prune_reason(self, candidate: Candidate, recipe: str) -> str:
        """Return why ``candidate`` cannot win and need not be built ("" when it can)."""
        if recipe in self.recipes:
            return f"the same recipe as {self.recipes[recipe]}"
        if candidate.ladder in self.met and candidate.strength < self.met[candidate.ladder][0]:
            return f"cannot win: weaker than {self.met[candidate.ladder][1]}, which met the target"
        if candidate.ladder in self.missed and candidate.strength > self.missed[candidate.ladder][0]:
            return f"cannot win: stronger than {self.missed[candidate.ladder][1]}, which missed the target"
        return ""

    def record(self, candidate: Candidate, recipe: str, outcome: BuildOutcome, base_size: int) -> None:
        """Add the row of a finished build and update the ladders and the duplicates."""
        common: dict[str, Any] = {
            "seconds": outcome.seconds,
            "host": outcome.host,
            "notes": outcome.notes,
            "judgement": outcome.judgement,
            "latency": outcome.latency,
            "pass_statuses": outcome.pass_statuses,
        }
        if outcome.status != "built":
            reason = "stopped at the budget" if outcome.status == "stopped" else outcome.error
            self.rows.append(CandidateResult(candidate.name, recipe, outcome.status, reason, **common))
            return
        judgement = outcome.judgement
        passed = judgement is not None and judgement.passed
        if candidate.ladder:
            book = self.met if passed else self.missed
            previous = book.get(candidate.ladder)
            if previous is None or (candidate.strength > previous[0]) == passed:
                book[candidate.ladder] = (candidate.strength, candidate.name)
        digest = _digest(outcome.output_path)
        status, reason = ("accepted", "") if passed else ("rejected", "target not met")
        if passed and digest in self.digests:
            status, reason = "pruned", f"the same model as {self.digests[digest]}"
        blocked = [f"{name} not applied: {why}" for name, state, why in outcome.pass_statuses if state == "not applied"]
        if blocked:  # say why a lossy pass changed nothing
            reason = "; ".join([reason, *blocked]) if reason else "; ".join(blocked)
        self.digests.setdefault(digest, candidate.name)
        self.rows.append(
            CandidateResult(
                candidate.name,
                recipe,
                status,
                reason,
                size_bytes=outcome.size_bytes,
                size_ratio=outcome.size_bytes / base_size,
                peak_memory_bytes=outcome.peak_memory_bytes,
                path=outcome.output_path,
                **common,
            )
        )


def _score(row: CandidateResult, objective: str) -> tuple[float, float]:
    assert row.latency is not None
    if objective == "size":
        return row.size_ratio, row.latency.ratio
    if objective == "balanced":
        return math.sqrt(row.latency.ratio * row.size_ratio), row.size_ratio
    return row.latency.ratio, row.size_ratio


def _not_slower(row: CandidateResult) -> bool:
    """Return True unless the row is slower than the float model beyond twice its standard error."""
    return row.latency is not None and row.latency.ratio <= 1.0 + 2 * row.latency.error


def choose(rows: list[CandidateResult], objective: str) -> CandidateResult:
    """Return the best measured row: never slower than the float model; ties within noise go to the smaller.

    Under ``latency``, every row whose ratio is within twice the combined standard error
    of the fastest one's counts as fastest, and the smallest of them wins, so a noisy
    machine does not pick a larger model by chance.
    """
    measured = [r for r in rows if r.measured and _not_slower(r)]
    baseline = next(r for r in rows if r.status == "baseline")
    if not measured:
        return baseline
    if objective != "latency":
        return min(measured, key=lambda r: _score(r, objective))
    fastest = min(measured, key=lambda r: _score(r, objective))
    assert fastest.latency is not None

    def tied(row: CandidateResult) -> bool:
        assert row.latency is not None and fastest.latency is not None
        bound = 2 * math.hypot(row.latency.error, fastest.latency.error)
        return row.latency.ratio <= fastest.latency.ratio + bound

    return min((r for r in measured if tied(r)), key=lambda r: (r.size_ratio, _score(r, objective)))


def time_candidates(
    rows: list[CandidateResult], model_path: str, sample: dict[str, np.ndarray], threads: int, deadline: float
) -> list[CandidateResult]:
    """Phase 2: time accepted rows without a latency (smallest first), pruning the clearly slower and larger."""
    order = sorted(
        (i for i, r in enumerate(rows) if r.status == "accepted" and r.latency is None),
        key=lambda i: rows[i].size_bytes,
    )
    quick: dict[int, Latency] = {}
    for i in order:
        if time.monotonic() > deadline:
            break
        (quick[i],) = interleaved_ratios(model_path, [rows[i].path], sample, threads=threads, rounds=QUICK_ROUNDS)
        beaten = [j for j in quick if j != i and rows[j].size_bytes <= rows[i].size_bytes]
        for j in beaten:
            if quick[i].ratio - 2 * quick[i].error > quick[j].ratio + 2 * quick[j].error:
                rows[i] = replace(
                    rows[i],
                    status="pruned",
                    latency=quick[i],
                    reason=f"cannot win: slower and larger than {rows[j].name} (quick timing)",
                )
                break
    for i in order:
        if rows[i].status != "accepted":
            continue
        if i not in quick:
            rows[i] = replace(rows[i], reason="not timed: the budget ran out")
            continue
        left = deadline - time.monotonic()
        latency = quick[i]
        if left > 0:
            (latency,) = interleaved_ratios(
                model_path, [rows[i].path], sample, threads=threads, rounds=FULL_ROUNDS, deadline=deadline
            )
        rows[i] = replace(rows[i], latency=latency)
    return rows
