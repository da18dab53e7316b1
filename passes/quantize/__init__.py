"""Quantization: static int8 QDQ.

``int8`` is the pass; ``placement`` decides where Q/DQ go (where onnxruntime has integer
kernels), ``rewrite`` inserts them, ``gptq`` rounds weights on calibration inputs and
``fallback`` returns the most sensitive layers to float until the accuracy target holds.
"""

from __future__ import annotations

from onnxopt.passes.quantize.int8 import QuantizeInt8

__all__ = ["QuantizeInt8"]
