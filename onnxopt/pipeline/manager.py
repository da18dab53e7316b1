"""The PassManager: runs stages of passes with instruments, records and statuses."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import onnx

from onnxopt.data import check_calibration
from onnxopt.errors import OnnxoptError
from onnxopt.external import check_model as check_lazy_model
from onnxopt.graph import drop_shape_annotations, iter_graphs, remove_unused
from onnxopt.model import ModelStats, exceeds_protobuf_limit, model_stats
from onnxopt.pipeline.protocol import APPLIED, NOT_APPLIED, PARTLY_APPLIED, STATUSES, Context, PassProtocol, PassResult

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """One pass run: timing, model size before and after, and the pass's own report."""

    name: str
    round: int
    seconds: float
    changed: bool
    before: ModelStats
    after: ModelStats
    stats: dict[str, int | float]
    notes: list[str]
    checks: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    status: str | None = None  # lossy passes only: applied / partly applied / not applied
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "pass": self.name,
            "round": self.round,
            "seconds": round(self.seconds, 4),
            "changed": self.changed,
            "exact": self.exact,
            "status": self.status,
            "reason": self.reason,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "stats": self.stats,
            "notes": self.notes,
            "checks": self.checks,
        }


@dataclass
class PipelineResult:
    """The optimized model and a record of every pass run.

    ``source`` describes the model as given, ``initial`` the model after normalization
    (Constant weights lifted), where the first pass starts.
    """

    model: onnx.ModelProto
    records: list[PassRecord]
    rounds: int
    converged: bool
    initial: ModelStats
    final: ModelStats
    notes: list[str] = field(default_factory=list)
    source: ModelStats | None = None  # the input as given, before normalization

    def outcomes(self) -> list[PassRecord]:
        """Return one record per lossy pass: its last applied run, else its last run."""
        chosen: dict[str, PassRecord] = {}
        for record in self.records:
            if record.exact:
                continue
            previous = chosen.get(record.name)
            if previous is None or record.status != NOT_APPLIED or previous.status == NOT_APPLIED:
                chosen[record.name] = record
        return list(chosen.values())

    @property
    def status(self) -> str:
        """Return the run's status: ``exact`` (no lossy pass), else the worst lossy pass's."""
        statuses = {r.status for r in self.outcomes()}
        if not statuses:
            return "exact"
        return next(s for s in (NOT_APPLIED, PARTLY_APPLIED, APPLIED) if s in statuses)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "status": {
                "result": self.status,
                "passes": [{"pass": r.name, "status": r.status, "reason": r.reason} for r in self.outcomes()],
            },
            "rounds": self.rounds,
            "converged": self.converged,
            "source": (self.source or self.initial).to_dict(),
            "initial": self.initial.to_dict(),
            "final": self.final.to_dict(),
            "passes": [r.to_dict() for r in self.records],
            "notes": self.notes,
        }


class Instrument(Protocol):
    """Called by the manager around each pass; timing, checks and verification plug in here.

    ``after_pass`` may raise to stop the pipeline (the verify instrument does); it may add
    entries to ``record.checks``.
    """

    def before_pipeline(self, model: onnx.ModelProto, ctx: Context) -> None:
        """Prepare for a run on ``model`` (as normalized, before the first pass)."""

    def after_pass(self, pass_: PassProtocol, record: PassRecord, model: onnx.ModelProto, ctx: Context) -> None:
        """Inspect the model after ``pass_``; raise to stop the pipeline."""


class CheckerInstrument:
    """Run ``onnx.checker`` after every pass that changed the model."""

    def before_pipeline(self, model: onnx.ModelProto, ctx: Context) -> None:
        """Nothing to prepare."""

    def after_pass(self, pass_: PassProtocol, record: PassRecord, model: onnx.ModelProto, ctx: Context) -> None:
        """Check the model's structure; raise VerificationError naming the pass on failure."""
        if not record.changed or exceeds_protobuf_limit(model):
            return
        from onnxopt.errors import VerificationError

        try:
            check_lazy_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise VerificationError(
                f"pass {pass_.name!r} produced an invalid model: {first}", pass_name=pass_.name
            ) from exc
        record.checks["onnx_checker"] = "ok"


