"""Graph surgery of weight-only low-bit quantization: find the weights, write MatMulNBits or block-wise QDQ.

Sites (:func:`find_sites`), as numbered rules:

1. ``MatMul`` whose B is a constant float32 matrix ``[K, N]``, or ``[1, …, 1, K, N]`` when
   A's rank is known and at least B's (the output shape is then the same);
2. ``Gemm`` with ``transA = 0`` and a constant B (``transB`` either way), ``alpha`` folded
   into the weight, a constant C of shape ``[N]`` or ``[1, N]`` (times ``beta``) kept as
   the kernel's bias;
3. with ``embeddings``: ``Gather`` on axis 0 of a constant float32 table ``[V, D]`` with
   ``D`` a multiple of the block size.

Must not fire on: weights that are not float32, MatMul weights with a batch of distinct
matrices (MatMulNBits holds one), Gemm with ``transA`` or a C of another shape, nodes
inside If/Loop/Scan bodies, layers whose output decides an If/Loop condition. A weight
read by several sites is quantized and stored once; a weight also read by other nodes
stays in float for them.

Forms written (:func:`rewrite`): ``com.microsoft.MatMulNBits`` (B packed ``[N, blocks,
blob]`` uint8, scales ``[N, blocks]``, zero points packed uint8 or float for HQQ, the bias
as its sixth input) and ``GatherBlockQuantized``; or, with ``form="qdq"``, standard ONNX:
a block-wise ``DequantizeLinear`` (opset 21, int4/uint4 or int8/uint8 ``[K, N]``) feeding
the original MatMul/Gather, plus ``Add`` for a Gemm's bias. A low-rank correction
``U·V`` adds ``MatMul(MatMul(A, Vᵀ), Uᵀ)`` to the output, in float.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnxopt.passes.common.graphs import TypeMap
from onnxopt.passes.quantize.nbits_math import BlockQuant, pack_blocks, pack_zero_points

from onnxopt.external import Spill, replace_initializer
from onnxopt.graph import GraphIndex, NameGenerator, control_tensors, is_default_domain, node_attribute

__all__ = ["Encoded", "Site", "find_sites", "read_weight", "rewrite"]

log = logging.getLogger(__name__)

#: Written tensors at least this large go to the pipeline's spill file, when it has one.
_SPILL_BYTES = 1 << 20
#: Ops a logits tensor may pass through on its way to a graph output (the lm_head rule).
_PASSTHROUGH = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Cast", "Flatten"}


@dataclass(frozen=True)
class Site:
    """One quantizable node: its output (key), op, weight name, the ``[N, K]`` matrix, bias and input."""

    key: str
    op_type: str
    weight: str
    matrix: np.ndarray  # [N, K] for MatMul/Gemm (alpha folded), [V, D] for Gather
    bias: np.ndarray | None = None
    lm_head: bool = False
    activation: str = ""  # the float input a MatMul/Gemm multiplies (empty for Gather)

    @property
    def transposed(self) -> bool:
        """Return True when ``matrix`` is the stored weight as is (Gather table, Gemm ``transB``)."""
        return self.op_type == "Gather"


@dataclass(frozen=True)
class Encoded:
    """What the rewrite writes for one site: the block-quantized weight and an optional ``U [N, r]``, ``V [r, K]``."""

    quant: BlockQuant
    correction: tuple[np.ndarray, np.ndarray] | None = None


def read_weight(index: GraphIndex, name: str) -> np.ndarray | None:
    """Return the value of weight ``name`` (initializer or Constant output), or None.

    The one place this pass reads weight data, so that memory-mapped external data can be
    read here without touching the rest.
    """
    return index.constant(name)


def _reaches_output(name: str, index: GraphIndex) -> bool:
    """Return True when ``name`` is a graph output or reaches one through shape-only ops."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        tensor = pending.pop()
        if tensor in index.outputs:
            return True
        if tensor in seen:
            continue
        seen.add(tensor)
        for reader in index.consumers.get(tensor, []):
            if reader.op_type in _PASSTHROUGH and reader.input and reader.input[0] == tensor:
                pending.extend(reader.output)
    return False


