"""``onnxopt tune``: find the fastest (or smallest) model that still meets the target.

The search, in two phases:

1. **Build and judge** every candidate recipe (:mod:`onnxopt.tune_candidates`) on the
   calibration part of the data, in the order given, one at a time or on ``jobs``
   workers (:mod:`onnxopt.tune_workers`), each judged against the float model on the
   held-out evaluation part, which no pass sees. Candidates that cannot win are not
   built: the weaker rungs of a ladder once a stronger one met the target, the stronger
   ones once a rung missed it, and a recipe identical to one already tried.
2. **Time** the candidates that met the target, one at a time, each in interleaved
   rounds against the float model (:mod:`onnxopt.timing`), smallest first: a quick
   measurement first, and a candidate that is both clearly slower and larger than one
   already measured is pruned before its full measurement.

The budget is a real bound: builds get a deadline that leaves time for phase 2, a build
still running then is stopped and reported, and timing stops its rounds at the budget.
Everything is deterministic for a seed (data split, candidate order, pass seeds) except
latency figures. Ctrl-C stops the search and keeps the best candidate measured so far.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxopt.data import Dataset, load_dataset
from onnxopt.errors import CalibrationDataError, OnnxoptError
from onnxopt.harness import MetricError, parse_metric
from onnxopt.model import load_model, save_model
from onnxopt.progress import NullProgress, Progress
from onnxopt.timing import Latency, interleaved_ratios
from onnxopt.tune_candidates import Candidate, build_candidates, scoped_target_floors
from onnxopt.tune_judge import target_kind
from onnxopt.tune_search import FULL_ROUNDS, QUICK_ROUNDS, CandidateResult, Search, choose, time_candidates
from onnxopt.tune_workers import GRACE_SECONDS, BuildJob, BuildOutcome, Executor, make_executor, peak_memory

__all__ = ["OBJECTIVES", "CandidateResult", "TuneResult", "choose", "save_samples", "split_data", "tune"]

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "size", "balanced")


@dataclass(frozen=True)
class TuneResult:
    """The search's outcome: every candidate's row, the winner, and what the search was asked."""

    candidates: tuple[CandidateResult, ...]
    winner: CandidateResult
    objective: str
    target: str | None
    budget_seconds: float
    elapsed_seconds: float
    seed: int
    calibration: Dataset
    interrupted: bool = False
    skipped: dict[str, str] = field(default_factory=dict)


def split_data(data: Dataset, seed: int, holdout: float = 0.25) -> tuple[Dataset, Dataset]:
    """Return (calibration, evaluation) parts, shuffled by ``seed``; the evaluation part is never calibrated on."""
    n = len(data)
    if n < 2:
        raise CalibrationDataError(f"tune needs at least 2 samples (one to calibrate, one to judge); got {n}")
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * holdout)))
    evaluation = sorted(int(i) for i in order[:k])
    calibration = sorted(int(i) for i in order[k:])
    return (
        Dataset([data[i] for i in calibration], source=data.source),
        Dataset([data[i] for i in evaluation], source=data.source),
    )


def save_samples(samples: Dataset, folder: Path) -> None:
    """Write one ``.npz`` per sample, so samples of different shapes round-trip (``load_dataset`` reads the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.savez(folder / f"{i:05d}.npz", **sample)  # type: ignore[arg-type]


def _timing_reserve(budget: float, candidates: int, float_seconds: float) -> float:
    """Return the seconds kept for phase 2: quick and full rounds of every candidate and the float model, plus loads."""
    estimate = candidates * ((QUICK_ROUNDS + FULL_ROUNDS) * 2 * float_seconds + 3.0)
    return min(max(estimate, 10.0), 0.3 * budget)


def _copy_atomically(source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".onnxopt-", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _step(progress: Progress, text: str) -> Iterator[None]:
    with progress.task(text, None):
        yield


def tune(
    model: str | Path | onnx.ModelProto,
    data: Dataset | str | Path,
    *,
    output: str | Path | None = None,
    target: str | None = None,
    objective: str = "latency",
    budget_minutes: float = 15.0,
    threads: int = 1,
    jobs: int = 1,
    ray: str | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    only: Sequence[str] | None = None,
) -> TuneResult:
    """Try the candidate recipes on ``model`` and return every candidate's row and the winner.

    ``data`` is split by ``seed`` into a calibration part (given to the passes) and an
    evaluation part (judged on). ``output`` receives the winning model (written
    atomically). Candidate models stay in ``workdir`` (a temporary folder when None,
    removed afterwards, so rows' paths are only valid with a ``workdir``). ``only``
    restricts the search to the candidates of those names (``executor`` replaces the one
    ``jobs``/``ray`` would make).
    """
    if objective not in OBJECTIVES:
        raise OnnxoptError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if budget_minutes <= 0:
        raise OnnxoptError(f"--budget-minutes {budget_minutes:g}: give a positive number of minutes")
    if target is not None:
        try:
            if target_kind(target) == "floors":
                scoped_target_floors(target)
            elif target_kind(target) == "metrics":
                [parse_metric(part) for part in target.split(";") if part.strip()]
        except (ValueError, MetricError) as exc:
            raise OnnxoptError(f"--target {target!r}: {exc}") from None
    progress = progress or NullProgress()
    started = time.monotonic()
    budget = budget_minutes * 60.0
    deadline = started + budget
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        loaded = load_model(model)
        model_path = folder / "float.onnx"
        save_model(loaded, model_path)
        dataset = data if isinstance(data, Dataset) else load_dataset(data, loaded)
        calibration, evaluation = split_data(dataset, seed)
        save_samples(calibration, folder / "calibration")
        save_samples(evaluation, folder / "evaluation")
        (folder / "prefixes").mkdir(exist_ok=True)
        listed = build_candidates(loaded, target=target)
        if only is not None:
            known = [c.name for c in listed.candidates]
            unknown = [name for name in only if name not in known]
            if unknown:
                raise OnnxoptError(f"no candidate named {unknown[0]!r} for this model; candidates: {', '.join(known)}")
            listed = replace(listed, candidates=tuple(c for c in listed.candidates if c.name in only))
        base_size = model_path.stat().st_size
        with _step(progress, "tune: timing the float model"):
            (float_latency,) = interleaved_ratios(model_path, [model_path], evaluation[0], threads=threads, rounds=3)
        reserve = _timing_reserve(budget, len(listed.candidates), float_latency.seconds)
        build_deadline_wall = time.time() + (deadline - reserve - time.monotonic())
        baseline = CandidateResult(
            "float (as given)",
            "",
            "baseline",
            latency=Latency(1.0, 0.0, float_latency.baseline_seconds, float_latency.baseline_seconds, 0),
            size_bytes=base_size,
            size_ratio=1.0,
            peak_memory_bytes=peak_memory(str(model_path), str(folder / "evaluation"), threads),
            path=str(model_path),
        )
        search = Search()
        search.rows.append(baseline)
        pool = executor or make_executor(jobs, ray)
        interrupted = False
        try:
            _build_all(pool, listed.candidates, search, folder, model_path, target, seed, threads,
                       build_deadline_wall, base_size, progress, deadline)  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
            pool.stop()
            log.warning("interrupted: keeping the best candidate measured so far")
        finally:
            pool.close()
        done = {r.name for r in search.rows}
        for candidate in listed.candidates:
            if candidate.name not in done:
                reason = "interrupted" if interrupted else "the budget ran out"
                search.rows.append(CandidateResult(candidate.name, candidate.to_toml(), "not run", reason))
        rows = search.rows
        try:
            with _step(progress, "tune: timing the candidates that met the target"):
                rows = time_candidates(rows, str(model_path), evaluation[0], threads, deadline)
        except KeyboardInterrupt:
            interrupted = True
        winner = choose(rows, objective)
        rows = [replace(r, status="chosen") if r is winner and r.status != "baseline" else r for r in rows]
        winner = next(r for r in rows if r.name == winner.name)
        if output is not None:
            _copy_atomically(winner.path, Path(output))
        elapsed = time.monotonic() - started
        if workdir is None:
            rows = [replace(r, path="") for r in rows]
            winner = replace(winner, path="")
    return TuneResult(
        tuple(rows),
        winner,
        objective,
        target,
        budget,
        elapsed,
        seed,
        calibration,
        interrupted,
        dict(listed.skipped),
    )


def _build_all(
    pool: Executor,
    candidates: tuple[Candidate, ...],
    search: Search,
    folder: Path,
    model_path: Path,
    target: str | None,
    seed: int,
    threads: int,
    build_deadline: float,
    base_size: int,
    progress: Progress,
    deadline: float,
) -> None:
    """Phase 1: submit candidates to ``pool`` (at most its worker count at once), record outcomes as they finish."""
    queue = list(candidates)
    running: dict[Future[BuildOutcome], tuple[Candidate, str]] = {}
    index = 0
    while queue or running:
        while queue and len(running) < pool.workers and time.time() < build_deadline:
            candidate = queue.pop(0)
            recipe = candidate.to_toml()
            reason = search.prune_reason(candidate, recipe)
            if reason:
                search.rows.append(CandidateResult(candidate.name, recipe, "pruned", reason))
                continue
            search.recipes[recipe] = candidate.name
            index += 1
            left = max(0.0, deadline - time.monotonic())
            job = BuildJob(
                candidate,
                str(model_path),
                str(folder / "calibration"),
                str(folder / "evaluation"),
                str(folder / f"candidate-{index:02d}.onnx"),
                target,
                seed,
                build_deadline,
                threads,
                cache_dir=str(folder / "prefixes"),
            )
            with _step(progress, f"tune: {candidate.name} ({index}/{len(candidates)}, {left / 60:.1f} min left)"):
                future = pool.submit(job)
            running[future] = (candidate, recipe)
        if not running:
            break
        timeout = max(0.0, build_deadline - time.time()) + GRACE_SECONDS
        names = ", ".join(c.name for c, _ in running.values())
        left = max(0.0, deadline - time.monotonic())
        with _step(progress, f"tune: building {names} ({left / 60:.1f} min left)"):
            finished, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
        if not finished:
            pool.stop()
            for candidate, recipe in running.values():
                search.rows.append(CandidateResult(candidate.name, recipe, "stopped", "stopped at the budget"))
            return
        for future in finished:
            candidate, recipe = running.pop(future)
            search.record(candidate, recipe, future.result(), base_size)
