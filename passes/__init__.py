"""Built-in passes (installed as ``onnxopt.passes``); importing this registers them.

One subpackage per family: ``cleanup``, ``fusion``, ``quantize``, ``prune``, ``lowrank``,
and ``common`` for what they share.
The presets are declared here, so the core never names an individual pass.
"""

from __future__ import annotations

from collections.abc import Callable

# Importing a family registers its passes.
from onnxopt.passes import cleanup, fusion, lowrank, prune, quantize  # noqa: F401

from onnxopt.pipeline import PipelineSpec, Stage, register_preset

__all__ = ["FUSE_PASSES"]

#: The exact clean-up and fusion passes, in the order the ``fuse`` preset runs them.
FUSE_PASSES = [
    "fold_constants",
    "simplify_shapes",
    "remove_identities",
    "deduplicate",
    "fold_batchnorm",
    "fold_conv_affine",
    "fuse_hardswish",
    "fuse_matmul_add",
    "fuse_layernorm",
    "fuse_gelu",
    "eliminate_dead_code",
]


def _fuse_stage() -> Stage:
    return Stage([(name, {}) for name in FUSE_PASSES], fixed_point=True, max_rounds=8)


register_preset(
    "fuse",
    "exact clean-up and layer fusion, repeated until nothing changes",
    lambda: PipelineSpec([_fuse_stage()], name="fuse"),
)
#: The lossy presets: ``fuse``, then one lossy pass (preset name, pass name, what it does).
_LOSSY_PRESETS = [
    ("int8", "quantize_int8", "fuse, then static int8 QDQ quantization with calibration and accuracy-aware fallback"),
    ("prune", "prune_magnitude", "fuse, then magnitude pruning of weights under an error budget"),
    ("lowrank", "split_lowrank", "fuse, then SVD splitting of MatMul/Gemm weights under an error budget"),
    (
        "prune_channels",
        "prune_channels",
        "fuse, then structured pruning: whole channels removed, readers re-fitted, under an error budget",
    ),
]


def _lossy_preset(preset: str, pass_name: str) -> Callable[[], PipelineSpec]:
    return lambda: PipelineSpec([_fuse_stage(), Stage([(pass_name, {})])], name=preset)


for _preset, _pass_name, _description in _LOSSY_PRESETS:
    register_preset(_preset, _description, _lossy_preset(_preset, _pass_name))

#: Weight-only presets: ``fuse``, then ``quantize_weights`` at a bit width (preset, bits, what it does).
_WEIGHT_PRESETS = [
    ("int4", 4, "fuse, then 4-bit block-wise weights (MatMulNBits; GPTQ with calibration data, RTN without)"),
    ("int8_weights", 8, "fuse, then 8-bit block-wise weights (MatMulNBits), activations float"),
]


def _weight_preset(preset: str, bits: int) -> Callable[[], PipelineSpec]:
    return lambda: PipelineSpec([_fuse_stage(), Stage([("quantize_weights", {"bits": bits})])], name=preset)


for _preset, _bits, _description in _WEIGHT_PRESETS:
    register_preset(_preset, _description, _weight_preset(_preset, _bits))
