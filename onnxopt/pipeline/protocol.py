"""The pass protocol: what a pass is, the context it runs in and the result it returns."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import onnx

from onnxopt.data import Dataset
from onnxopt.external import Spill
from onnxopt.progress import NullProgress, Progress

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

    def __call__(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Run the pass on ``model``."""
        ...


def pass_parameters(cls: type[Pass]) -> dict[str, Any]:
    """Return a pass class's keyword-only parameters and their defaults."""
    signature = inspect.signature(cls.__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
