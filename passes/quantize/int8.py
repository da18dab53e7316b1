"""Static int8 quantization in QDQ form, placed where onnxruntime's CPU kernels pay off.

The pass is a short sequence of separate steps, each in its own module:

1. *placement* (``placement``): which nodes become integer kernels and therefore
   which activations, weights and biases are quantized (rules in that module);
2. *calibration* (:mod:`onnxopt.calibration`): streaming observers over the calibration
   part of ``ctx.calibration``, then the pure math from statistics to scale/zero point;
3. *rewriting* (``rewrite``): Q/DQ pairs, int8 per-channel weights, int32 biases;
4. *accuracy fallback* and *latency check* (``fallback``): judged cross-fitted over every
   calibration sample, the most sensitive nodes return to float until the target holds; depthwise convolutions
   whose int8 kernel is slower return to float when timing says so; then the int8 model
   is timed against the float one; if it is slower, the pass keeps the float model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
from onnxopt.passes.common.budget import HeldOutCheck
from onnxopt.passes.common.estimate import (
    DEFAULT_FOLDS,
    CrossFittedCheck,
    HeldOutPlanCheck,
    PlanCheck,
    estimate_notes,
    plan_check,
)
from onnxopt.passes.common.graphs import opset_version, upgrade_opset
from onnxopt.passes.quantize.backoff import Built, Variant, accuracy_fallback, latency_probes
from onnxopt.passes.quantize.fallback import DEFAULT_TARGET, Target, parse_target
from onnxopt.passes.quantize.gptq import round_weights
from onnxopt.passes.quantize.kernels import weight_levels
from onnxopt.passes.quantize.notes import float_model_notes, kept_float_notes, mixed_range_concats
from onnxopt.passes.quantize.placement import ANCHOR_OPS, DEFAULT_OP_TYPES, place
from onnxopt.passes.quantize.ranges import RangeSettings, calibrate_ranges
from onnxopt.passes.quantize.rewrite import QDQPlan, Rounded, apply_plan
from onnxopt.passes.quantize.saturation import saturation_bounds
from onnxopt.passes.quantize.timing import latency_verdict, not_slower_than

from onnxopt.calibration import METHODS, QuantParams, affine_qparams
from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError, OnnxoptError
from onnxopt.graph import NameGenerator, nested_ops
from onnxopt.model import serialized_size
from onnxopt.normalize import infer_shapes
from onnxopt.pipeline import APPLIED, NOT_APPLIED, PARTLY_APPLIED, Context, Pass, PassResult, register_pass

__all__ = ["QuantizeInt8"]

log = logging.getLogger(__name__)

_MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13
#: counts of apply_plan that mean the model changed (int8 weights, tables, Q/DQ pairs)
_INSERTED = ("weights_quantized", "biases_quantized", "tables_quantized", "activations_quantized", "lookup_tables")


def _name_nodes(model: onnx.ModelProto) -> None:
    names = NameGenerator(model)
    seen: set[str] = set()
    for node in model.graph.node:
        if not node.name or node.name in seen:
            node.name = names.fresh(node.name or node.op_type)
        seen.add(node.name)


@dataclass(frozen=True)
class _Calibrated:
    """What calibration decided once per run: activation ranges, blocked tensors, rounded weights."""

    ranges: dict[str, tuple[float, float]]
    blocked: dict[str, str]
    rounded: Rounded = field(default_factory=dict)
    levels: int = 127
    stats: dict[str, Any] = field(default_factory=dict)  # calibration time, memory, samples
    notes: tuple[str, ...] = ()


@register_pass
class QuantizeInt8(Pass):
    """Quantize weights to int8 and activations to uint8/int8 with QDQ, checked and timed.

    Matches: Conv, ConvTranspose, Gemm and MatMul (per-channel symmetric int8 weights from
    initializers or Constant nodes, int32 biases) and the ops between them that keep the
    integer flow (see ``placement``); embedding tables become int8 rows.
    Produces: QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer
    kernels; an opset upgrade to 13 when per-channel weights need it.
    Must not fire on: tensors read as integer/shape logic, graph outputs, tensors holding
    non-finite values, Concats of mismatched ranges, nodes the user excludes. Without
    calibration data it refuses with :class:`CalibrationDataError`.

    ``target`` (default ``"task"``: the judge's task metrics inferred for each output,
    against the float model, judged ``estimate_folds``-fold cross-fitted: every calibration
    sample by a model calibrated (ranges, rounded weights) without it, the shipped model
    calibrated on all; with fewer than ``2·estimate_folds`` samples or ``estimate_folds``
    below 2, on the held-out ``holdout`` fraction and in-sample on the rest; a string
    such as ``"cosine>=0.995,sqnr>=20@name"`` sets signal floors, scoped to some
    outputs with ``@``) drives the fallback: the most sensitive nodes return to float
    compute, then (ranked together) the weights of float nodes to float, at most
    ``max_fallback`` of them (default: no limit).
    ``weight_only`` (default True): a layer kept float (by a rule or by the fallback) still
    stores its weight as int8, read through Cast and Mul that onnxruntime folds when the
    session starts (MiniLM: file 0.44 -> 0.26 of float at the same accuracy; PP-OCR det
    with 50 such convs: 30.1 ms, against 42.5 ms with a DequantizeLinear there).
    ``weight_range`` (default ``"auto"``): every int8 weight of the pass on 7 bits where
    onnxruntime's u8 x s8 kernels saturate on this CPU (x86 without VNNI, measured; see
    ``kernels``; weights of float-compute layers too, which would not need it), else the
    full int8 range; ``"reduced"``/``"full"`` force one.
    ``weight_rounding`` (default ``"gptq"``): weights are rounded to compensate each
    other's error on the calibration inputs (``gptq``; PP-OCR det, weights int8
    and activations float: IoU 0.968 nearest, 0.989 GPTQ); ``"nearest"`` rounds each alone.
    ``depthwise`` (default False): depthwise convolutions compute in float (see
    ``placement.place``); True quantizes them like any Conv.
    ``check_latency`` first times depthwise convolutions in float against int8 (larger
    than 3x3, then all; only with ``depthwise=True``) and keeps what is faster, then
    times float vs int8 (``threads`` intra-op threads, 1 by default so the figure is stable
    on a shared machine) and keeps the float model if int8 is > 3 % slower than the
    pipeline's starting model (``latency_reference="source"``, the default: a preset that
    fuses first must not hand the user a model slower than theirs, but the fusion's gain
    may pay for int8's smaller file) or than this pass's own input (``"input"``).
    ``method`` defaults to ``"mse"``: on PP-OCR det (held-out IoU of the text maps) it scored
    0.928 against minmax 0.897, percentile 0.904 and entropy 0.833. ``saturation_aware``
    (default True) chooses the range of a tensor read only by HardSwish/Relu/HardSigmoid/Clip
    on its values clamped to what those readers distinguish (PP-OCR det, no fallback: IoU
    0.858 -> 0.904). The cross-fitted verdict of the final model (after the latency
    probes) is reported with its interval (see ``passes/common/estimate.py``).
    """

    name: ClassVar[str] = "quantize_int8"
    exact: ClassVar[bool] = False
    profile: ClassVar[str] = "int8"

    def __init__(
        self,
        *,
        method: str = "mse",
        per_channel: bool = True,
        activation_type: str = "uint8",
        op_types: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        target: str | Callable[..., bool] | None = DEFAULT_TARGET,
        holdout: float = 0.25,
        check_latency: bool = True,
        max_fallback: int | None = None,
        percentile: float = 99.999,
        averaging_constant: float | None = None,
        mixed_range_ratio: float = 32.0,
        threads: int | None = 1,
        weight_only: bool = True,
        saturation_aware: bool = True,
        weight_rounding: str = "gptq",
        depthwise: bool = False,
        latency_reference: str = "source",
        estimate_folds: int = DEFAULT_FOLDS,
        weight_range: str = "auto",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type must be 'uint8' or 'int8', not {activation_type!r}")
        if weight_rounding not in ("gptq", "nearest"):
            raise ValueError(f"weight_rounding must be 'gptq' or 'nearest', not {weight_rounding!r}")
        if weight_range not in ("auto", "full", "reduced"):
            raise ValueError(f"weight_range must be 'auto', 'full' or 'reduced', not {weight_range!r}")
        if latency_reference not in ("source", "input"):
            raise ValueError(f"latency_reference must be 'source' or 'input', not {latency_reference!r}")
        if not 0 <= holdout < 1:
            raise ValueError("holdout must be in [0, 1)")
        parse_target(target)  # validates early
        self.method = method
        self.per_channel = per_channel
        self.activation_type = activation_type
        self.op_types = list(op_types) if op_types is not None else None
        self.exclude = list(exclude)
        self.target = target
        self.holdout = holdout
        self.check_latency = check_latency
        self.max_fallback = max_fallback
        self.percentile = percentile
        self.averaging_constant = averaging_constant
        self.mixed_range_ratio = mixed_range_ratio
        self.threads = threads
        self.weight_only = weight_only
        self.saturation_aware = saturation_aware
        self.weight_rounding = weight_rounding
        self.depthwise = depthwise
        self.latency_reference = latency_reference
        self.estimate_folds = estimate_folds
        self.weight_range = weight_range

    # ------------------------------------------------------------------ steps

    def _calibrate(
        self, model: onnx.ModelProto, tensors: list[str], data: Dataset, ctx: Context, stats: dict[str, Any]
    ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
        """Return calibrated ranges and the tensors blocked (tensor → reason)."""
        bounds = saturation_bounds(model, tensors) if self.saturation_aware else {}
        stats["ranges_saturation_clamped"] = len(bounds)
        observe = RangeSettings(self.method, np.dtype(self.activation_type), self.percentile, self.averaging_constant)
        return calibrate_ranges(model, tensors, data, observe, bounds, stats, progress=ctx.progress)

    def _build(self, model: onnx.ModelProto, state: _Calibrated, variant: Variant) -> Built:
        """Return ``variant`` placed and rewritten."""
        ranges, blocked = state.ranges, state.blocked
        op_types = self.op_types if self.op_types is not None else DEFAULT_OP_TYPES
        common: dict[str, Any] = {
            "op_types": op_types,
            "exclude": self.exclude,
            "per_channel": self.per_channel,
            "weight_only": self.weight_only,
            "float_weights": variant.float_weights,
            "depthwise": self.depthwise,
        }
        float_nodes = dict(variant.float_nodes)
        placement = place(model, float_nodes=float_nodes, blocked=blocked, **common)
        mixed = mixed_range_concats(placement, ranges, self.mixed_range_ratio)
        if mixed:
            outputs = {placement.nodes[name].output[0]: reason for name, reason in mixed.items()}
            placement = place(model, float_nodes={**float_nodes, **mixed}, blocked={**blocked, **outputs}, **common)
        dtype = np.dtype(self.activation_type)
        params: dict[str, QuantParams] = {t: affine_qparams(*ranges[t], dtype) for t in placement.tensors}
        for node in placement.nodes.values():  # Concat inputs read only by it share its scale
            if node.op_type == "Concat" and node.output[0] in params:
                for tensor in node.input:
                    if tensor in params and sum(tensor in n.input for n in model.graph.node) == 1:
                        low = min(ranges[t][0] for t in node.input if t in ranges)
                        high = max(ranges[t][1] for t in node.input if t in ranges)
                        params[tensor] = params[node.output[0]] = affine_qparams(low, high, dtype)
        quantized, counts = apply_plan(model, QDQPlan(placement, params, state.rounded, state.levels))
        return Built(variant, placement, quantized, counts)

    # ------------------------------------------------------------------ run

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Quantize ``model``; see the class docstring."""
        if ctx.calibration is None or not len(ctx.calibration):
            raise CalibrationDataError(
                "int8 quantization needs calibration data: pass --calib data.npz (a few dozen representative "
                "inputs, stacked on a new first axis) or set Context.calibration"
            )
        notes: list[str] = []
        stats: dict[str, Any] = {"bytes_before": serialized_size(model)}
        nested = nested_ops(model.graph, ANCHOR_OPS)
        if nested:
            notes.append(
                f"left {nested} node(s) inside If/Loop/Scan bodies in float (only the main graph is quantized)"
            )
        target: Target | None = parse_target(self.target) if self.target is not None else None
        outputs = [o.name for o in model.graph.output]
        unknown = [name for name in (target.outputs if target else ()) if name not in outputs]
        if unknown:
            raise OnnxoptError(
                f"the accuracy target names output(s) {', '.join(unknown)} that the model does not "
                f"have; its outputs are {', '.join(outputs)}"
            )
        work = model
        if self.per_channel and opset_version(model) < _MIN_OPSET:
            work = upgrade_opset(
                model,
                _MIN_OPSET,
                needed_for="per-channel DequantizeLinear",
                otherwise="weights per tensor",
                notes=notes,
            )
        per_channel_ok = self.per_channel and opset_version(work) >= _MIN_OPSET
        _name_nodes(work)
        if not work.graph.value_info:
            work, shape_note = infer_shapes(work)
            if shape_note:
                notes.append(shape_note)
        first = place(
            work,
            op_types=self.op_types or DEFAULT_OP_TYPES,
            exclude=self.exclude,
            per_channel=bool(per_channel_ok),
            depthwise=self.depthwise,
        )
        if not (first.nodes or first.weight_only or first.tables or first.lookups):
            causes = sorted(set(first.float_reasons.values()))
            reason = "no node can be quantized" + (f" ({'; '.join(causes[:3])})" if causes else "")
            notes += kept_float_notes(first.float_reasons)
            return PassResult(model, False, stats, float_model_notes(notes, model), NOT_APPLIED, reason)
        levels, levels_note = weight_levels(self.weight_range)
        stats["weight_levels"] = levels

        def fit(data: Dataset) -> _Calibrated:
            return self._fit(work, first.observed, data, ctx, bool(per_channel_ok), levels)

        check: PlanCheck[_Calibrated] | None = None
        folds = self.estimate_folds
        if target is not None and folds >= 2 and len(ctx.calibration) >= 2 * folds:
            state, check = plan_check(work, ctx.calibration, fit, target, folds)
        elif target is not None and len(ctx.calibration) >= 4 and self.holdout > 0:
            calib, held = ctx.calibration.split(self.holdout)
            state = fit(calib)
            check = HeldOutPlanCheck(HeldOutCheck(work, list(held), target, fitted=list(calib)), state)
        else:
            state = fit(ctx.calibration)
        stats.update(state.stats)
        notes += state.notes

        def build(variant: Variant, on: _Calibrated = state) -> Built:
            return self._build(work, on, variant)

        built = build(Variant())
        returned: tuple[str, ...] = ()
        if target is not None and check is not None:
            fallback = accuracy_fallback(
                work,
                built,
                build,
                target,
                check,
                ctx.calibration,
                max_fallback=self.max_fallback,
                budget=self._latency_budget(work, ctx),
                progress=ctx.progress,
            )
            notes += fallback.notes
            stats["target_met"] = int(fallback.met)
            built, returned = fallback.built, fallback.returned
            if not fallback.met:
                # an int8 model outside its accuracy target is not a result: keep the float model
                stats["fallback_nodes"] = len(returned)
                if any(n.startswith("accuracy fallback stopped") for n in fallback.notes):
                    why = "the latency budget stopped the fallback; loosen --target or set check_latency=false"
                elif self.max_fallback is not None and len(returned) >= self.max_fallback:
                    why = f"max_fallback={self.max_fallback} reached; raise it or loosen --target"
                else:
                    why = "not even with every candidate node and weight back in float; loosen --target"
                notes.append(f"kept the float model: the accuracy target was not met ({why})")
                reason = f"accuracy target {self.target} not met within the fallback's limits; the float model is kept"
                return PassResult(model, False, stats, float_model_notes(notes, model), NOT_APPLIED, reason)

        if self.check_latency:
            built = latency_probes(work, built, build, ctx.calibration[0], threads=self.threads, notes=notes)
        placement, quantized, counts = built.placement, built.model, built.counts
        stats.update(counts)
        stats["nodes_quantized"] = len(placement.nodes)
        stats["nodes_kept_float"] = len(placement.float_reasons)
        stats["fallback_nodes"] = len(returned)
        stats["weight_only_nodes"] = len(placement.weight_only)
        stats["bytes_after"] = serialized_size(quantized)
        reference = ctx.reference if self.latency_reference == "source" else None
        kept = latency_verdict(
            self.check_latency, self.threads, work, quantized, ctx.calibration[0], reference, stats, notes
        )
        notes += kept_float_notes(placement.float_reasons)
        if not kept:
            reason = "the int8 model was slower than the float one on this machine; the float model is kept"
            return PassResult(model, False, stats, float_model_notes(notes, model), NOT_APPLIED, reason)
        if not any(counts.get(key, 0) for key in _INSERTED):
            # every candidate went back to float: the rewrite inserted nothing, so the model is unchanged
            notes.append("nothing was quantized (every candidate node was kept float); kept the input model")
            reason = "every candidate node was kept float"
            return PassResult(model, False, stats, float_model_notes(notes, model), NOT_APPLIED, reason)
        notes.append(levels_note)
        if isinstance(check, CrossFittedCheck):  # the final variant (after the latency probes), every sample unseen
            final = built.variant
            check(lambda on: build(final, on).model)
            more_stats, more_notes = estimate_notes(check.last, check.folds)
            stats.update(more_stats)
            notes += more_notes
            if more_stats.get("cross_fitted_met") == 0:  # never report the target met while a metric fails
                stats["target_met"] = 0
                notes.append(
                    "target NOT met on the cross-fitted estimate of the final model (after the latency probes); "
                    "the int8 model is kept, but its task agreement is estimated below the floor"
                )
        if placement.float_reasons or returned:
            float_count = len(placement.float_reasons)
            reason = f"{len(placement.nodes)} node(s) quantized, {float_count} kept float"
            if placement.weight_only:
                reason += f", the weights of {len(placement.weight_only)} float node(s) stored as int8"
            if returned:
                reason += f" ({len(returned)} returned to float by the accuracy fallback)"
            return PassResult(quantized, True, stats, notes, PARTLY_APPLIED, reason)
        return PassResult(quantized, True, stats, notes, APPLIED, f"{len(placement.nodes)} node(s) quantized")

    def _fit(
        self, work: onnx.ModelProto, observed: list[str], data: Dataset, ctx: Context, per_channel: bool, levels: int
    ) -> _Calibrated:
        """Return the statistics of ``data`` alone: activation ranges, blocked tensors, rounded weights."""
        stats: dict[str, Any] = {}
        ranges, blocked = self._calibrate(work, observed, data, ctx, stats)
        rounded: Rounded = {}
        notes: list[str] = []
        if self.weight_rounding == "gptq":
            rounded, notes = round_weights(
                work, list(data), per_channel=per_channel, levels=levels, progress=ctx.progress
            )
        return _Calibrated(ranges, blocked, rounded, levels, stats, tuple(notes))

    def _latency_budget(self, work: onnx.ModelProto, ctx: Context) -> Callable[[onnx.ModelProto], str | None] | None:
        """Return the check the accuracy fallback must keep passing: no slower than the latency reference."""
        if not self.check_latency or ctx.calibration is None:
            return None
        source = self.latency_reference == "source" and ctx.reference is not None
        reference = ctx.reference if source and ctx.reference is not None else work
        label = "the pipeline's starting model" if source else "this pass's float input"
        return not_slower_than(reference, label, ctx.calibration[0], self.threads)

    def wants_reference(self) -> bool:
        """Return True when the latency check compares with the pipeline's starting model."""
        return self.check_latency and self.latency_reference == "source"
