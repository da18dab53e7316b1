"""Weight-only low-bit quantization: MatMul/Gemm weights to 4 or 8 bits, block-wise along K.

``QuantizeWeights`` finds the weights (``nbits_rewrite.find_sites``), rounds them with
the chosen method (``nbits_math``), optionally adds a low-rank correction, and writes
``MatMulNBits``/``GatherBlockQuantized`` or block-wise QDQ. Activations stay float: a
token-by-token decode is bound by reading the weights, which 4 bits make 8x smaller.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
from onnxopt.passes.common.budget import HeldOutCheck
from onnxopt.passes.common.graphs import opset_version, upgrade_opset
from onnxopt.passes.common.layers import Layer, find_layers
from onnxopt.passes.common.stats import InputStats, collect_input_stats
from onnxopt.passes.quantize.awq import InputScale, apply_input_scales, plan_input_scales, scaled_site, scaled_stats
from onnxopt.passes.quantize.fallback import DEFAULT_TARGET, parse_target
from onnxopt.passes.quantize.nbits_math import (
    BlockQuant,
    lowrank_correction,
    output_error,
    quantize_by_rows,
    quantize_gptq,
    quantize_hqq,
    quantize_rtn,
)
from onnxopt.passes.quantize.nbits_rewrite import Encoded, Site, find_sites, rewrite
from onnxopt.passes.quantize.nbits_target import widen_to_target

from onnxopt.data import Dataset
from onnxopt.errors import CalibrationDataError
from onnxopt.external import lazy_bytes, release
from onnxopt.graph import remove_unused
from onnxopt.model import serialized_size
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

__all__ = ["METHODS", "QuantizeWeights"]

log = logging.getLogger(__name__)

#: The rounding methods; ``auto`` is ``gptq`` with calibration data and ``rtn`` without.
METHODS = ("auto", "rtn", "hqq", "gptq")
_CALIBRATED = ("gptq",)
_QDQ_OPSET = 21  # block-wise DequantizeLinear (block_size) and int4 types
_JUDGED_SAMPLES = 4  # the default target needs a held-out quarter of at least one sample


Record = dict[str, list[float]]


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if values else float("nan")


class _OnDemand(Mapping[str, Encoded]):
    """The encoded weight of each site, computed when the rewrite reaches it and not kept.

    Only one site's float weight and temporaries are alive at a time, and a memory-mapped
    weight's pages are released once it is encoded: layer by layer on a large model.
    """

    def __init__(self, sites: Sequence[Site], encode: Callable[[Site], Encoded]) -> None:
        self._sites = {site.key: site for site in sites}
        self._encode = encode

    def __getitem__(self, key: str) -> Encoded:
        site = self._sites[key]
        encoded = self._encode(site)
        release(site.matrix)
        return encoded

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def _record() -> Record:
    """Return an empty record of per-layer error ratios (GPTQ vs RTN, with vs without low-rank)."""
    return {"gptq_vs_rtn": [], "lowrank_vs_quantized": []}


@register_pass
class QuantizeWeights(Pass):
    """Quantize MatMul/Gemm weights (and optionally embeddings) to 4 or 8 bits; activations stay float.

    Matches: MatMul with a constant float32 ``[K, N]`` (or ``[1, …, 1, K, N]``) weight,
    Gemm without ``transA`` (``transB``, ``alpha`` and a ``[N]`` bias folded), and with
    ``embeddings`` a Gather on axis 0 of a constant table (rules in ``nbits_rewrite``).
    Produces: ``com.microsoft.MatMulNBits`` (``bits``, ``block_size`` along K, zero points
    unless ``symmetric``, ``accuracy_level``) and ``GatherBlockQuantized``; with
    ``format="qdq"`` block-wise ``DequantizeLinear`` (opset 21) before the original op.
    Must not fire on: non-float32 weights, batches of distinct weight matrices, Gemm with
    ``transA``, nodes in If/Loop/Scan bodies or deciding their conditions, ``exclude``d
    nodes; a weight read by another kind of node stays float for that node.

    ``method``: ``rtn`` (round to nearest, onnxruntime's ranges), ``hqq`` (calibration-free
    zero-point optimizer, float zero points), ``gptq`` (error compensation on the
    calibration inputs, block-wise scales; a layer where it is not better than RTN on the
    calibration inputs keeps RTN), ``auto`` (``gptq`` with calibration data, else ``rtn``).
    ``lm_head_bits`` (default 8; 0 keeps it float): the bits of the layer whose output is a
    graph output (a decoder's logits). ``lowrank`` (default 0): a float rank-r correction
    of each layer's rounding error fitted on the calibration inputs, with r chosen so that
    it adds at most that fraction of the layer's parameters. ``target`` (e.g.
    ``"cosine>=0.99@sentence_embedding"``, as ``quantize_int8`` reads it; default
    ``"task"``, the judge's task metrics inferred for each output as ``quantize_int8``
    uses them, applied when there are at least 4 calibration samples; None: no check):
    judged against the float model on a held-out quarter of the calibration data and on
    the rest; the layers with the largest relative output error per weight are sent up,
    the fewest that meet it (the float model is kept when even all of them do not).
    ``widen_bits`` (default 8): what a layer sent up becomes: 8 bits, or 0 to keep it float
    (larger, but on this 2-core x86 machine onnxruntime's 8-bit MatMulNBits ran the encoder
    1.43x slower than float where its 4-bit ran 1.04x: 0 when latency matters more than size).
    ``awq`` (default True; only with calibration data): before rounding, each activation's
    readers get AWQ-style per-input-channel scales (``W·diag(s)`` rounded, the input divided
    by ``s``, folded into the producer where exact; rules in ``awq``), searched on the
    calibration inputs and kept only where they lower the layers' rounding error there.
    """

    name: ClassVar[str] = "quantize_weights"
    exact: ClassVar[bool] = False
    profile: ClassVar[str] = "int8"

    def __init__(
        self,
        *,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = False,
        accuracy_level: int = 4,
        method: str = "auto",
        lm_head_bits: int = 8,
        embeddings: bool = True,
        format: str = "nbits",
        lowrank: float = 0.0,
        target: str | None = DEFAULT_TARGET,
        awq: bool = True,
        widen_bits: int = 8,
        exclude: Sequence[str] = (),
    ) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        if widen_bits not in (0, 8):
            raise ValueError(f"widen_bits must be 0 (float) or 8, not {widen_bits}")
        if lm_head_bits not in (0, 4, 8):
            raise ValueError(f"lm_head_bits must be 0 (float), 4 or 8, not {lm_head_bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4, not {accuracy_level}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if format not in ("nbits", "qdq"):
            raise ValueError(f"format must be 'nbits' or 'qdq', not {format!r}")
        if not 0 <= lowrank < 1:
            raise ValueError("lowrank must be in [0, 1)")
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.accuracy_level = accuracy_level
        self.method = method
        self.lm_head_bits = lm_head_bits
        self.embeddings = embeddings
        self.format = format
        self.lowrank = lowrank
        if target is not None:
            parse_target(target)  # validates early
        self.target = target
        self.awq = awq
        self.widen_bits = widen_bits
        self.exclude = list(exclude)

    def _method(self, ctx: Context) -> str:
        calibrated = ctx.calibration is not None and len(ctx.calibration) > 0
        if self.method == "auto":
            # without data RTN, not HQQ: HQQ's float zero points run MatMulNBits 2.2x slower than
            # float on the CPU (the encoder, onnxruntime's HQQ too), it was not better on the
            # trained decoder (+0.28 % perplexity against RTN's +0.22 %), and its 20 float64
            # iterations took over an hour on the 2.17 GB decoder, where RTN streams in minutes
            return "gptq" if calibrated else "rtn"
        if (self.method in _CALIBRATED or self.lowrank > 0) and not calibrated:
            raise CalibrationDataError(
                f"method {self.method!r}{' with lowrank' if self.lowrank else ''} needs calibration data: pass "
                "--calib data.npz, or use method=hqq or rtn (no data needed)"
            )
        return self.method

    def _stats(self, model: onnx.ModelProto, sites: list[Site], ctx: Context) -> dict[str, InputStats]:
        """Return the input statistics (with ``XᵀX``) of the MatMul/Gemm sites that have a layer view."""
        keys = {site.key for site in sites if site.op_type != "Gather"}
        layers: list[Layer] = [layer for layer in find_layers(model.graph, ("MatMul", "Gemm"))[0] if layer.key in keys]
        if not layers or ctx.calibration is None:
            return {}
        return collect_input_stats(model, layers, list(ctx.calibration), progress=ctx.progress)

    def _scale_inputs(
        self, sites: list[Site], layer_stats: dict[str, InputStats], notes: list[str]
    ) -> tuple[list[Site], list[InputScale]]:
        """Return the sites with AWQ-scaled weights (statistics updated in place) and the plans."""
        readers: dict[str, int] = {}
        for site in sites:
            readers[site.weight] = readers.get(site.weight, 0) + 1
        shared = {weight for weight, count in readers.items() if count > 1}
        bits_of = {s.key: self.lm_head_bits if s.lm_head else self.bits for s in sites}
        plans = plan_input_scales(
            sites, layer_stats, bits_of, self.block_size, symmetric=self.symmetric, shared_weights=shared
        )
        scale_of = {key: plan for plan in plans for key in plan.readers}
        for plan in plans:
            stats = scaled_stats(layer_stats[plan.readers[0]], plan.scale)
            for key in plan.readers:
                layer_stats[key] = stats
        if plans:
            notes.append(
                f"AWQ input scales on {len(plans)} activation(s) ({len(scale_of)} layers): rounding error "
                f"{_median([p.error_ratio for p in plans]):.2f}x that without on the calibration inputs "
                f"(median; alpha median {_median([p.alpha for p in plans]):.1f})"
            )
        return [scaled_site(s, scale_of[s.key].scale) if s.key in scale_of else s for s in sites], plans

    def _quantize(self, site: Site, bits: int, method: str, stats: InputStats | None, record: Record) -> Encoded:
        """Return the encoded weight of one site."""
        matrix = site.matrix
        if site.op_type == "Gather" or (method == "hqq" and (self.format == "qdq" or bits == 8)):
            # integer zero points only: GatherBlockQuantized, DequantizeLinear, 8-bit MatMulNBits on CPU
            method = "rtn"
        gram = stats.mean_gram[0] if stats is not None and stats.mean_gram is not None else None
        if gram is not None and not np.isfinite(gram).all():
            gram = None
        if method == "gptq" and gram is not None:
            quant = quantize_gptq(matrix, gram, bits, self.block_size, symmetric=self.symmetric)
            nearest = quantize_rtn(matrix, bits, self.block_size, symmetric=self.symmetric)
            before = output_error(matrix, nearest.dequantize(), gram)
            after = output_error(matrix, quant.dequantize(), gram)
            if not after < before:
                quant = nearest
            record["gptq_vs_rtn"].append(after / before if before > 0 else 1.0)
        elif method == "hqq" and not self.symmetric:
            quant = quantize_by_rows(lambda rows: quantize_hqq(rows, bits, self.block_size), matrix)
        else:
            quant = quantize_by_rows(
                lambda rows: quantize_rtn(rows, bits, self.block_size, symmetric=self.symmetric), matrix
            )
        correction = None
        if self.lowrank > 0 and gram is not None and site.op_type != "Gather":
            n, k = matrix.shape
            rank = int(self.lowrank * n * k / (n + k))
            if rank >= 1:
                error = matrix - quant.dequantize()
                u, v = lowrank_correction(error, gram, rank)
                before = output_error(matrix, quant.dequantize(), gram)
                after = output_error(matrix, quant.dequantize() + u @ v, gram)
                if after < before:
                    correction = (u, v)
                    record["lowrank_vs_quantized"].append(after / before if before > 0 else 1.0)
        return Encoded(quant, correction)

    def _encode_all(
        self,
        sites: list[Site],
        method: str,
        layer_stats: dict[str, InputStats],
        wide: set[str],
        record: Record,
        *,
        on_demand: bool = False,
    ) -> Mapping[str, Encoded]:
        """Return the encoded weight of every site; sites in ``wide`` at 8 bits.

        ``on_demand``: encode each site only when the rewrite reads it (see :class:`_OnDemand`).
        """
        readers: dict[str, int] = {}
        for site in sites:
            readers[site.weight] = readers.get(site.weight, 0) + 1
        shared: dict[tuple[str, str, int], BlockQuant] = {}

        def encode(site: Site) -> Encoded:
            bits = 8 if site.key in wide else self.lm_head_bits if site.lm_head else self.bits
            if readers[site.weight] > 1:  # one stored copy for every reader: no per-reader statistics
                key = (site.weight, site.op_type, bits)
                if key not in shared:
                    shared[key] = self._quantize(site, bits, "hqq" if method == "hqq" else "rtn", None, record).quant
                return Encoded(shared[key])
            return self._quantize(site, bits, method, layer_stats.get(site.key), record)

        if on_demand:
            return _OnDemand(sites, encode)
        return {site.key: encode(site) for site in sites}

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Quantize ``model``'s weights; see the class docstring."""
        method = self._method(ctx)
        notes: list[str] = []
        stats: dict[str, Any] = {"bytes_before": serialized_size(model) + lazy_bytes(model)}
        sites, site_notes = find_sites(model, embeddings=self.embeddings, block=self.block_size)
        notes += site_notes
        excluded = set(self.exclude)
        sites = [s for s in sites if s.key not in excluded and not (s.lm_head and self.lm_head_bits == 0)]
        if not sites:
            notes.append("no MatMul/Gemm/Gather with a constant float32 weight to quantize")
            return PassResult(model, False, stats, notes)
        calibration = ctx.calibration if ctx.calibration is not None else Dataset([])
        target = self.target
        if target == DEFAULT_TARGET and len(calibration) < _JUDGED_SAMPLES:
            target = None  # the default: judged when there is data enough to hold some out
            if len(calibration):
                notes.append(f"no accuracy target judged: {len(calibration)} calibration sample(s), fewer than 4")
        if target is not None and len(calibration) < 2:
            raise CalibrationDataError("an accuracy target needs calibration data to judge it on: pass --calib")
        fitted, held = calibration.split(0.25) if target is not None else (calibration, Dataset([]))
        layer_ctx = Context(calibration=fitted, progress=ctx.progress)
        scaling = self.awq and len(fitted) > 0
        needs_stats = method in _CALIBRATED or self.lowrank > 0 or target is not None or scaling
        layer_stats = self._stats(model, sites, layer_ctx) if needs_stats else {}
        plans: list[InputScale] = []
        if scaling:
            sites, plans = self._scale_inputs(sites, layer_stats, notes)
        record = _record()
        # Without a target nothing is compared, so each weight is encoded when the rewrite
        # reaches it and written (to the spill file on a large model) before the next is read.
        encoded = self._encode_all(sites, method, layer_stats, set(), record, on_demand=target is None)
        work = model
        if self.format == "qdq" and opset_version(model) < _QDQ_OPSET:
            work = upgrade_opset(
                model, _QDQ_OPSET, needed_for="block-wise DequantizeLinear", otherwise="kept float", notes=notes
            )
            if opset_version(work) < _QDQ_OPSET:
                return PassResult(model, False, stats, notes)
        counts: dict[str, int] = {}

        def build(chosen: Mapping[str, Encoded], in_place: bool = False) -> onnx.ModelProto:
            quantized = work if in_place else copy.deepcopy(work)  # in place: no second copy of a large model
            counts.clear()
            spill = ctx.spill if in_place else None  # candidates judged for the target stay in memory
            counts.update(apply_input_scales(quantized, [p for p in (p.restricted(chosen) for p in plans) if p]))
            counts.update(
                rewrite(quantized, sites, chosen, form=self.format, accuracy_level=self.accuracy_level, spill=spill)
            )
            remove_unused(quantized.graph)
            return quantized

        widened = 0
        if target is not None:
            parsed = parse_target(target)
            check = HeldOutCheck(work, list(held), parsed, fitted=list(fitted))
            encoded, widened, met = widen_to_target(
                check,
                [s for s in sites if not (s.lm_head and self.lm_head_bits == 8)],
                dict(encoded),
                layer_stats,
                build,
                lambda site: self._quantize(site, 8, "rtn", None, _record()) if self.widen_bits == 8 else None,
                notes,
                bits=self.bits,
                target_name=parsed.text,
            )
            stats["target_met"] = int(met)
            if not met:
                return PassResult(model, False, stats, notes)
        quantized = build(encoded, in_place=target is None)
        stats.update(counts)
        stats["layers_widened"] = widened
        stats["bytes_after"] = serialized_size(quantized) + lazy_bytes(quantized)
        stats["lm_head_nodes"] = sum(1 for s in sites if s.lm_head)
        notes.append(
            f"{len(encoded)} weight(s) quantized to {self.bits} bits (block {self.block_size}, "
            f"{'symmetric' if self.symmetric else 'with zero points'}, method {method}); file "
            f"{stats['bytes_after'] / max(stats['bytes_before'], 1):.3f}x"
        )
        if stats["lm_head_nodes"]:
            heads = ", ".join(s.key for s in sites if s.lm_head)
            notes.append(f"output projection(s) at {self.lm_head_bits} bits: {heads}")
        if record["gptq_vs_rtn"]:
            stats["gptq_error_ratio"] = round(_median(record["gptq_vs_rtn"]), 4)
            notes.append(
                f"GPTQ on {len(fitted)} calibration samples: layer output error "
                f"{stats['gptq_error_ratio']:.2f}x that of RTN (median over {len(record['gptq_vs_rtn'])} layers)"
            )
        if record["lowrank_vs_quantized"]:
            stats["lowrank_error_ratio"] = round(_median(record["lowrank_vs_quantized"]), 4)
            notes.append(
                f"low-rank corrections on {len(record['lowrank_vs_quantized'])} layer(s) (<= {self.lowrank:.0%} "
                f"extra parameters each): output error {stats['lowrank_error_ratio']:.2f}x (median)"
            )
        return PassResult(quantized, True, stats, notes)
