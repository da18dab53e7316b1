"""Low rank: whitened SVD splitting of MatMul/Gemm weights and joint narrowing of attention heads.

``split`` is the pass, ``plan`` its plan and rewrite, ``ranks`` the rank allocation math,
``heads`` the joint QKᵀ head narrowing.
"""

from __future__ import annotations

from onnxopt.passes.lowrank.split import SplitLowRank

__all__ = ["SplitLowRank"]
