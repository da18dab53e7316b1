"""Exact clean-up passes: constant folding, shape simplification, no-op removal, deduplication, dead code.

``passes`` holds the pass classes (``deduplicate`` the one that merges repeats);
``evaluate`` runs single nodes for folding, ``inline`` inlines constant-condition ``If``
bodies, ``noops`` lists the no-op rules and ``shapes`` propagates shape values.
"""

from __future__ import annotations

from onnxopt.passes.cleanup.deduplicate import Deduplicate
from onnxopt.passes.cleanup.passes import (
    EliminateDeadCode,
    FoldConstants,
    RemoveIdentities,
    SimplifyShapes,
)

__all__ = ["Deduplicate", "EliminateDeadCode", "FoldConstants", "RemoveIdentities", "SimplifyShapes"]
