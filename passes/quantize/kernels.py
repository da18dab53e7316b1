"""What onnxruntime's int8 kernels compute on this machine: the u8 x s8 saturation probe (private).

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), onnxruntime's u8 x s8 GEMM
kernels (measured here on the MatMul path; QLinearConv shares the GEMM) multiply with ``VPMADDUBSW``, which
adds two ``u8 · s8`` products into a *saturating* int16: ``255 · 127 · 2 = 64770`` does
not fit, so activations near the top of their range times large weights come out wrong.
onnxruntime's own quantizer documents it (``reduce_range``), OpenVINO calls it the
saturation issue; on this project's 2-core AVX2 machine a two-MatMul model quantized with
the full int8 weight range ran with a max error of 11 where the same QDQ model computed
in float was off by 0.1. Weights on 7 bits (``[-64, 64]``) keep every pair within int16
(``255 · 64 · 2 = 32640``).

Whether the kernels saturate is a property of the CPU and the onnxruntime build, not of
the model, so it is measured, not guessed from CPU flags: a QDQ MatMul whose exact result
needs the full pair sum is run once with onnxruntime's default optimizations (integer
kernels) and compared with its exact value.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.runtime import Session

__all__ = ["FULL_LEVELS", "REDUCED_LEVELS", "integer_kernels_saturate", "probe_error", "weight_levels"]

#: Symmetric weight grid of full int8: [-127, 127].
FULL_LEVELS = 127
#: Symmetric 7-bit weight grid: [-64, 64], every ``u8 · s8`` pair sum fits an int16.
REDUCED_LEVELS = 64
_K = 64


def _probe_model(weight: int) -> onnx.ModelProto:
    """Return ``y = DQ(Q(x)) @ DQ(w_s8)`` with uint8 activations, scales 1, zero points 0, w all ``weight``."""
    w = numpy_helper.from_array(np.full((_K, 8), weight, np.int8), "w_q")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    zero_u8 = numpy_helper.from_array(np.array(0, np.uint8), "zu")
    zero_s8 = numpy_helper.from_array(np.array(0, np.int8), "zs")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zu"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "one", "zu"], ["x_f"]),
        helper.make_node("DequantizeLinear", ["w_q", "one", "zs"], ["w_f"]),
        helper.make_node("MatMul", ["x_f", "w_f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w, one, zero_u8, zero_s8],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def probe_error(weight: int) -> float:
    """Return the largest error of onnxruntime's integer kernels on the probe with weights ``weight``."""
    exact = 255.0 * weight * _K
    with Session(_probe_model(weight), optimization="default", label="saturation probe") as session:
        y = session.run({"x": np.full((1, _K), 255.0, np.float32)})["y"]
    return float(np.abs(y - exact).max())


@functools.lru_cache(maxsize=1)
def integer_kernels_saturate() -> bool:
    """Return True when onnxruntime's u8 x s8 kernels saturate pair sums on this machine."""
    return probe_error(FULL_LEVELS) > 0.5


def weight_levels(weight_range: str) -> tuple[int, str]:
    """Return the symmetric weight grid's half-width for ``weight_range`` and a note saying why.

    ``"auto"``: 7 bits when this machine's kernels saturate, else the full range;
    ``"reduced"`` / ``"full"``: as named.
    """
    if weight_range == "reduced":
        return REDUCED_LEVELS, "int8 weights on 7 bits ([-64, 64], weight_range=reduced)"
    if weight_range == "full":
        return FULL_LEVELS, (
            "int8 weights on the full range ([-127, 127], weight_range=full): on x86 CPUs without VNNI "
            "onnxruntime's u8 x s8 kernels can saturate; set weight_range=reduced for a model that ships to them"
        )
    if integer_kernels_saturate():
        return REDUCED_LEVELS, (
            "int8 weights on 7 bits ([-64, 64]): onnxruntime's u8 x s8 kernels saturate on this CPU "
            "(x86 without VNNI; measured by a probe), the full range would compute wrong values here; "
            "weight_range=full forces it for a CPU with VNNI or ARM"
        )
    return FULL_LEVELS, (
        "int8 weights on the full range ([-127, 127]): this CPU's kernels do not saturate (measured); on x86 "
        "CPUs without VNNI they can: set weight_range=reduced for a model that ships to them"
    )
