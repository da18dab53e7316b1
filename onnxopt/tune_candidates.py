"""The recipes ``onnxopt tune`` tries: the registered presets and variants of their main parameters.

Every candidate is a plain recipe (stages of pass names and parameters), so the winner can
be written as a TOML file that ``onnxopt optimize --pipeline`` replays exactly. The list
is built from the registry (``available_presets``): a preset that is not registered (the
weight-only ``int8_weights``/``int4`` presets before they land) is simply absent, and a
preset that cannot apply to the model (channel pruning without a Conv) is left out with
its reason, so the report shows why it was not tried.

Every candidate runs with the passes' own latency checks off (tune times each one itself,
see :func:`_untimed`), so a candidate is a deterministic function of model, data and seed.

Variants come in *ladders*: the same recipe at decreasing strength (a larger pruning
ratio first). The search stops a ladder early: once a rung meets the target, the weaker
rungs cannot be faster or smaller; once a rung misses it, the stronger ones would miss too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxopt.pipeline import PipelineSpec, Stage, available_passes, available_presets, load_recipe, pass_parameters

__all__ = ["Candidate", "CandidateList", "build_candidates", "recipe_toml", "scoped_target_floors"]

#: Structured pruning ratios tried before int8, strongest first (one ladder).
PRUNE_RATIOS = (0.3, 0.15)

#: Pass parameters naming the accuracy target, and how a target's floors map to budget fields.
_BUDGET_FIELDS = {"cosine": "min_cosine", "sqnr": "min_sqnr_db", "top1": "min_top1"}

StageSpec = tuple[tuple[tuple[str, tuple[tuple[str, Any], ...]], ...], bool, int]


@dataclass(frozen=True)
class Candidate:
    """One recipe to try: a name for the table, its stages, and its place in a ladder.

    ``ladder`` names the group of variants it belongs to (empty: none) and ``strength``
    orders them (higher: more aggressive, tried first).
    """

    name: str
    stages: tuple[StageSpec, ...]
    ladder: str = ""
    strength: float = 0.0
    preset: str = ""

    def spec(self) -> PipelineSpec:
        """Return the recipe as a :class:`PipelineSpec`."""
        return PipelineSpec(
            [
                Stage([(name, dict(params)) for name, params in passes], fixed_point, max_rounds)
                for passes, fixed_point, max_rounds in self.stages
            ],
            name=self.name,
        )

    def to_toml(self) -> str:
        """Return the recipe as TOML that :func:`onnxopt.load_recipe` reads back to the same spec."""
        return recipe_toml(self.spec(), title=self.name)


@dataclass(frozen=True)
class CandidateList:
    """The candidates to try, in order, and the presets left out with the reason."""

    candidates: tuple[Candidate, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)


def _frozen(spec: PipelineSpec) -> tuple[StageSpec, ...]:
    return tuple(
        (
            tuple((name, tuple(sorted(params.items()))) for name, params in stage.passes),
            stage.fixed_point,
            stage.max_rounds,
        )
        for stage in spec.stages
    )


def scoped_target_floors(target: str) -> tuple[dict[str, float], tuple[str, ...]]:
    """Return a target's floors by metric (cosine, sqnr, top1) and the outputs it is scoped to."""
    terms, _, scope = target.partition("@")
    floors: dict[str, float] = {}
    for term in terms.split(","):
        if not term.strip():
            continue
        metric, sep, value = term.partition(">=")
        metric = metric.strip()
        if not sep or metric not in _BUDGET_FIELDS:
            raise ValueError(f"target term {term.strip()!r}: expected cosine>=X, sqnr>=DB or top1>=X")
        try:
            floors[metric] = float(value)
        except ValueError:
            raise ValueError(f"target term {term.strip()!r}: {value.strip()!r} is not a number") from None
    if not floors:
        raise ValueError(f"empty target {target!r}")
    return floors, tuple(n.strip() for n in scope.split("|") if n.strip())


def _with_target(spec: PipelineSpec, target: str | None) -> PipelineSpec:
    """Give every lossy pass the user's target: as ``target``, or as ``budget`` floors when unscoped.

    The task target (``"task"``, the default) is every lossy pass's own default, so it is
    left implicit; judge metric syntax (``OUTPUT:NAME>=FLOOR``) has no pass parameter form,
    so the passes keep their task default and only tune's judge applies those metrics.
    """
    if target is None or target.strip() == "task" or ":" in target.partition("@")[0]:
        return spec
    floors, outputs = scoped_target_floors(target)
    passes = available_passes()
    stages = []
    for stage in spec.stages:
        updated = []
        for name, params in stage.passes:
            valid = pass_parameters(passes[name]) if name in passes else {}
            merged = dict(params)
            if "target" in valid:
                merged["target"] = target
            elif "budget" in valid and not outputs:
                merged["budget"] = {_BUDGET_FIELDS[k]: v for k, v in floors.items()}
            updated.append((name, merged))
        stages.append(Stage(updated, stage.fixed_point, stage.max_rounds))
    return PipelineSpec(stages, name=spec.name)


