"""Passes, their registry, recipes and the PassManager that chains them.

A pass is a class with a registry ``name``, an ``exact`` flag (True: outputs must match
the input model to float tolerance) and keyword-only constructor parameters, which are
also its recipe keys. Calling it returns a :class:`PassResult`. The core knows no
individual pass: ``onnxopt.passes`` registers them (and the presets) on import.
"""

from __future__ import annotations

from onnxopt.pipeline.manager import CheckerInstrument, Instrument, PassManager, PassRecord, PipelineResult
from onnxopt.pipeline.protocol import (
    APPLIED,
    NOT_APPLIED,
    PARTLY_APPLIED,
    STATUSES,
    Context,
    Pass,
    PassProtocol,
    PassResult,
)
from onnxopt.pipeline.recipe import PipelineSpec, Stage, load_recipe
from onnxopt.pipeline.registry import (
    _PASSES,
    _PRESETS,
    available_passes,
    available_presets,
    create_pass,
    pass_parameters,
    register_pass,
    register_preset,
)

__all__ = [
    "APPLIED",
    "NOT_APPLIED",
    "PARTLY_APPLIED",
    "STATUSES",
    "_PASSES",
    "_PRESETS",
    "CheckerInstrument",
    "Context",
    "Instrument",
    "Pass",
    "PassManager",
    "PassProtocol",
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
