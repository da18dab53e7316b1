"""Where ``onnxopt tune`` builds and judges candidates: in-process, worker processes, or Ray.

A candidate is independent of the others, so building and judging it is one function,
:func:`build_candidate`, of one picklable :class:`BuildJob` (paths, the recipe, the
deadline) returning a :class:`BuildOutcome`. Three executors run it:

* ``jobs=1``: in this process, one after another;
* ``jobs>1``: :class:`concurrent.futures.ProcessPoolExecutor` worker processes;
* ``ray=ADDRESS``: tasks on an existing Ray cluster (the optional ``ray`` extra); there
  each task also times its candidate on the worker that built it and names the machine.

The deadline is a real bound. Inside a build a timer (``SIGALRM``, where the build runs
on a process's main thread) raises :class:`BudgetExceeded`, which every pass lets through,
at the deadline; the caller also stops waiting at the deadline plus a grace period and
ends worker processes that are still running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.errors import OnnxoptError
from onnxopt.timing import Latency
from onnxopt.tune_candidates import Candidate
from onnxopt.tune_judge import Judgement

__all__ = [
    "BudgetExceeded",
    "BuildJob",
    "BuildOutcome",
    "Executor",
    "build_candidate",
    "make_executor",
    "peak_memory",
    "run_stages",
]

log = logging.getLogger(__name__)

#: How long past the deadline the search waits for a worker before ending it.
GRACE_SECONDS = 20.0


class BudgetExceeded(OnnxoptError):
    """The tuning budget ran out while a candidate was being built."""


@dataclass(frozen=True)
class BuildJob:
    """Everything a worker needs to build and judge one candidate (all of it picklable).

    ``deadline`` is wall-clock time (:func:`time.time`), comparable across processes.
    """

    candidate: Candidate
    model_path: str
    calibration_dir: str
    evaluation_dir: str
    output_path: str
    target: str | None
    seed: int
    deadline: float
    threads: int = 1
    time_on_worker: bool = False
    rounds: int = 20
    cache_dir: str = ""  # where stage outputs are shared between candidates ("": no sharing)


@dataclass(frozen=True)
class BuildOutcome:
    """What building one candidate gave: status, the model file, its judgement and costs."""

    name: str
    status: str  # "built", "stopped" (budget) or "failed"
    seconds: float
    output_path: str = ""
    size_bytes: int = 0
    peak_memory_bytes: int = 0
    judgement: Judgement | None = None
    notes: tuple[str, ...] = ()
    error: str = ""
    host: str = field(default_factory=socket.gethostname)
    latency: Latency | None = None
    #: each lossy pass's (name, status, reason): applied, partly applied or not applied
    pass_statuses: tuple[tuple[str, str, str], ...] = ()


def _alarm(_signum: int, _frame: Any) -> None:
    raise BudgetExceeded("the tuning budget ran out while this candidate was being built")


@contextlib.contextmanager
def _deadline_timer(deadline: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in this thread at ``deadline`` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    remaining = deadline - time.time()
    if remaining <= 0:
        raise BudgetExceeded("the tuning budget had run out before this candidate started")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: Loads the model, runs one sample and prints the process's peak resident memory. VmHWM is
#: the peak of this process image alone: ``ru_maxrss`` would report the parent's size too,
#: since Linux carries it across fork and exec.
_MEMORY_PROBE = """
import sys
import onnxruntime as ort
from onnxopt.data import load_dataset
sample = load_dataset(sys.argv[2])[0]
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[3])
options.log_severity_level = 4
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, sample)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
print("PEAK", int(status[0]) * 1024)
"""


def peak_memory(model_path: str, data_dir: str, threads: int = 1, timeout: float = 300.0) -> int:
    """Return the peak RSS (bytes) of a fresh process that loads ``model_path`` and runs one sample; 0 if it fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, model_path, data_dir, str(threads)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("peak memory of %s not measured: %s", model_path, exc)
        return 0
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    return int(lines[-1].split()[1]) if lines else 0


def _pass_notes(records: list[Any]) -> tuple[str, ...]:
    """Return the passes' notes that say what they kept or why they backed off, decisions first."""
    notes = [f"{r.name}: {note}" for r in records for note in r.notes]
    decisions = [n for n in notes if "kept the float model" in n or "not met" in n]
    return tuple(dict.fromkeys([*decisions, *notes]))[:8]