def _untimed(spec: PipelineSpec) -> PipelineSpec:
    """Turn off the passes' own latency checks (``check_latency=False``): tune times every candidate itself.

    A pass's latency check decides by timing (int8 keeps the float model when it measures
    int8 slower, and its fallback stops when a model gets slower), so the same recipe could
    give another model on a replay. Tune measures latency better anyway: interleaved against
    the float model, one candidate at a time, with no build running beside it. Without the
    check every candidate is a deterministic function of the model, data and seed, and the
    winning recipe replays to the same bytes.
    """
    passes = available_passes()
    stages = []
    for stage in spec.stages:
        updated = []
        for name, params in stage.passes:
            if name in passes and "check_latency" in pass_parameters(passes[name]):
                params = {**params, "check_latency": False}
            updated.append((name, dict(params)))
        stages.append(Stage(updated, stage.fixed_point, stage.max_rounds))
    return PipelineSpec(stages, name=spec.name)


def _with_params(spec: PipelineSpec, pass_name: str, params: Mapping[str, Any]) -> PipelineSpec:
    stages = [
        Stage([(n, {**p, **params} if n == pass_name else dict(p)) for n, p in s.passes], s.fixed_point, s.max_rounds)
        for s in spec.stages
    ]
    return PipelineSpec(stages, name=spec.name)


def _then(first: PipelineSpec, second: PipelineSpec) -> PipelineSpec:
    """Return ``first`` followed by the lossy stages of ``second`` (its leading fuse stage dropped)."""
    return PipelineSpec([*first.stages, *second.stages[1:]], name=f"{first.name}+{second.name}")


def _model_facts(model: onnx.ModelProto) -> dict[str, bool]:
    weights = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = {n.op_type for n in model.graph.node}
    weighted_matmul = any(
        n.op_type in ("MatMul", "Gemm") and any(i in weights or i in constants for i in n.input)
        for n in model.graph.node
    )
    return {"conv": "Conv" in ops, "matmul": weighted_matmul}


def build_candidates(model: onnx.ModelProto, *, target: str | None = None) -> CandidateList:
    """Return the candidate recipes for ``model``, in the order the search tries them.

    The presets come first, cheap and likely winners leading (``fuse``, the floor;
    ``int8``; channel pruning and pruning then int8), so the default budget covers every
    preset a user would try by hand; variants of their parameters follow, and magnitude
    pruning (zeros onnxruntime still computes) comes last.
    """
    presets = available_presets()
    facts = _model_facts(model)
    skipped: dict[str, str] = {}
    found: list[Candidate] = []

    def add(name: str, spec: PipelineSpec, *, ladder: str = "", strength: float = 0.0, preset: str = "") -> None:
        spec = _untimed(_with_target(spec, target))
        found.append(Candidate(name, _frozen(spec), ladder=ladder, strength=strength, preset=preset))

    add("fuse", load_recipe("fuse"), preset="fuse")
    has_int8 = "int8" in presets
    if has_int8:
        add("int8", load_recipe("int8"), preset="int8")
    channels = load_recipe("prune_channels") if "prune_channels" in presets else None
    if channels is not None and not facts["conv"]:
        skipped["prune_channels"] = "no Conv (structured channel pruning has nothing to remove)"
        channels = None
    if channels is not None:
        add("prune_channels", channels, preset="prune_channels")
        if has_int8:
            add("prune_channels+int8", _then(channels, load_recipe("int8")))
    for low_bit in ("int8_weights", "int4"):
        if low_bit not in presets:
            continue
        if facts["matmul"]:
            add(low_bit, load_recipe(low_bit), preset=low_bit)
        else:
            skipped[low_bit] = "no MatMul/Gemm with a constant weight (weight-only quantization has nothing to do)"
    if "lowrank" in presets:
        if facts["matmul"]:
            add("lowrank", load_recipe("lowrank"), preset="lowrank")
        else:
            skipped["lowrank"] = "no MatMul/Gemm with a constant weight"
    # Variants of the presets' main parameters, after every preset.
    if has_int8:
        int8 = load_recipe("int8")
        add("int8 no fallback", _with_params(int8, "quantize_int8", {"max_fallback": 0}))
        if facts["conv"]:
            add("int8 depthwise", _with_params(int8, "quantize_int8", {"depthwise": True}))
        if facts["matmul"]:
            add("int8 MatMul only", _with_params(int8, "quantize_int8", {"op_types": ["MatMul"]}))
    if channels is not None and has_int8:
        for ratio in PRUNE_RATIOS:
            fixed = _with_params(channels, "prune_channels", {"ratio": ratio})
            add(f"prune_channels {ratio:g}+int8", _then(fixed, load_recipe("int8")), ladder="prune_channels+int8",
                strength=ratio)  # fmt: skip
    if "prune" in presets:
        add("prune", load_recipe("prune"), preset="prune")
    named = {c.preset for c in found if c.preset}
    for preset in presets:
        if preset not in named and preset not in skipped:
            skipped[preset] = "not a candidate tune knows how to try"
    return CandidateList(tuple(found), skipped)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a recipe")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"cannot write a {type(value).__name__} parameter to a recipe")


def recipe_toml(spec: PipelineSpec, *, title: str = "") -> str:
    """Return ``spec`` as a TOML recipe of ``[[stage]]`` tables (parameters left at None are omitted)."""
    lines = [f"# onnxopt recipe: {title or spec.name}"] if title or spec.name else []
    for stage in spec.stages:
        lines += ["", "[[stage]]", f"fixed_point = {_toml_value(stage.fixed_point)}"]
        lines.append(f"max_rounds = {stage.max_rounds}")
        for name, params in stage.passes:
            lines += ["[[stage.pass]]", f"name = {_toml_value(name)}"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in params.items() if value is not None]
    return "\n".join(lines) + "\n"
