"""The verifier instrument: checks the model after every pass that changed something."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.data import Dataset
from onnxopt.errors import VerificationError
from onnxopt.harness.compare import compare_outputs, json_number
from onnxopt.harness.inference import infer_metrics
from onnxopt.harness.inputs import synthesize_inputs
from onnxopt.harness.judge import MetricSpec
from onnxopt.harness.vacuous import vacuous_outputs, vacuous_warning
from onnxopt.runtime import Session

log = logging.getLogger(__name__)


class Verifier:
    """PassManager instrument: check the model after every pass that changed it.

    An exact pass is compared with the model before it under the ``exact`` profile; a
    lossy pass (``exact = False``) with the original model under its own ``profile``
    attribute (default ``int8``). A failure raises :class:`VerificationError` naming the
    pass and the output. Under the ``int8`` profile the judge decides with the task
    metrics it infers from the input model (``metrics`` adds declared ones). One
    Verifier serves one pipeline run at a time.
    """

    def __init__(
        self,
        data: Dataset | None = None,
        *,
        lossy_profile: str = "int8",
        iterations: int = 2,
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        synthesize: Mapping[str, Any] | None = None,
        metrics: Sequence[MetricSpec] = (),
    ) -> None:
        self.data = data
        self.lossy_profile = lossy_profile
        self.iterations = iterations
        self.overrides = overrides
        self.synthesize = dict(synthesize or {})
        self.metrics = list(metrics)
        self._judged: list[MetricSpec] = []
        self._samples: Dataset | None = None
        self._original: list[dict[str, np.ndarray]] = []
        self._previous: list[dict[str, np.ndarray]] = []
        #: what the last run found: passes verified (in order) and vacuous reference outputs
        self.checked: list[str] = []
        self.warnings: list[str] = []

    @property
    def sample_count(self) -> int:
        """Return how many samples the last run compared on."""
        return len(self._samples) if self._samples is not None else 0

    def before_pipeline(self, model: onnx.ModelProto, ctx: Any) -> None:
        """Run the model as it enters the pipeline; its outputs are the references."""
        samples = self.data
        if samples is None and getattr(ctx, "calibration", None) is not None:
            samples = ctx.calibration.split()[1]
        if samples is None:
            samples = synthesize_inputs(model, **{"iterations": self.iterations, **self.synthesize})
        self._samples = samples
        with Session(model, label="input model") as session:
            self._original = [session.run(s) for s in samples]
        self._previous = self._original
        self._judged = infer_metrics(model, self._original, declared=self.metrics)
        self.checked = []
        self.warnings = [
            vacuous_warning(name, what, samples.source == "synthesized")
            for name, what in vacuous_outputs(self._original).items()
        ]

    def after_pass(self, pass_: Any, record: Any, model: onnx.ModelProto, ctx: Any) -> None:
        """Compare the pass's output; raise VerificationError if it broke equivalence."""
        if not record.changed or self._samples is None:
            return
        with Session(model, label=f"output of pass {pass_.name!r}") as session:
            outputs = [session.run(s) for s in self._samples]
        exact = bool(getattr(pass_, "exact", True))
        profile = "exact" if exact else getattr(pass_, "profile", self.lossy_profile)
        against = self._previous if exact else self._original
        judged = self._judged if profile == "int8" else self.metrics if not exact else []
        result = compare_outputs(
            against, outputs, profile=profile, overrides=self.overrides, metrics=judged, inputs=list(self._samples)
        )
        record.checks["verify"] = {
            "profile": profile,
            "passed": result.passed,
            "outputs": {
                o.name: {"max_abs": o.max_abs, "cosine": o.cosine, "sqnr_db": json_number(o.sqnr_db)}
                for o in result.outputs
            },
            "metrics": [m.to_dict() for m in result.metrics],
        }
        if not result.passed:
            failing = result.problems + [f"{o.name}: {'; '.join(o.reasons)}" for o in result.outputs if not o.passed]
            raise VerificationError(
                f"pass {pass_.name!r} broke equivalence ({profile} profile): {failing[0]}",
                pass_name=pass_.name,
                report=result,
            )
        self._previous = outputs
        self.checked.append(pass_.name)
