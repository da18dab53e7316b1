"""The walks of ``quantize_int8`` over candidate models: the accuracy fallback and the latency probes.

A :class:`Variant` says which nodes stay float beyond the placement rules; the pass turns
it into a :class:`Built` model (placement, rewrite) and these walks choose among them:

1. the *accuracy fallback* returns the most sensitive nodes to float in doubling steps
   until the accuracy target holds (cross-fitted over every calibration sample); the last step
   is cut to its shortest passing prefix (:func:`~onnxopt.passes.common.budget.search_smallest`);
2. the *latency probes* time the model with each group of slow-kernel candidates
   (depthwise convolutions) in float and keep the faster variant.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnxopt.passes.common.budget import judgement_notes, search_smallest
from onnxopt.passes.common.estimate import PlanCheck
from onnxopt.passes.quantize.fallback import Target, depthwise_groups, rank_by_removal
from onnxopt.passes.quantize.placement import ANCHOR_OPS, Placement
from onnxopt.passes.quantize.timing import latency_rounds, slowdown

from onnxopt.data import Dataset, Sample
from onnxopt.progress import Progress
from onnxopt.runtime import Session

__all__ = ["Built", "FallbackResult", "Variant", "accuracy_fallback", "latency_probes"]

#: Model runs the sensitivity ranking may spend: it sets how many held-out samples rank
#: the nodes (runs / candidates, at least 2). A count of runs, not of seconds, so the same
#: model and data give the same ranking on a loaded machine as on a quiet one (a time
#: budget made int8's result depend on the load). MiniLM encoder, 48 candidates, target
#: cosine>=0.995 on the embedding: ranked on all 8 held-out sentences the fallback ends at
#: 0.74x latency (agreement 0.9954), ranked on 2 at 0.80x (0.9961).
RANKING_RUNS = 256


@dataclass(frozen=True)
class Variant:
    """Which nodes of one candidate int8 model stay float beyond the placement rules."""

    #: nodes that compute in float (name → reason); their weights are still stored as int8
    float_nodes: Mapping[str, str] = field(default_factory=dict)
    #: float nodes whose weight stays float too
    float_weights: frozenset[str] = frozenset()

    def with_float(self, nodes: Mapping[str, str] | None = None, weights: Iterable[str] = ()) -> Variant:
        """Return this variant with more nodes computing in float and more float weights."""
        return Variant({**self.float_nodes, **(nodes or {})}, self.float_weights | frozenset(weights))


@dataclass(frozen=True)
class Built:
    """A variant rewritten: where Q/DQ went, the int8 model and the counts of what was inserted."""

    variant: Variant
    placement: Placement
    model: onnx.ModelProto
    counts: dict[str, int]


Build = Callable[[Variant], Built]


class OnState(Protocol):
    """Builds a variant on the shipped statistics, or on ``statistics`` (one fold's) when given."""

    def __call__(self, variant: Variant, statistics: Any = ...) -> Built:
        """Return ``variant`` placed and rewritten."""
        ...


#: the candidates the shortest-prefix search built, by prefix length, with their summaries
Tried = dict[int, tuple[Built, str]]


@dataclass(frozen=True)
class FallbackResult:
    """What the accuracy fallback ended with."""

    built: Built
    #: the nodes returned to float (compute or weight), in the order they were returned
    returned: tuple[str, ...]
    met: bool
    notes: tuple[str, ...]


def accuracy_fallback(
    work: onnx.ModelProto,
    start: Built,
    build: OnState,
    target: Target,
    check: PlanCheck[Any],
    ranking_data: Dataset,
    *,
    max_fallback: int | None = None,
    budget: Callable[[onnx.ModelProto], str | None] | None = None,
    progress: Progress,
) -> FallbackResult:
    """Return the most sensitive nodes to float, in doubling steps, until ``target`` holds.

    A node with integer kernels returns to float compute (its weight still stored as
    int8); a node that already computes in float gets its float weight back. Both kinds
    are ranked together by the output noise they remove alone, at most ``max_fallback``
    of them (None: no limit). ``budget`` (a model → the reason it is too slow, or None)
    stops the walk before the step that would make the model slower than the latency
    check allows: that step is undone and the target left unmet. ``check`` judges each
    variant as ``build(variant, statistics)`` on the statistics of each of its plans:
    cross-fitted over every calibration sample (each judged by a model calibrated
    without it) or, with few samples, on the held-out part and the fitted part alike.
    ``ranking_data`` (a few of them, as time allows) ranks the nodes on ``start``.
    """

    def judged(variant: Variant) -> tuple[bool, str]:
        return check(lambda statistics: build(variant, statistics).model)

    notes: list[str] = []
    current = start
    met, summary = judged(current.variant)
    returned: list[str] = []
    stored_int8 = set(start.placement.weight_only)
    candidates = [n for n, node in start.placement.nodes.items() if node.op_type in ANCHOR_OPS] + sorted(stored_int8)
    limit = len(candidates) if max_fallback is None else max_fallback
    stopped = False  # by the latency budget
    # as many samples as the ranking's runs allow (short inputs rank noisily on two)
    count = int(np.clip(RANKING_RUNS // max(len(candidates), 1), 2, len(ranking_data)))
    ranking = ranking_data.spaced(count)
    if not met and limit > 0:
        with Session(work, label="input model") as session:
            reference = [session.run(s) for s in ranking]
        scoped = target.scoped(reference)

    def walk(order: list[str], trial: Callable[[list[str]], Built], taken: list[str], limit: int) -> None:
        """Take ``order`` into ``taken`` in doubling steps until the target holds, the budget stops it or ``limit``."""
        nonlocal current, met, summary, stopped
        step = 1
        while not met and order and len(taken) < limit:
            batch, order = order[:step], order[step:]
            batch = batch[: limit - len(taken)]
            candidate = trial(batch)
            too_slow = budget(candidate.model) if budget is not None else None
            if too_slow:
                notes.append(
                    f"accuracy fallback stopped at {len(taken)} node(s): {len(batch)} more would make "
                    f"the model {too_slow}"
                )
                stopped = True
                return
            met, batch_summary = judged(candidate.variant)
            if met and len(batch) > 1:  # the shortest prefix of this batch that still meets the target
                tried: Tried = {len(batch): (candidate, batch_summary)}

                def prefix_passes(length: int, batch: list[str] = batch, tried: Tried = tried) -> bool:
                    shorter = trial(batch[:length])
                    ok, text = judged(shorter.variant)
                    tried[length] = (shorter, text)
                    return ok

                length = search_smallest(prefix_passes, 0, len(batch))
                batch, (candidate, batch_summary) = batch[:length], tried[length]
            taken.extend(batch)
            current = candidate
            summary = batch_summary
            step *= 2

    if not met and limit > 0:
        base = start.variant

        def probe_model(extra: set[str]) -> onnx.ModelProto:
            probe = dict.fromkeys(extra - stored_int8, "sensitivity probe")
            return build(base.with_float(probe, extra & stored_int8)).model

        with progress.task("ranking node sensitivity", len(candidates)) as task:
            gains = rank_by_removal(probe_model, candidates, ranking, scoped, task.advance)

        def trial(names: list[str]) -> Built:
            reasons = {
                name: (
                    f"accuracy fallback: alone in float it removes {gains[name]:.2e} of the output noise ({summary})"
                )
                for name in names
                if name not in stored_int8
            }
            return build(current.variant.with_float(reasons, set(names) & stored_int8))

        walk(sorted(gains, key=gains.__getitem__, reverse=True), trial, returned, limit)
    # Every node computes in float and the target still fails: what is left is the weights
    # stored as int8, so the same walk gives float weights back, most sensitive first.
    rounded = [n for n in returned if n not in current.variant.float_weights]
    if not met and not stopped and rounded and not [n for n in candidates if n not in returned]:
        after = current.variant

        def weight_probe(extra: set[str]) -> onnx.ModelProto:
            return build(after.with_float(None, extra)).model

        with progress.task("ranking weight sensitivity", len(rounded)) as task:
            weight_gains = rank_by_removal(weight_probe, rounded, ranking, scoped, task.advance)
        notes.append(
            f"every candidate computes in float and the target is still not met: the fallback gives float weights "
            f"back too ({len(rounded)} candidates, ranked by the output noise their int8 weights add)"
        )
        walk(
            sorted(weight_gains, key=weight_gains.__getitem__, reverse=True),
            lambda names: build(current.variant.with_float(None, names)),
            [],
            len(rounded),
        )
    float_weights = current.variant.float_weights
    notes.append(f"accuracy ({check.label}): {summary} (target {target.text}: {'met' if met else 'NOT met'})")
    judged(current.variant)  # the final verdict, for its metrics and intervals
    notes += judgement_notes(check)
    computed = [n for n in returned if n not in float_weights]
    if computed:
        notes.append(
            f"{len(computed)} node(s) returned to float compute by the accuracy fallback (weights still "
            "stored as int8): " + ", ".join(computed)
        )
    if float_weights:
        notes.append(
            f"{len(float_weights)} float node(s) got their float weights back from the accuracy fallback: "
            + ", ".join(sorted(float_weights))
        )
    return FallbackResult(current, tuple(returned), bool(met), tuple(notes))


def latency_probes(
    work: onnx.ModelProto, current: Built, build: Build, sample: Sample, *, threads: int | None, notes: list[str]
) -> Built:
    """Time the model with each group of slow-kernel candidates in float; return the fastest variant."""
    for label, names in depthwise_groups(work, current.placement.nodes).items():
        reason = f"latency: int8 {label} measured slower than float here"
        trial = build(current.variant.with_float(dict.fromkeys(names, reason)))
        current_s, trial_s = latency_rounds([current.model, trial.model], sample, threads=threads)
        # float for these only when int8 is measurably slower, beyond the timing noise
        measured = slowdown(trial_s, current_s)
        notes.append(
            f"latency probe, {len(names)} {label} in float: {statistics.median(trial_s) * 1e3:.2f} ms against "
            f"{statistics.median(current_s) * 1e3:.2f} ms with them in int8 ({measured.describe()})"
        )
        if measured.low > 1 / 0.98:
            current = trial
    return current
