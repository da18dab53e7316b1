"""QDQ rewriting for ``quantize_int8``: turn a :class:`QDQPlan` into a model (private).

The plan says which activations get a QuantizeLinear/DequantizeLinear pair (and their
parameters), which node inputs are weights (per-channel axis or per tensor), which biases
become int32, which embedding tables are stored as int8, and which Relu/Clip nodes the
quantizer's saturation replaces. The rewrite itself makes no decision:

1. an activation ``t`` written by an integer kernel keeps its name for every reader: its
   producer now writes a fresh name, ``Q`` and ``DQ`` follow and the ``DQ`` writes ``t``
   (graph outputs keep their names). An activation written by a float node (or a graph
   input) gets ``Q``/``DQ`` for its integer readers only (``quantized_nodes``); its float
   readers keep reading the exact value (a residual ``Add`` beside a quantized MatMul
   must not carry that MatMul's input rounding: MiniLM pooled cosine 0.990 -> 0.994);
2. a weight becomes one int8 initializer, its scales and a ``DQ`` (``axis`` when per
   channel), created once per (weight, axis) however many nodes share it (a node in
   ``weight_only`` computes in float and reads ``Cast(int8) · scale`` instead); the float
   initializer goes away when nothing else reads it; its integers are the plan's
   ``rounded`` ones (error-compensating rounding) when they were rounded on the same
   scale, else the nearest;
3. a bias becomes int32 with scale ``s_input * s_weight`` (zero point 0); a channel whose
   weight scale is too small for its bias to fit int32 has its weight scale raised first;
4. an embedding table (``Gather`` on axis 0 of a 2-D constant) becomes int8 with one scale
   per row: ``Gather`` the int8 rows and the row scales, ``Cast`` and ``Mul``; the float
   table is never materialized;
5. a lookup region's nodes are replaced by ``Cast`` (to int32) and ``Gather`` on a table
   of the 256 (or 65536) results ``Q_out(f(DQ_in(q)))``, computed by running the region's
   own nodes under onnxruntime on every input code;
6. an absorbed ``Relu`` or ``Clip(0, M)`` between a producer and its quantized output is
   removed: ``Q`` with zero point at ``qmin`` saturates exactly as it would.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxopt.passes.quantize.lookup import lookup_table
from onnxopt.passes.quantize.placement import Placement

from onnxopt.calibration import (
    QuantParams,
    fit_weight_scale_to_bias,
    quantize,
    quantize_bias,
    weight_qparams,
)
from onnxopt.graph import GraphIndex, NameGenerator, remove_unused, rename_input, replace_repeated, toposort

__all__ = ["QDQPlan", "Rounded", "apply_plan"]


#: integers chosen for weights by error-compensating rounding: (weight name, axis) → (scale, integers)
Rounded = dict[tuple[str, "int | None"], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class QDQPlan:
    """Everything the rewrite inserts: a placement and the numbers it needs; see the module docstring."""

    #: where Q/DQ goes: the integer nodes, the activations, weights, biases, tables, lookups
    placement: Placement
    #: parameters of every quantized activation (the placement's ``tensors``)
    activations: dict[str, QuantParams]
    #: integers chosen for a weight by error-compensating rounding, per (weight name, axis),
    #: with the scale they were rounded on; used when the rewrite's scale is that scale
    rounded: Rounded = field(default_factory=dict)
    #: half-width of the symmetric grid of every int8 weight: 127, or 64 (7 bits) where
    #: onnxruntime's u8 x s8 kernels saturate (``passes/quantize/kernels.py``)
    weight_levels: int = 127


def _add_initializer(graph: onnx.GraphProto, names: NameGenerator, base: str, array: np.ndarray) -> str:
    name = names.fresh(base)
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _dequantize_node(
    graph: onnx.GraphProto,
    names: NameGenerator,
    source: str,
    params: QuantParams,
    output: str,
    base: str,
    tag: str,
    *,
    constant: bool = False,
) -> onnx.NodeProto:
    """Return a DQ node named after ``base``; its scale and zero point are named ``{tag}s``/``{tag}z``.

    A zero point of zeros on a signed ``constant`` (int8 weights, int32 biases) is left out:
    it is the default, and per channel it cost a byte (int32: four) per channel plus an
    initializer (PP-OCR cls: 25 kB of a 272 kB file). Activations keep theirs: the
    QuantizeLinear that shares it takes its output type from it.
    """
    scale = _add_initializer(graph, names, f"{tag}s", params.scale)
    inputs = [source, scale]
    if not constant or params.zero_point.dtype.kind == "u" or np.any(params.zero_point):
        inputs.append(_add_initializer(graph, names, f"{tag}z", params.zero_point))
    attrs: dict[str, Any] = {"axis": params.axis} if params.per_channel and params.axis is not None else {}
    return helper.make_node("DequantizeLinear", inputs, [output], name=names.fresh(f"{base}_dq"), **attrs)


def _cast_scale_nodes(
    graph: onnx.GraphProto,
    names: NameGenerator,
    source: str,
    params: QuantParams,
    output: str,
    base: str,
    tag: str,
    ndim: int,
) -> list[onnx.NodeProto]:
    """Return ``Cast(int8 → float) · scale`` for a weight that a float node reads (weight-only storage).

    Not a DequantizeLinear: onnxruntime keeps DQ nodes out of constant folding (they are
    the pattern its integer kernels are fused from), so a DQ on a weight runs at every
    inference and stops the float Conv from pre-packing its weight (PP-OCR det with 50
    weight-only convs: 42.5 ms), while Cast and Mul of constants fold into one float
    initializer when the session is created (same model: 30.1 ms, outputs identical).
    """
    scale = params.scale
    if params.per_channel and params.axis is not None:
        shape = [1] * ndim
        shape[params.axis] = -1
        scale = scale.reshape(shape)
    scale_name = _add_initializer(graph, names, f"{tag}s", scale)
    as_float = names.fresh(f"{tag}c")
    return [
        helper.make_node("Cast", [source], [as_float], name=names.fresh(f"{base}_cast"), to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [as_float, scale_name], [output], name=names.fresh(f"{base}_scale")),
    ]


def _weight_scales(
    index: GraphIndex, plan: QDQPlan, nodes: dict[str, onnx.NodeProto]
) -> dict[tuple[str, int | None], QuantParams]:
    """Return parameters per (weight name, axis), raised where a bias would overflow int32."""
    params: dict[tuple[str, int | None], QuantParams] = {}
    placement = plan.placement
    for use in placement.weights:
        name = nodes[use.node].input[use.index]
        key = (name, use.axis)
        if key not in params:
            value = index.constant(name)
            if value is None:
                raise ValueError(f"weight {name!r} of node {use.node!r} is not a constant")
            params[key] = weight_qparams(value, use.axis, levels=plan.weight_levels)
    by_node = {(u.node, u.index): u for u in placement.weights}
    for bias in placement.biases:
        node = nodes[bias.node]
        use = by_node[(bias.node, bias.weight)]
        key = (node.input[bias.weight], use.axis)
        value = index.constant(node.input[bias.index])
        if value is None:
            raise ValueError(f"bias {node.input[bias.index]!r} of node {bias.node!r} is not a constant")
        current = params[key]
        raised = fit_weight_scale_to_bias(value, float(plan.activations[bias.activation].scale), current.scale)
        params[key] = QuantParams(raised, current.zero_point, current.axis)
    return params


@dataclass
class _Rewrite:
    """What the rules share while they rewrite one copy of the model."""

    model: onnx.ModelProto
    plan: QDQPlan
    names: NameGenerator
    index: GraphIndex
    nodes: dict[str, onnx.NodeProto]
    #: the nodes the rules insert, appended in order
    new_nodes: list[onnx.NodeProto] = field(default_factory=list)
    counts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: parameters of the weight each (node, input index) now reads, for its bias
    weight_params: dict[tuple[str, int], QuantParams] = field(default_factory=dict)
    #: the QuantizeLinear output of each quantized activation, for the lookup tables
    quantized_names: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def initializer(self, base: str, array: np.ndarray) -> str:
        return _add_initializer(self.graph, self.names, base, array)

    def dequantize(
        self, source: str, params: QuantParams, output: str, base: str, tag: str, *, constant: bool = False
    ) -> onnx.NodeProto:
        return _dequantize_node(self.graph, self.names, source, params, output, base, tag, constant=constant)


def _quantize_weights(state: _Rewrite) -> None:
    """Rule 2: one int8 initializer per (weight, axis), read through DQ or, by float nodes, Cast · scale."""
    plan, names, counts = state.plan, state.names, state.counts
    params_of = _weight_scales(state.index, plan, state.nodes)
    dequantized: dict[tuple[str, int | None, str], str] = {}
    stored: dict[tuple[str, int | None], tuple[str, str, int]] = {}  # (weight, axis) → (int8 name, tag, ndim)
    weight_only = set(plan.placement.weight_only)
    for use in plan.placement.weights:
        node = state.nodes[use.node]
        name = node.input[use.index]
        key = (name, use.axis)
        params = params_of[key]
        if key not in stored:
            value = state.index.constant(name)
            assert value is not None
            chosen = plan.rounded.get(key)
            if chosen is not None and np.array_equal(chosen[0], params.scale):
                q_value = chosen[1].astype(params.dtype)
                counts["weights_error_compensated"] += 1
            else:
                q_value = quantize(value, params)
            tag = names.fresh(f"w{counts['weights_quantized']}")
            stored[key] = (state.initializer(f"{tag}q", q_value), tag, q_value.ndim)
            counts["weights_quantized"] += 1
        form = "cast" if use.node in weight_only else "dq"
        if (*key, form) not in dequantized:
            q_name, tag, ndim = stored[key]
            out = names.fresh(f"{tag}d" if form == "dq" else f"{tag}f")
            if form == "dq":
                state.new_nodes.append(state.dequantize(q_name, params, out, name, tag, constant=True))
            else:
                state.new_nodes += _cast_scale_nodes(state.graph, names, q_name, params, out, name, tag, ndim)
            dequantized[(*key, form)] = out
        state.weight_params[(use.node, use.index)] = params
        node.input[use.index] = dequantized[(*key, form)]


def _quantize_biases(state: _Rewrite) -> None:
    """Rule 3: int32 biases on the scale ``s_input * s_weight`` (after the weights: it reads their scales)."""
    for bias in state.plan.placement.biases:
        node = state.nodes[bias.node]
        w_params = state.weight_params[(bias.node, bias.weight)]
        value = state.index.constant(node.input[bias.index])
        assert value is not None
        q_bias, scale = quantize_bias(value, float(state.plan.activations[bias.activation].scale), w_params.scale)
        params = QuantParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim == 1 else None)
        base = node.input[bias.index]
        tag = state.names.fresh(f"b{state.counts['biases_quantized']}")
        q_name = state.initializer(f"{tag}q", q_bias)
        dq_out = state.names.fresh(f"{tag}d")
        state.new_nodes.append(state.dequantize(q_name, params, dq_out, base, tag, constant=True))
        node.input[bias.index] = dq_out
        state.counts["biases_quantized"] += 1


def _quantize_tables(state: _Rewrite) -> None:
    """Rule 4: embedding tables as int8 rows with one scale per row, rescaled after the Gather."""
    names = state.names
    for table_node in state.plan.placement.tables:
        node = state.nodes[table_node]
        table = state.index.constant(node.input[0])
        assert table is not None
        params = weight_qparams(table, 0)
        base = node.input[0]
        q_table = state.initializer(f"{base}_quantized", quantize(table, params))
        scales = state.initializer(f"{base}_row_scale", params.scale.reshape(-1, 1))
        rows, row_scales, as_float = (names.fresh(f"{base}_{part}") for part in ("rows", "row_scales", "rows_float"))
        output = node.output[0]
        node.input[0] = q_table
        node.output[0] = rows
        state.new_nodes += [
            helper.make_node(
                "Gather", [scales, node.input[1]], [row_scales], name=names.fresh(f"{node.name}_scale"), axis=0
            ),
            helper.make_node(
                "Cast", [rows], [as_float], name=names.fresh(f"{node.name}_cast"), to=onnx.TensorProto.FLOAT
            ),
            helper.make_node("Mul", [as_float, row_scales], [output], name=names.fresh(f"{node.name}_rescale")),
        ]
        state.counts["tables_quantized"] += 1


def _quantize_activations(state: _Rewrite) -> None:
    """Rules 1 and 6: a Q/DQ pair per activation, read by every reader or by the integer ones only.

    An absorbed Relu/Clip's input feeds the Q directly (rule 6); the node itself is
    removed at the end. A lookup region's output gets only its DQ (rule 5 writes the Q side).
    """
    placement, names, index = state.plan.placement, state.names, state.index
    absorbed_by_output = {state.nodes[n].output[0]: state.nodes[n] for n in placement.absorbed}
    lookups = {lookup.output for lookup in placement.lookups}
    graph_inputs = {i.name for i in state.graph.input}
    for tensor, params in state.plan.activations.items():
        tag = names.fresh(f"a{len(state.quantized_names)}")
        quantized = names.fresh(f"{tag}q")
        state.quantized_names[tensor] = quantized
        if tensor in lookups:
            state.new_nodes.append(state.dequantize(quantized, params, tensor, tensor, tag))
            state.counts["activations_quantized"] += 1
            continue
        producer = index.producer.get(tensor)
        if tensor not in absorbed_by_output and (producer is None or producer.name not in placement.nodes):
            # a float producer: only the integer readers read the DQ, float readers keep the exact value
            dq_out = names.fresh(f"{tag}d")
            for reader in index.consumers.get(tensor, ()):
                if reader.name in placement.nodes:
                    for i, name in enumerate(reader.input):
                        if name == tensor:
                            reader.input[i] = dq_out
            source = tensor
            dq = state.dequantize(quantized, params, dq_out, tensor, tag)
        elif tensor in graph_inputs:
            dq_out = names.fresh(f"{tag}d")
            rename_input(state.graph, tensor, dq_out)
            source = tensor
            dq = state.dequantize(quantized, params, dq_out, tensor, tag)
        else:
            absorbed = absorbed_by_output.get(tensor)
            if absorbed is not None:
                source = absorbed.input[0]
            else:
                producer = index.producer[tensor]
                source = names.fresh(f"{tag}f")
                producer.output[list(producer.output).index(tensor)] = source
            dq = state.dequantize(quantized, params, tensor, tensor, tag)
        scale, zero = dq.input[1], dq.input[2]
        state.new_nodes.append(
            helper.make_node("QuantizeLinear", [source, scale, zero], [quantized], name=names.fresh(f"{tensor}_q"))
        )
        state.new_nodes.append(dq)
        state.counts["activations_quantized"] += 1


def _replace_lookups(state: _Rewrite) -> None:
    """Rule 5: a lookup region becomes Cast and Gather on its table (after the activations: it reads their Q)."""
    names, plan = state.names, state.plan
    for lookup in plan.placement.lookups:
        region = [state.nodes[n] for n in lookup.nodes]
        table = lookup_table(
            state.model,
            region,
            lookup.input,
            lookup.output,
            plan.activations[lookup.input],
            plan.activations[lookup.output],
        )
        table_name = state.initializer(f"{lookup.output}_table", table)
        codes = names.fresh(f"{lookup.output}_codes")
        state.new_nodes.append(
            helper.make_node(
                "Cast",
                [state.quantized_names[lookup.input]],
                [codes],
                name=names.fresh(f"{lookup.output}_cast"),
                to=onnx.TensorProto.INT32,
            )
        )
        state.new_nodes.append(
            helper.make_node(
                "Gather",
                [table_name, codes],
                [state.quantized_names[lookup.output]],
                name=names.fresh(f"{lookup.output}_lookup"),
                axis=0,
            )
        )
        state.counts["lookup_tables"] += 1


def apply_plan(model: onnx.ModelProto, plan: QDQPlan) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Return a quantized copy of ``model`` (main graph) and counts of what was inserted.

    The rules run in the order of the module docstring's data flow: weights before the
    biases that read their scales, activations before the lookups that read their Q.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    state = _Rewrite(result, plan, NameGenerator(result), GraphIndex(graph), {n.name: n for n in graph.node})
    _quantize_weights(state)
    _quantize_biases(state)
    _quantize_tables(state)
    _quantize_activations(state)
    _replace_lookups(state)
    placement = plan.placement
    removed = set(placement.absorbed) | {n for lookup in placement.lookups for n in lookup.nodes}
    kept = [n for n in graph.node if n.name not in removed]
    state.counts["activations_absorbed"] = len(placement.absorbed)
    del graph.node[:]
    graph.node.extend(kept + state.new_nodes)
    toposort(graph)
    remove_unused(graph)
    _drop_stale_value_info(graph)
    return result, dict(state.counts)


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info of renamed producer outputs (the names now carry DQ outputs of the same type)."""
    produced = {o for n in graph.node for o in n.output}
    keep = [v for v in graph.value_info if v.name in produced]
    if len(keep) != len(graph.value_info):
        replace_repeated(graph.value_info, keep)
