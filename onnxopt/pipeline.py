"""Passes, their registry, recipes and the PassManager that chains them.

A pass is a class with a registry ``name``, an ``exact`` flag (True: outputs must match
the input model to float tolerance) and keyword-only constructor parameters, which are
also its recipe keys. Calling it returns a :class:`PassResult`. The core knows no
individual pass: ``onnxopt.passes`` registers them (and the presets) on import.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import onnx

from onnxopt.data import Dataset, check_calibration
from onnxopt.errors import OnnxoptError, RecipeError
from onnxopt.external import Spill
from onnxopt.external import check_model as check_lazy_model
from onnxopt.graph import drop_shape_annotations, iter_graphs, remove_unused
from onnxopt.model import ModelStats, exceeds_protobuf_limit, model_stats
from onnxopt.params import coerce_param
from onnxopt.progress import NullProgress, Progress

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "APPLIED",
    "NOT_APPLIED",
    "PARTLY_APPLIED",
    "Context",
    "Instrument",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PipelineResult",
    "PipelineSpec",
    "Stage",
    "available_passes",
    "available_presets",
    "create_pass",
    "load_recipe",
    "pass_parameters",
    "register_pass",
    "register_preset",
]

log = logging.getLogger(__name__)


#: What a lossy pass did, shown at the end of a run and at the top of the JSON report.
APPLIED, PARTLY_APPLIED, NOT_APPLIED = "applied", "partly applied", "not applied"
STATUSES = (APPLIED, PARTLY_APPLIED, NOT_APPLIED)


@dataclass
class PassResult:
    """What a pass returns: the model, whether it changed, counts and notes.

    A lossy pass also says whether it was ``applied``, ``partly applied`` (``reason``
    says what stayed float or dense) or ``not applied`` (``reason`` says what blocked
    it); when it says nothing the manager infers it from ``changed`` and the last note.
    """

    model: onnx.ModelProto
    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    status: str | None = None
    reason: str = ""


@dataclass
class Context:
    """What passes share during one pipeline run.

    ``calibration`` holds representative inputs (lossy passes split off a held-out
    part to check their budget); ``budget`` overrides a lossy pass's default error
    target; ``progress`` reports long work (a no-op unless the CLI installs one);
    ``reference`` is the pipeline's starting model when a pass wants it; ``spill``,
    when set, is where a pass writes the large tensors it produces
    (``onnxopt.external.replace_initializer(..., spill=ctx.spill)``) instead of holding them.
    """

    calibration: Dataset | None = None
    budget: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    #: the model the pipeline started from (normalized, before any pass), kept only when a
    #: pass asks for it (:meth:`Pass.wants_reference`): e.g. int8 times itself against it
    reference: onnx.ModelProto | None = None
    progress: Progress = field(default_factory=NullProgress)
    spill: Spill | None = None


class Pass:
    """Base class of every pass: subclass it, set ``name``/``exact``, implement ``run``.

    Parameters are keyword-only arguments of ``__init__`` stored as attributes of the
    same name; per-run state lives in ``run``'s locals, never on the object.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def __call__(self, model: onnx.ModelProto, ctx: Context | None = None) -> PassResult:
        """Run the pass on ``model`` (which it may modify in place); no context means a default one."""
        return self.run(model, ctx if ctx is not None else Context())

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Rewrite ``model`` and say what changed."""
        raise NotImplementedError

    def wants_reference(self) -> bool:
        """Return True when the pass compares against the pipeline's starting model (``Context.reference``)."""
        return False

    def params(self) -> dict[str, Any]:
        """Return the pass's parameter values by name."""
        return {name: getattr(self, name) for name in pass_parameters(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class PassProtocol(Protocol):
    """What the manager needs of a pass (the :class:`Pass` base class provides it)."""

    name: ClassVar[str]
    exact: ClassVar[bool]

    def __call__(self, model: onnx.ModelProto, ctx: Context) -> PassResult: ...


_PASSES: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, Callable[[], PipelineSpec]]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by its ``name`` in recipes and the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a pass named {cls.name!r} is registered already (by {existing.__module__})")
    _PASSES[cls.name] = cls
    return cls


def register_preset(name: str, description: str, build: Callable[[], PipelineSpec]) -> None:
    """Register a built-in pipeline under ``name``."""
    _PRESETS[name] = (description, build)


def _load_builtin_passes() -> None:
    import onnxopt.passes  # noqa: F401  (registers the built-in passes and presets)


def available_passes() -> dict[str, type[Pass]]:
    """Return the registered passes by name."""
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def available_presets() -> dict[str, str]:
    """Return the preset names with their descriptions."""
    _load_builtin_passes()
    return {name: description for name, (description, _) in sorted(_PRESETS.items())}


def pass_parameters(cls: type[Pass]) -> dict[str, Any]:
    """Return a pass class's keyword-only parameters and their defaults."""
    signature = inspect.signature(cls.__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_pass(name: str, **params: Any) -> Pass:
    """Instantiate the registered pass ``name`` with ``params``; errors list valid choices."""
    passes = available_passes()
    cls = passes.get(name)
    if cls is None:
        raise RecipeError(f"unknown pass {name!r}; valid passes: {', '.join(passes)}")
    valid = pass_parameters(cls)
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise RecipeError(
            f"pass {name!r} has no parameter {unknown[0]!r}; valid parameters: {', '.join(valid) or '(none)'}"
        )
    params = {key: coerce_param(name, cls, key, value) for key, value in params.items()}
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"pass {name!r}: {exc}") from exc


@dataclass
class Stage:
    """Passes run in order, once or repeated until none changes the model."""

    passes: list[tuple[str, dict[str, Any]]]
    fixed_point: bool = False
    max_rounds: int = 10


@dataclass
class PipelineSpec:
    """A recipe: stages of (pass name, parameters), each run once or to a fixed point."""

    stages: list[Stage]
    name: str = "custom"

    @classmethod
    def single(
        cls,
        passes: list[tuple[str, dict[str, Any]]],
        *,
        fixed_point: bool = False,
        max_rounds: int = 10,
        name: str = "custom",
    ) -> PipelineSpec:
        """Return a one-stage pipeline."""
        return cls([Stage(passes, fixed_point, max_rounds)], name=name)

    @property
    def pass_names(self) -> list[str]:
        """Return every pass name in order."""
        return [name for stage in self.stages for name, _ in stage.passes]

    def with_overrides(self, overrides: dict[str, Any]) -> PipelineSpec:
        """Set each override on every pass that has a parameter of that name.

        An override that no pass accepts is an error naming the passes' parameters.
        """
        passes = available_passes()
        used: set[str] = set()
        stages = []
        for stage in self.stages:
            updated = []
            for name, params in stage.passes:
                valid = pass_parameters(passes[name]) if name in passes else {}
                merged = dict(params)
                for key, value in overrides.items():
                    if key in valid:
                        merged[key] = value
                        used.add(key)
                updated.append((name, merged))
            stages.append(replace(stage, passes=updated))
        unused = [k for k in overrides if k not in used]
        if unused:
            accepted = sorted({p for n in self.pass_names if n in passes for p in pass_parameters(passes[n])})
            raise RecipeError(
                f"no pass in pipeline {self.name!r} takes {unused[0]!r}; its parameters: "
                f"{', '.join(accepted) or '(none)'}"
            )
        return replace(self, stages=stages)

    def build(self, **manager_options: Any) -> PassManager:
        """Create the passes and a manager that runs them."""
        stages = [
            ([create_pass(name, **params) for name, params in stage.passes], stage.fixed_point, stage.max_rounds)
            for stage in self.stages
        ]
        return PassManager.from_stages(stages, **manager_options)


def load_recipe(recipe: str | Path) -> PipelineSpec:
    """Return the pipeline for a preset name or a TOML recipe file.

    A recipe file is either a flat list of passes::

        [pipeline]
        fixed_point = true      # optional; repeat until no pass changes anything
        max_rounds = 5

        [[pass]]
        name = "fold_batchnorm"

    or a list of stages, each with its own passes and repetition::

        [[stage]]
        fixed_point = true
        [[stage.pass]]
        name = "fold_constants"

        [[stage]]
        [[stage.pass]]
        name = "quantize_int8"
        per_channel = true
    """
    presets = available_presets()
    text_name = str(recipe)
    if text_name in presets:
        return _PRESETS[text_name][1]()
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"{text_name!r} is neither a preset ({', '.join(presets)}) nor a recipe file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    unknown_tables = set(data) - {"pipeline", "pass", "stage"}
    if unknown_tables:
        raise RecipeError(f"{path}: unknown table {sorted(unknown_tables)[0]!r}; use [pipeline], [[pass]] or [[stage]]")
    raw_stages = data["stage"] if "stage" in data else [{**data.get("pipeline", {}), "pass": data.get("pass")}]
    stages = []
    for s_index, raw in enumerate(raw_stages):
        raw = dict(raw)
        entries = raw.pop("pass", None)
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f'{path}: stage {s_index + 1} has no [[pass]] tables; each needs name = "<pass>"')
        unknown = set(raw) - {"fixed_point", "max_rounds"}
        if unknown:
            raise RecipeError(f"{path}: unknown setting {sorted(unknown)[0]!r}; valid: fixed_point, max_rounds")
        specs: list[tuple[str, dict[str, Any]]] = []
        for i, entry in enumerate(entries):
            params = dict(entry)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise RecipeError(f"{path}: [[pass]] number {i + 1} has no name")
            create_pass(name, **params)  # validates the name and parameters now
            specs.append((name, params))
        stages.append(Stage(specs, bool(raw.get("fixed_point", False)), int(raw.get("max_rounds", 10))))
    return PipelineSpec(stages, name=path.stem)


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