def _prefix_path(cache_dir: str, stages: tuple[Any, ...]) -> Path:
    digest = hashlib.sha256(repr(stages).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"prefix-{len(stages)}-{digest}.onnx"


def run_stages(job: BuildJob, calibration: Any) -> tuple[Any, list[Any]]:
    """Run the candidate's stages as one pipeline run would, starting from the longest cached prefix.

    Candidates share leading stages (every recipe fuses first; pruning then int8 starts
    with the pruning candidate's stages), so each stage's output is kept in
    ``job.cache_dir`` and a later candidate starts after the longest prefix it shares.
    The result equals one :class:`PassManager` run over all stages: the model is
    normalized once, the intermediate models keep their shape annotations, every stage
    sees the normalized input as ``ctx.reference``, and the annotations are dropped at the
    end only when the input had none.
    """
    from onnxopt.graph import drop_shape_annotations, iter_graphs
    from onnxopt.model import load_model, save_model
    from onnxopt.normalize import normalize
    from onnxopt.pipeline import CheckerInstrument, Context, PipelineSpec

    original = load_model(job.model_path)
    had_shapes = any(len(g.value_info) for g in iter_graphs(original.graph))
    reference = normalize(original).model
    stages = job.candidate.stages
    start, working = 0, reference
    for k in range(len(stages), 0, -1):
        cached = _prefix_path(job.cache_dir, stages[:k]) if job.cache_dir else None
        if cached is not None and cached.exists():
            start, working = k, load_model(cached)
            break
    records: list[Any] = []
    ctx = Context(calibration=calibration, seed=job.seed, reference=reference)
    spec = job.candidate.spec()
    for index in range(start, len(stages)):
        single = PipelineSpec([spec.stages[index]])
        result = single.build(instruments=[CheckerInstrument()], normalize=False).run(working, ctx)
        working = result.model
        records += result.records
        if job.cache_dir:  # the whole recipe too: a longer recipe may start with it
            save_model(working, _prefix_path(job.cache_dir, stages[: index + 1]))
    if not had_shapes:
        drop_shape_annotations(working)
    return working, records


def build_candidate(job: BuildJob) -> BuildOutcome:
    """Build ``job.candidate`` from the model, save it, judge it on the evaluation samples, measure its memory."""
    from onnxopt.data import load_dataset
    from onnxopt.model import load_model, save_model
    from onnxopt.runtime import run_model
    from onnxopt.tune_judge import judge_candidate

    started = time.time()
    name = job.candidate.name
    try:
        with _deadline_timer(job.deadline):
            calibration = load_dataset(job.calibration_dir, load_model(job.model_path, load_external_data=False))
            model, records = run_stages(job, calibration)
            save_model(model, job.output_path)
            notes = _pass_notes(records)
            statuses = tuple((r.name, r.status, r.reason) for r in records if getattr(r, "status", None))
            del model
            evaluation = load_dataset(job.evaluation_dir)
            reference = run_model(job.model_path, evaluation, optimization="default")
            outputs = run_model(job.output_path, evaluation, optimization="default")
            float_graph = load_model(job.model_path, load_external_data=False)
            judgement = judge_candidate(reference, outputs, job.target, model=float_graph, inputs=list(evaluation))
            latency = None
            if job.time_on_worker:
                from onnxopt.timing import interleaved_ratios

                (latency,) = interleaved_ratios(
                    job.model_path, [job.output_path], evaluation[0], threads=job.threads, rounds=job.rounds
                )
    except BudgetExceeded as exc:
        return BuildOutcome(name, "stopped", time.time() - started, error=str(exc))
    except (OnnxoptError, ValueError, RuntimeError, MemoryError) as exc:
        log.warning("candidate %s failed: %s", name, exc)
        return BuildOutcome(name, "failed", time.time() - started, error=f"{type(exc).__name__}: {exc}")
    seconds = time.time() - started
    size = Path(job.output_path).stat().st_size
    data_file = Path(job.output_path + ".data")
    if data_file.exists():
        size += data_file.stat().st_size
    memory = peak_memory(job.output_path, job.evaluation_dir, job.threads)
    return BuildOutcome(
        name,
        "built",
        seconds,
        output_path=job.output_path,
        size_bytes=size,
        peak_memory_bytes=memory,
        judgement=judgement,
        notes=notes,
        latency=latency,
        pass_statuses=statuses,
    )


class Executor:
    """Runs :func:`build_candidate` somewhere; ``submit`` returns a future of its outcome."""

    workers: int = 1

    def submit(self, job: BuildJob) -> Future[BuildOutcome]:
        """Start building ``job``."""
        raise NotImplementedError

    def stop(self) -> None:
        """End every build still running (used at the deadline and on Ctrl-C)."""

    def close(self) -> None:
        """Release the workers."""


class InProcessExecutor(Executor):
    """Build each candidate in this process, at submission (the deadline timer bounds it)."""

    def __init__(self, build: Callable[[BuildJob], BuildOutcome] = build_candidate) -> None:
        self._build = build

    def submit(self, job: BuildJob) -> Future[BuildOutcome]:
        """Build ``job`` now and return a finished future."""
        future: Future[BuildOutcome] = Future()
        future.set_result(self._build(job))
        return future


class ProcessExecutor(Executor):
    """Build candidates in ``workers`` processes (``spawn``: onnxruntime's threads do not survive ``fork``)."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: BuildJob) -> Future[BuildOutcome]:
        """Queue ``job`` on a worker process."""
        return self._pool.submit(build_candidate, job)

    def stop(self) -> None:
        """Cancel queued builds and end the worker processes."""
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)

    def close(self) -> None:
        """Wait for the worker processes to exit."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Build, judge and time candidates as tasks on a Ray cluster (``ray.init(address=...)``)."""

    def __init__(self, address: str, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise OnnxoptError("--ray needs the optional ray extra: pip install 'onnxopt[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            except ConnectionError as exc:
                raise OnnxoptError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from exc
        self._remote = ray.remote(num_cpus=1)(build_candidate)
        self._refs: list[Any] = []
        self.workers = max(workers, int(ray.cluster_resources().get("CPU", 1)))

    def submit(self, job: BuildJob) -> Future[BuildOutcome]:
        """Start ``job`` as a Ray task; its latency is measured on the worker that builds it."""
        from dataclasses import replace

        ref = self._remote.remote(replace(job, time_on_worker=True))
        self._refs.append(ref)
        future: Future[BuildOutcome] = ref.future()
        return future

    def stop(self) -> None:
        """Cancel every task still running."""
        for ref in self._refs:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=True)


def make_executor(jobs: int = 1, ray: str | None = None) -> Executor:
    """Return the executor for ``--jobs`` and ``--ray``."""
    if jobs < 1:
        raise OnnxoptError(f"--jobs {jobs}: give at least 1")
    if ray:
        return RayExecutor(ray, jobs)
    if jobs == 1:
        return InProcessExecutor()
    return ProcessExecutor(jobs)