def _matmul_site(node: onnx.NodeProto, value: np.ndarray, types: TypeMap) -> tuple[np.ndarray | None, str]:
    """Return the ``[N, K]`` matrix of a MatMul's B, or None and why not."""
    if value.ndim == 2:
        return value.T, ""  # a view: a memory-mapped weight is read when it is quantized, not here
    if value.ndim < 2:
        return None, "its weight is 1-D"
    if any(d != 1 for d in value.shape[:-2]):
        return None, f"its weight {list(value.shape)} is a batch of matrices (MatMulNBits holds one)"
    rank = types.rank(node.input[0])
    if rank is None or rank < value.ndim:
        return None, f"its weight is {value.ndim}-D and the input's rank is unknown or smaller"
    return value.reshape(value.shape[-2:]).T, ""


def _gemm_site(node: onnx.NodeProto, value: np.ndarray, index: GraphIndex) -> tuple[np.ndarray | None, Any, str]:
    """Return (``[N, K]`` matrix, bias or None, "") of a Gemm, or (None, None, why not)."""
    if node_attribute(node, "transA", 0):
        return None, None, "Gemm with transA"
    if value.ndim != 2:
        return None, None, "its weight is not 2-D"
    alpha = float(node_attribute(node, "alpha", 1.0))
    beta = float(node_attribute(node, "beta", 1.0))
    matrix = (value if node_attribute(node, "transB", 0) else value.T) * np.float32(alpha)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = read_weight(index, node.input[2])
        if c is None or c.dtype != np.float32 or c.size != matrix.shape[0] or c.ndim > 2:
            return None, None, "its C is not a constant [N] or [1, N]"
        bias = (c.reshape(-1) * np.float32(beta)).astype(np.float32)
    return np.ascontiguousarray(matrix.astype(np.float32)), bias, ""


def find_sites(model: onnx.ModelProto, *, embeddings: bool, block: int) -> tuple[list[Site], list[str]]:
    """Return the quantizable nodes of the main graph (rules in the module docstring) and notes."""
    graph = model.graph
    index = GraphIndex(graph)
    types = TypeMap(model)
    control = control_tensors(graph, index)
    sites: list[Site] = []
    skipped: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or not is_default_domain(node):
            continue
        if node.op_type == "Gather" and not embeddings:
            continue
        position = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= position:
            continue
        value = read_weight(index, node.input[position])
        if value is None:
            continue
        reason = ""
        bias = None
        matrix: np.ndarray | None = None
        if value.dtype != np.float32:
            reason = f"its weight is {value.dtype}"
        elif node.output[0] in control:
            reason = "its output decides an If/Loop condition"
        elif node.op_type == "MatMul":
            matrix, reason = _matmul_site(node, value, types)
        elif node.op_type == "Gemm":
            matrix, bias, reason = _gemm_site(node, value, index)
        elif value.ndim != 2 or int(node_attribute(node, "axis", 0)) != 0:
            reason = "not a 2-D table gathered on axis 0"
        elif value.shape[1] % block:
            reason = f"its row length {value.shape[1]} is not a multiple of the block size {block}"
        else:
            matrix = value
        if matrix is None:
            skipped.setdefault(reason, []).append(node.output[0])
            continue
        lm_head = node.op_type != "Gather" and _reaches_output(node.output[0], index)
        activation = "" if node.op_type == "Gather" else node.input[0]
        sites.append(Site(node.output[0], node.op_type, node.input[position], matrix, bias, lm_head, activation))
    notes = []
    for reason, keys in skipped.items():
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        notes.append(f"left {len(keys)} node(s) in float: {reason}: {shown}")
    return sites, notes


