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

from onnxopt.calibration import (
    QuantParams,
    dequantize,
    fit_weight_scale_to_bias,
    quantize,
    quantize_bias,
    weight_qparams,
)
from onnxopt.graph import GraphIndex, NameGenerator, remove_unused, rename_input, replace_repeated, toposort

__all__ = ["BiasUse", "LookupRegion", "QDQPlan", "Rounded", "WeightUse", "apply_plan", "lookup_table"]


@dataclass(frozen=True)
class WeightUse:
    """Input ``index`` of node ``node`` is a constant weight quantized on ``axis`` (None: per tensor)."""

    node: str
    index: int
    axis: int | None


@dataclass(frozen=True)
class BiasUse:
    """Input ``index`` of ``node`` is a bias: scale = scale of ``activation`` × scale of weight input ``weight``."""

    node: str
    index: int
    activation: str
    weight: int


@dataclass(frozen=True)
class LookupRegion:
    """Elementwise nodes computing ``output = f(input)`` of one tensor; replaced by a table."""

    input: str
    output: str
    nodes: tuple[str, ...]


#: integers chosen for weights by error-compensating rounding: (weight name, axis) → (scale, integers)
Rounded = dict[tuple[str, "int | None"], tuple[np.ndarray, np.ndarray]]


@dataclass
class QDQPlan:
    """Everything the rewrite inserts; see the module docstring."""

    activations: dict[str, QuantParams] = field(default_factory=dict)
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[BiasUse] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    absorbed: set[str] = field(default_factory=set)
    lookups: list[LookupRegion] = field(default_factory=list)
    #: integers chosen for a weight by error-compensating rounding, per (weight name, axis),
    #: with the scale they were rounded on; used when the rewrite's scale is that scale
    rounded: Rounded = field(default_factory=dict)
    #: nodes that stay float but read their weight stored as int8 (``Cast`` and ``Mul``, folded by the runtime)
    weight_only: set[str] = field(default_factory=set)
    #: the nodes that compute in integers; None: every reader of a quantized tensor reads its DQ
    quantized_nodes: frozenset[str] | None = None


def _add_initializer(graph: onnx.GraphProto, names: NameGenerator, base: str, array: np.ndarray) -> str:
    name = names.fresh(base)
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _dequantize_node(graph: onnx.GraphProto, names: NameGenerator, source: str, params: QuantParams,
                     output: str, base: str, tag: str, *, constant: bool = False) -> onnx.NodeProto:
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


def _cast_scale_nodes(graph: onnx.GraphProto, names: NameGenerator, source: str, params: QuantParams,
                      output: str, base: str, tag: str, ndim: int) -> list[onnx.NodeProto]:
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
    return [helper.make_node("Cast", [source], [as_float], name=names.fresh(f"{base}_cast"), to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [as_float, scale_name], [output], name=names.fresh(f"{base}_scale"))]


def _weight_scales(index: GraphIndex, plan: QDQPlan, nodes: dict[str, onnx.NodeProto]) -> dict[tuple[str, int | None],
                                                                                                QuantParams]:
    """Return parameters per (weight name, axis), raised where a bias would overflow int32."""
    params: dict[tuple[str, int | None], QuantParams] = {}
    for use in plan.weights:
        name = nodes[use.node].input[use.index]
        key = (name, use.axis)
        if key not in params:
            value = index.constant(name)
            if value is None:
                raise ValueError(f"weight {name!r} of node {use.node!r} is not a constant")
            params[key] = weight_qparams(value, use.axis)
    by_node = {(u.node, u.index): u for u in plan.weights}
    for bias in plan.biases:
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


