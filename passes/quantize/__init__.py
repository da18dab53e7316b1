"""Quantization: static int8 QDQ and weight-only low-bit (MatMulNBits).

``int8`` is the pass; ``placement`` decides where Q/DQ go (where onnxruntime has integer
kernels), ``rewrite`` inserts them, ``gptq`` rounds weights on calibration inputs and
``fallback`` returns the most sensitive layers to float until the accuracy target holds.
``weights`` is the weight-only low-bit pass (math in ``nbits_math``, surgery in ``nbits_rewrite``).
"""

from __future__ import annotations

from onnxopt.passes.quantize.int8 import QuantizeInt8
from onnxopt.passes.quantize.weights import QuantizeWeights

__all__ = ["QuantizeInt8", "QuantizeWeights"]