def _int4_bytes(values: np.ndarray) -> bytes:
    """Return 4-bit values (0..15, already offset) packed two per byte, low nibble first, row-major."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


class _Writer:
    """Adds the quantized tensors to a graph once per distinct :class:`BlockQuant`."""

    def __init__(self, model: onnx.ModelProto, spill: Spill | None = None) -> None:
        self.graph = model.graph
        self.names = NameGenerator(model)
        self.spill = spill
        # keyed by weight name, not id(quant): encodings made on demand are freed as the rewrite goes
        self.written: dict[tuple[str, int, str], list[str]] = {}

    def add(self, base: str, array: np.ndarray) -> str:
        name = self.names.fresh(base)
        replace_initializer(self.graph, name, np.ascontiguousarray(array), spill=self.spill, min_bytes=_SPILL_BYTES)
        return name

    def add_raw(self, base: str, data_type: int, dims: Sequence[int], data: bytes) -> str:
        name = self.names.fresh(base)
        tensor = onnx.helper.make_tensor(name, data_type, list(dims), data, raw=True)
        if self.spill is not None and len(data) >= _SPILL_BYTES:
            tensor = self.spill.adopt(tensor)
        self.graph.initializer.append(tensor)
        return name

    def nbits(self, weight: str, quant: BlockQuant) -> list[str]:
        """Return [B, scales, zero points or ""] names for MatMulNBits (written on first use)."""
        key = (weight, quant.bits, "nbits")
        if key not in self.written:
            names = [
                self.add(f"{weight}_q{quant.bits}", pack_blocks(quant)),
                self.add(f"{weight}_scales", quant.scales),
            ]
            if quant.symmetric:
                names.append("")
            elif quant.float_zero_points:
                names.append(self.add(f"{weight}_zero_points", quant.zero_points.astype(np.float32)))
            else:
                names.append(self.add(f"{weight}_zero_points", pack_zero_points(quant)))
            self.written[key] = names
        return self.written[key]

    def gather(self, weight: str, quant: BlockQuant) -> list[str]:
        """Return [data, scales, zero points or ""] names for GatherBlockQuantized."""
        key = (weight, quant.bits, "gather")
        if key not in self.written:
            q = quant.integers
            data = q if quant.bits == 8 else (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
            names = [self.add(f"{weight}_q{quant.bits}", data), self.add(f"{weight}_scales", quant.scales)]
            names.append("" if quant.symmetric else self.add(f"{weight}_zero_points", pack_zero_points(quant)))
            self.written[key] = names
        return self.written[key]

    def dequantized(self, weight: str, quant: BlockQuant, rows_first: bool) -> tuple[list[str], int]:
        """Return the DequantizeLinear inputs for the weight as stored ``[K, N]`` (or ``[V, D]``) and its axis."""
        key = (weight, quant.bits, f"qdq{rows_first}")
        axis = 1 if rows_first else 0
        if key not in self.written:
            q = quant.integers[:, : quant.columns].astype(np.int16)
            z = np.round(quant.zero_points).astype(np.int16)
            scales = quant.scales
            if not rows_first:
                q, z, scales = q.T, z.T, scales.T
            signed = quant.symmetric
            offset = (1 << (quant.bits - 1)) if signed else 0
            if quant.bits == 4:
                data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
                data = _int4_bytes((q - offset) & 0xF)
                zero_data = _int4_bytes((z - offset) & 0xF)
            else:
                data_type = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
                data = (q - offset).astype(np.int8 if signed else np.uint8).tobytes()
                zero_data = (z - offset).astype(np.int8 if signed else np.uint8).tobytes()
            names = [
                self.add_raw(f"{weight}_q{quant.bits}", data_type, q.shape, data),
                self.add(f"{weight}_scales", np.ascontiguousarray(scales)),
            ]
            if not signed:
                names.append(self.add_raw(f"{weight}_zero_points", data_type, z.shape, zero_data))
            self.written[key] = names
        return self.written[key], axis


def rewrite(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    encoded: Mapping[str, Encoded],
    *,
    form: str = "nbits",
    accuracy_level: int = 0,
    spill: Spill | None = None,
) -> dict[str, int]:
    """Replace each site with an ``encoded`` entry in place (``form`` ``"nbits"`` or ``"qdq"``); return counts.

    ``encoded`` is read once per site, in graph order, so it may encode on demand; with
    ``spill`` the written tensors of 1 MB or more go to that file instead of the model.
    """
    graph = model.graph
    writer = _Writer(model, spill)
    by_key = {site.key: site for site in sites}
    counts = {"matmul_nbits": 0, "gather_quantized": 0, "qdq_weights": 0, "lowrank_corrections": 0}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        site = by_key.get(node.output[0]) if node.output else None
        entry = encoded.get(site.key) if site is not None else None
        if site is None or entry is None:
            new_nodes.append(node)
            continue
        quant = entry.quant
        name = node.name or node.output[0]
        if site.op_type == "Gather":
            if form == "qdq":
                inputs, axis = writer.dequantized(site.weight, quant, rows_first=True)
                table = writer.names.fresh(f"{site.weight}_dequantized")
                new_nodes.append(
                    onnx.helper.make_node(
                        "DequantizeLinear", inputs, [table], name=f"{name}_dq", axis=axis, block_size=quant.block
                    )
                )
                new_nodes.append(onnx.helper.make_node("Gather", [table, node.input[1]], list(node.output), name=name))
                counts["qdq_weights"] += 1
            else:
                data, scales, zeros = writer.gather(site.weight, quant)
                inputs = [data, node.input[1], scales] + ([zeros] if zeros else [])
                new_nodes.append(
                    onnx.helper.make_node(
                        "GatherBlockQuantized",
                        inputs,
                        list(node.output),
                        name=name,
                        domain="com.microsoft",
                        bits=quant.bits,
                        block_size=quant.block,
                        gather_axis=0,
                        quantize_axis=1,
                    )
                )
                counts["gather_quantized"] += 1
            continue
        n, k = site.matrix.shape
        output = node.output[0]
        result = writer.names.fresh(f"{output}_quantized") if entry.correction is not None else output
        if form == "qdq":
            inputs, axis = writer.dequantized(site.weight, quant, rows_first=False)
            weight = writer.names.fresh(f"{site.weight}_dequantized")
            new_nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear", inputs, [weight], name=f"{name}_dq", axis=axis, block_size=quant.block
                )
            )
            if site.bias is None:
                new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [result], name=name))
            else:
                product = writer.names.fresh(f"{output}_product")
                new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=name))
                bias = writer.add(f"{site.weight}_bias", site.bias)
                new_nodes.append(onnx.helper.make_node("Add", [product, bias], [result], name=f"{name}_bias"))
            counts["qdq_weights"] += 1
        else:
            packed, scales, zeros = writer.nbits(site.weight, quant)
            inputs = [node.input[0], packed, scales, zeros]
            if site.bias is not None:
                inputs += ["", writer.add(f"{site.weight}_bias", site.bias)]
            while inputs and not inputs[-1]:
                inputs.pop()
            attrs = {"K": k, "N": n, "bits": quant.bits, "block_size": quant.block}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            new_nodes.append(
                onnx.helper.make_node("MatMulNBits", inputs, [result], name=name, domain="com.microsoft", **attrs)
            )
            counts["matmul_nbits"] += 1
        if entry.correction is not None:
            u, v = entry.correction
            down = writer.add(f"{site.weight}_lowrank_v", np.ascontiguousarray(v.T))
            up = writer.add(f"{site.weight}_lowrank_u", np.ascontiguousarray(u.T))
            middle = writer.names.fresh(f"{output}_lowrank_mid")
            delta = writer.names.fresh(f"{output}_lowrank")
            new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], down], [middle], name=f"{name}_lr_v"))
            new_nodes.append(onnx.helper.make_node("MatMul", [middle, up], [delta], name=f"{name}_lr_u"))
            new_nodes.append(onnx.helper.make_node("Add", [result, delta], [output], name=f"{name}_lr_add"))
            counts["lowrank_corrections"] += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    contrib = form == "nbits" and (counts["matmul_nbits"] or counts["gather_quantized"])
    if contrib and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return counts