def apply_plan(model: onnx.ModelProto, plan: QDQPlan) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Return a quantized copy of ``model`` (main graph) and counts of what was inserted."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    names = NameGenerator(result)
    index = GraphIndex(graph)
    nodes = {n.name: n for n in graph.node}
    new_nodes: list[onnx.NodeProto] = []
    counts: dict[str, int] = defaultdict(int)

    weight_params = _weight_scales(index, plan, nodes)
    dequantized: dict[tuple[str, int | None, str], str] = {}
    used_params: dict[tuple[str, int], QuantParams] = {}
    stored: dict[tuple[str, int | None], tuple[str, str, int]] = {}  # (weight, axis) → (int8 name, tag, ndim)
    weight_only = set(plan.weight_only)
    for use in plan.weights:
        node = nodes[use.node]
        name = node.input[use.index]
        key = (name, use.axis)
        params = weight_params[key]
        if key not in stored:
            value = index.constant(name)
            assert value is not None
            chosen = plan.rounded.get(key)
            if chosen is not None and np.array_equal(chosen[0], params.scale):
                q_value = chosen[1].astype(params.dtype)
                counts["weights_error_compensated"] += 1
            else:
                q_value = quantize(value, params)
            tag = names.fresh(f"w{counts['weights_quantized']}")
            stored[key] = (_add_initializer(graph, names, f"{tag}q", q_value), tag, q_value.ndim)
            counts["weights_quantized"] += 1
        form = "cast" if use.node in weight_only else "dq"
        if (*key, form) not in dequantized:
            q_name, tag, ndim = stored[key]
            out = names.fresh(f"{tag}d" if form == "dq" else f"{tag}f")
            if form == "dq":
                new_nodes.append(_dequantize_node(graph, names, q_name, params, out, name, tag, constant=True))
            else:
                new_nodes += _cast_scale_nodes(graph, names, q_name, params, out, name, tag, ndim)
            dequantized[(*key, form)] = out
        used_params[(use.node, use.index)] = params
        node.input[use.index] = dequantized[(*key, form)]

    for bias in plan.biases:
        node = nodes[bias.node]
        w_params = used_params[(bias.node, bias.weight)]
        value = index.constant(node.input[bias.index])
        assert value is not None
        q_bias, scale = quantize_bias(value, float(plan.activations[bias.activation].scale), w_params.scale)
        params = QuantParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim == 1 else None)
        base = node.input[bias.index]
        tag = names.fresh(f"b{counts['biases_quantized']}")
        q_name = _add_initializer(graph, names, f"{tag}q", q_bias)
        dq_out = names.fresh(f"{tag}d")
        new_nodes.append(_dequantize_node(graph, names, q_name, params, dq_out, base, tag, constant=True))
        node.input[bias.index] = dq_out
        counts["biases_quantized"] += 1

    for table_node in plan.tables:
        node = nodes[table_node]
        table = index.constant(node.input[0])
        assert table is not None
        params = weight_qparams(table, 0)
        base = node.input[0]
        q_table = _add_initializer(graph, names, f"{base}_quantized", quantize(table, params))
        scales = _add_initializer(graph, names, f"{base}_row_scale", params.scale.reshape(-1, 1))
        rows, row_scales, as_float = (names.fresh(f"{base}_{part}") for part in ("rows", "row_scales", "rows_float"))
        output = node.output[0]
        node.input[0] = q_table
        node.output[0] = rows
        new_nodes += [
            helper.make_node("Gather", [scales, node.input[1]], [row_scales], name=names.fresh(f"{node.name}_scale"),
                             axis=0),
            helper.make_node("Cast", [rows], [as_float], name=names.fresh(f"{node.name}_cast"),
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [as_float, row_scales], [output], name=names.fresh(f"{node.name}_rescale")),
        ]
        counts["tables_quantized"] += 1

    absorbed_by_output = {nodes[n].output[0]: nodes[n] for n in plan.absorbed}
    lookups = {lookup.output: lookup for lookup in plan.lookups}
    graph_inputs = {i.name for i in graph.input}
    quantized_names: dict[str, str] = {}
    removed = set(plan.absorbed) | {n for lookup in plan.lookups for n in lookup.nodes}
    for tensor, params in plan.activations.items():
        tag = names.fresh(f"a{len(quantized_names)}")
        quantized = names.fresh(f"{tag}q")
        quantized_names[tensor] = quantized
        if tensor in lookups:
            new_nodes.append(_dequantize_node(graph, names, quantized, params, tensor, tensor, tag))
            counts["activations_quantized"] += 1
            continue
        producer = index.producer.get(tensor)
        if plan.quantized_nodes is not None and tensor not in absorbed_by_output and (
                producer is None or producer.name not in plan.quantized_nodes):
            # a float producer: only the integer readers read the DQ, float readers keep the exact value
            dq_out = names.fresh(f"{tag}d")
            for reader in index.consumers.get(tensor, ()):
                if reader.name in plan.quantized_nodes:
                    for i, name in enumerate(reader.input):
                        if name == tensor:
                            reader.input[i] = dq_out
            source = tensor
            dq = _dequantize_node(graph, names, quantized, params, dq_out, tensor, tag)
        elif tensor in graph_inputs:
            dq_out = names.fresh(f"{tag}d")
            rename_input(graph, tensor, dq_out)
            source = tensor
            dq = _dequantize_node(graph, names, quantized, params, dq_out, tensor, tag)
        else:
            absorbed = absorbed_by_output.get(tensor)
            if absorbed is not None:
                source = absorbed.input[0]
            else:
                producer = index.producer[tensor]
                source = names.fresh(f"{tag}f")
                producer.output[list(producer.output).index(tensor)] = source
            dq = _dequantize_node(graph, names, quantized, params, tensor, tensor, tag)
        scale, zero = dq.input[1], dq.input[2]
        new_nodes.append(helper.make_node("QuantizeLinear", [source, scale, zero], [quantized],
                                          name=names.fresh(f"{tensor}_q")))
        new_nodes.append(dq)
        counts["activations_quantized"] += 1

    for lookup in plan.lookups:
        region = [nodes[n] for n in lookup.nodes]
        table = lookup_table(result, region, lookup.input, lookup.output, plan.activations[lookup.input],
                             plan.activations[lookup.output])
        table_name = _add_initializer(graph, names, f"{lookup.output}_table", table)
        codes = names.fresh(f"{lookup.output}_codes")
        new_nodes.append(helper.make_node("Cast", [quantized_names[lookup.input]], [codes],
                                          name=names.fresh(f"{lookup.output}_cast"), to=onnx.TensorProto.INT32))
        new_nodes.append(helper.make_node("Gather", [table_name, codes], [quantized_names[lookup.output]],
                                          name=names.fresh(f"{lookup.output}_lookup"), axis=0))
        counts["lookup_tables"] += 1
    kept = [n for n in graph.node if n.name not in removed]
    counts["activations_absorbed"] = len(plan.absorbed)
    del graph.node[:]
    graph.node.extend(kept + new_nodes)
    toposort(graph)
    remove_unused(graph)
    _drop_stale_value_info(graph)
    return result, dict(counts)


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Drop value_info of renamed producer outputs (the names now carry DQ outputs of the same type)."""
    produced = {o for n in graph.node for o in n.output}
    keep = [v for v in graph.value_info if v.name in produced]
    if len(keep) != len(graph.value_info):
        replace_repeated(graph.value_info, keep)



def lookup_table(model: onnx.ModelProto, region: list[onnx.NodeProto], source: str, result: str,
                 source_params: QuantParams, result_params: QuantParams) -> np.ndarray:
    """Return ``Q_result(f(DQ_source(code)))`` for every code of the source type, ``f`` being ``region``."""
    from onnxopt.graph import GraphIndex as _Index
    from onnxopt.runtime import Session

    info = np.iinfo(source_params.dtype)
    codes = np.arange(info.min, info.max + 1).astype(source_params.dtype)
    values = dequantize(codes, source_params)
    index = _Index(model.graph)
    constants: list[Any] = []
    for node in region:
        for name in node.input:
            value = index.constant(name) if name else None
            if value is not None and name not in {c.name for c in constants}:
                constants.append(numpy_helper.from_array(np.asarray(value.reshape(-1)[0], dtype=value.dtype), name))
    graph = helper.make_graph(
        [_copy(n) for n in region], "lookup",
        [helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, [len(codes)])],
        [helper.make_tensor_value_info(result, onnx.TensorProto.FLOAT, None)], constants)
    mini = helper.make_model(graph, opset_imports=list(model.opset_import))
    mini.ir_version = model.ir_version
    with Session(mini, label="lookup region") as session:
        mapped = session.run({source: values})[result].reshape(-1)
    return quantize(mapped, result_params)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
