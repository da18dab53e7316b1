"""Recipes: stages of passes with their parameters, from a preset name or a TOML file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxopt.errors import RecipeError
from onnxopt.pipeline.registry import _PRESETS, available_passes, available_presets, create_pass, pass_parameters

if TYPE_CHECKING:
    from onnxopt.pipeline.manager import PassManager

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


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
        from onnxopt.pipeline.manager import PassManager  # the manager imports recipes

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
