"""The registry of passes and presets, filled by ``onnxopt.passes`` on import."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onnxopt.errors import RecipeError
from onnxopt.params import coerce_param
from onnxopt.pipeline.protocol import Pass, pass_parameters

if TYPE_CHECKING:
    from onnxopt.pipeline.recipe import PipelineSpec

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
