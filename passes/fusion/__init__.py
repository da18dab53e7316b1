"""Exact fusions: Conv/ConvTranspose+BatchNorm, Conv+Mul/Add, MatMul+Add→Gemm, LayerNorm, GELU, HardSwish.

``base`` is the fusion pass base class, ``match`` the small matcher that names why a rule
did not fire, ``patterns`` the sub-patterns several rules share, ``affine_math`` the pure
folding math, ``affine_folds`` and ``activations`` the rules.
"""

from __future__ import annotations

from onnxopt.passes.fusion.activations import FuseGelu, FuseHardSwish, FuseLayerNorm
from onnxopt.passes.fusion.affine_folds import FoldBatchNorm, FoldConvAffine, FuseMatMulAdd

__all__ = ["FoldBatchNorm", "FoldConvAffine", "FuseGelu", "FuseHardSwish", "FuseLayerNorm", "FuseMatMulAdd"]