class PassManager:
    """Run passes in sequence, optionally until a fixed point, with instruments around each.

    A manager holds one or more stages; each stage runs its passes once, or with
    ``fixed_point`` repeats them until a round changes nothing (at most ``max_rounds``).
    ``verify`` is an instrument (usually :class:`onnxopt.harness.Verifier`) called only
    after passes that changed the model; it raises to stop the pipeline and names the
    pass that broke equivalence. With ``clean`` (the default) the run ends by removing
    nodes and initializers nothing reads, so no recipe writes dead weights.
    """

    def __init__(
        self,
        passes: Sequence[PassProtocol],
        *,
        fixed_point: bool = False,
        max_rounds: int = 10,
        instruments: Iterable[Instrument] = (),
        verify: Instrument | None = None,
        normalize: bool = True,
        isolate_failures: bool = True,
        clean: bool = True,
    ) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.stages: list[tuple[list[PassProtocol], bool, int]] = [(list(passes), fixed_point, max_rounds)]
        self.instruments = list(instruments)
        self.verify = verify
        self.normalize = normalize
        self.isolate_failures = isolate_failures
        self.clean = clean

    def _run_pass(self, pass_: PassProtocol, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Run one pass; with ``isolate_failures`` a crashing pass is undone and reported.

        Errors meant for the user (:class:`OnnxoptError`, e.g. missing calibration data)
        always propagate; any other exception is a bug in that pass, and one broken pass
        must not cost the user the whole pipeline or, worse, leave a half-rewritten model.
        """
        if not self.isolate_failures:
            return pass_(model, ctx)
        snapshot = onnx.ModelProto()
        snapshot.CopyFrom(model)
        try:
            return pass_(model, ctx)
        except OnnxoptError:
            raise
        except Exception as exc:
            log.warning("pass %s failed and was skipped: %s", pass_.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            note = f"failed with {type(exc).__name__}: {exc}; skipped, the model is as before this pass"
            return PassResult(snapshot, False, notes=[note])

    @classmethod
    def from_stages(cls, stages: Sequence[tuple[Sequence[PassProtocol], bool, int]], **options: Any) -> PassManager:
        """Build a manager from (passes, fixed_point, max_rounds) stages."""
        manager = cls([], **options)
        manager.stages = [(list(p), bool(fp), int(mr)) for p, fp, mr in stages]
        return manager

    @property
    def passes(self) -> list[PassProtocol]:
        """Return every pass of every stage, in order."""
        return [p for passes, _, _ in self.stages for p in passes]

    def run(self, model: onnx.ModelProto, ctx: Context | None = None) -> PipelineResult:
        """Optimize a copy of ``model``; the argument itself is never modified."""
        from onnxopt.model import load_model
        from onnxopt.normalize import declare_initializers
        from onnxopt.normalize import normalize as normalize_model

        ctx = ctx or Context()
        if ctx.calibration is not None:
            check_calibration(ctx.calibration)
        working = load_model(model)
        source = model_stats(working)
        # Before IR 4 every initializer must also be a graph input, which makes it an overridable
        # input rather than a constant. The passes run under IR 4's rules (what they add is a
        # constant); the run ends by restoring the version and declaring what they added.
        legacy_ir = working.ir_version if working.ir_version < 4 else None
        if legacy_ir is not None:
            working.ir_version = 4
        had_shapes = any(len(g.value_info) for g in iter_graphs(working.graph))
        notes: list[str] = []
        if self.normalize:
            normalized = normalize_model(working)
            working = normalized.model
            notes.extend(normalized.notes)
        if ctx.reference is None and any(getattr(p, "wants_reference", lambda: False)() for p in self.passes):
            ctx = replace(ctx, reference=load_model(working))
        instruments = [*self.instruments, *([self.verify] if self.verify else [])]
        for instrument in instruments:
            instrument.before_pipeline(working, ctx)
        initial = model_stats(working)
        records: list[PassRecord] = []
        total_rounds = 0
        converged = True
        current = initial
        for passes, fixed_point, max_rounds in self.stages:
            rounds = 0
            stage_converged = not fixed_point
            while rounds < (max_rounds if fixed_point else 1):
                rounds += 1
                any_change = False
                for pass_ in passes:
                    started = time.perf_counter()
                    with ctx.progress.task(f"{pass_.name} (round {rounds})", None):  # no phase is silent
                        result = self._run_pass(pass_, working, ctx)
                    seconds = time.perf_counter() - started
                    working = result.model
                    after = model_stats(working) if result.changed else current
                    record = PassRecord(
                        name=pass_.name,
                        round=rounds,
                        seconds=seconds,
                        changed=result.changed,
                        before=current,
                        after=after,
                        stats=dict(result.stats),
                        notes=list(result.notes),
                    )
                    if not getattr(pass_, "exact", True):
                        record.exact = False
                        record.status, record.reason = _lossy_status(result)
                    records.append(record)
                    log.info("pass %s round %d: changed=%s in %.3fs", pass_.name, rounds, result.changed, seconds)
                    for instrument in instruments:
                        instrument.after_pass(pass_, record, working, ctx)
                    current = after
                    any_change = any_change or result.changed
                if not any_change:
                    stage_converged = True
                    break
            total_rounds += rounds
            if fixed_point and not stage_converged:
                converged = False
                names = ", ".join(p.name for p in passes)
                notes.append(
                    f"stopped at the round limit ({max_rounds}) while passes still changed the model ({names})"
                )
        if self.clean:
            removed = remove_unused(working.graph)
            if removed:
                current = model_stats(working)
                notes.append(
                    f"removed {removed} unused node(s) and initializer(s) the passes left behind (the pipeline "
                    "ends with dead-code clean-up)"
                )
        if legacy_ir is not None:
            working.ir_version = legacy_ir
            declared = declare_initializers(working)
            if declared:
                current = model_stats(working)
                notes.append(
                    f"IR version {legacy_ir}: declared the {declared} initializer(s) the pipeline added as graph "
                    "inputs too, as that IR version requires (onnxruntime then treats them as overridable inputs)"
                )
        if self.normalize and not had_shapes:
            dropped = drop_shape_annotations(working)
            if dropped:
                notes.append(
                    f"dropped the {dropped} shape annotations (value_info) that normalization added for the "
                    "passes: the input had none, and onnxruntime can fuse differently with them"
                )
        return PipelineResult(
            model=working,
            records=records,
            rounds=total_rounds,
            converged=converged,
            initial=initial,
            final=current,
            notes=notes,
            source=source,
        )


def _lossy_status(result: PassResult) -> tuple[str, str]:
    """Return (status, reason) of a lossy pass's result, inferred when the pass gave none."""
    if result.status is not None:
        if result.status not in STATUSES:
            raise ValueError(f"unknown pass status {result.status!r}; use one of {', '.join(STATUSES)}")
        return result.status, result.reason
    if result.changed:
        return APPLIED, result.reason
    return NOT_APPLIED, result.reason or (result.notes[-1] if result.notes else "it changed nothing")
