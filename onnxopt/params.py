"""Typed pass parameters: ``--param NAME=VALUE`` text parsed against the pass's declared type.

A pass declares its parameters as annotated keyword-only constructor arguments
(``per_channel: bool = True``). Text from the command line is parsed against that
annotation, so ``check_latency=False`` is the boolean False (not the non-empty, truthy
string "False") and ``per_channel=maybe`` or ``holdout=abc`` is an error naming the
parameter, the value and what is accepted. Values from a TOML recipe are already typed;
they are checked against the same annotation.

Understood annotations are unions of ``None``, ``bool``, ``int``, ``float``, ``str`` and
``Sequence[str]``/``list[str]``/``tuple[str, ...]``; any other annotation (a callable, a
budget mapping) takes the text as JSON when it parses and as a string otherwise.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from onnxopt.errors import RecipeError

__all__ = ["ParamText", "coerce_param", "parse_bool"]

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_SIMPLE = {"None", "bool", "int", "float", "str", "strs"}


class ParamText(str):
    """A parameter value as typed on the command line, not yet parsed against the pass's type."""

    __slots__ = ()


def parse_bool(text: str) -> bool | None:
    """Return the boolean that ``text`` spells (true/false, yes/no, 1/0, on/off, any case), else None."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def _kinds(annotation: object) -> set[str] | None:
    """Return the simple kinds a string annotation allows, or None when it is not only simple kinds."""
    if annotation is inspect.Parameter.empty or not isinstance(annotation, str):
        return None
    kinds = set()
    for part in _split_union(annotation):
        if re.fullmatch(r"(Sequence|list|tuple)\[str(, \.\.\.)?\]", part):
            kinds.add("strs")
        else:
            kinds.add(part)
    return kinds if kinds <= _SIMPLE else None


def _split_union(annotation: str) -> list[str]:
    """Split ``A | B[C | D] | None`` at the top-level bars."""
    parts, depth, current = [], 0, ""
    for char in annotation:
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def _accepted(kinds: set[str]) -> str:
    words = {
        "bool": "true/false (also yes/no, 1/0)",
        "int": "an integer",
        "float": "a number",
        "str": "text",
        "strs": "a list of names (a,b or a JSON list)",
        "None": "none",
    }
    order = ["bool", "int", "float", "strs", "str", "None"]
    return " or ".join(words[k] for k in order if k in kinds and not (k == "int" and "float" in kinds))


def _parse_text(text: str, kinds: set[str]) -> tuple[bool, Any]:
    """Return (ok, value) for command-line ``text`` of a parameter allowing ``kinds``."""
    stripped = text.strip()
    if "None" in kinds and stripped.lower() in ("none", "null"):
        return True, None
    if "bool" in kinds:
        flag = parse_bool(stripped)
        if flag is not None:
            return True, flag
    if "int" in kinds and re.fullmatch(r"[+-]?\d+", stripped):
        return True, int(stripped)
    if "float" in kinds:
        try:
            number = float(stripped)
        except ValueError:
            pass
        else:
            if number == number:  # not NaN: no parameter means "not a number"
                return True, number
    if "strs" in kinds:
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError:
                return False, None
            if isinstance(items, list) and all(isinstance(i, str) for i in items):
                return True, items
            return False, None
        return True, [item.strip() for item in stripped.split(",") if item.strip()]
    if "str" in kinds:
        return True, text
    return False, None


def _fits(value: Any, kinds: set[str]) -> bool:
    """Return True when an already-typed value (from TOML or Python) fits ``kinds``."""
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    if isinstance(value, list | tuple):
        return "strs" in kinds and all(isinstance(v, str) for v in value)
    return False


def coerce_param(pass_name: str, cls: type, name: str, value: Any) -> Any:
    """Return ``value`` for parameter ``name`` of pass ``cls``, parsed or checked against its annotation.

    Raises :class:`RecipeError` naming the parameter, the value and what is accepted.
    """
    parameter = inspect.signature(cls.__init__).parameters.get(name)  # type: ignore[misc]
    kinds = _kinds(parameter.annotation) if parameter is not None else None
    if kinds is None:
        if not isinstance(value, ParamText):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return str(value)
    if isinstance(value, ParamText):
        ok, parsed = _parse_text(str(value), kinds)
        if ok:
            return parsed
        raise RecipeError(f"--param {name}={value}: pass {pass_name!r} accepts {_accepted(kinds)} for {name}")
    if _fits(value, kinds):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) and "int" not in kinds else value
    raise RecipeError(f"{name} = {value!r}: pass {pass_name!r} accepts {_accepted(kinds)} for {name}")
