"""Where ``quantize_int8`` puts Q/DQ: the nodes onnxruntime's CPU provider runs as integer kernels (private).

Rules, in order (a node that fails one stays float, with the reason recorded):

1. Only main-graph nodes of the standard domain whose op type is enabled and that the user
   did not exclude (by name, op type or a regular expression on the name) are candidates.
2. *Anchors* carry weights and become integer kernels: ``Conv``/``ConvTranspose`` (weight
   constant; → QLinearConv / QLinearConvTranspose), ``Gemm`` (→ QGemm) and ``MatMul``
   (→ QLinearMatMul, or MatMulIntegerToFloat when its output stays float). Their
   activation inputs are quantized; Conv-like outputs are quantized too (QLinearConv
   needs a quantized output; without it a DequantizeLinear weight feeding a float Conv
   is *slower* than float, since onnxruntime does not fold it).
3. *Flow* ops (Add, Mul, Concat, pooling, Relu, Clip, Sigmoid, LeakyRelu, Resize and the
   shape-only movers) are quantized only between quantized nodes: some input comes from
   a node with a quantized output *and* some reader of their output is quantized.
   Alone they would only add a Q/DQ pair.
4. A tensor is never quantized when it is a graph output (except a Conv-like anchor's own
   output, which QLinearConv needs; DequantizeLinear then writes the output), holds non-float or unknown
   types, is read as integer/shape logic (a Reshape shape, Resize scales, a comparison,
   a Cast to an integer), or was blocked after calibration (non-finite values such as
   ``-inf`` attention masks; a Concat whose inputs have very different ranges, such as
   box coordinates next to class probabilities). Nodes that need it stay float.
5. A node whose output an ``If`` condition or a ``Loop`` trip count/condition depends
   on stays float with its float weights (``onnxopt.graph.control_tensors``).
6. A ``Relu`` or ``Clip(0, M)`` right after a Conv-like anchor is absorbed: the output
   quantizer with its zero point at ``qmin`` saturates exactly like it.
7. A *lookup region* — a connected group of elementwise ops (hardswish written as
   ``x * Clip(x + 3, 0, 6) / 6``, HardSigmoid, Sigmoid, …) whose only non-constant input
   is one quantized tensor ``x`` and whose single result ``y`` is read by a quantized
   node — becomes ``Gather`` on a 256-entry table ``Q_y(f(DQ_x(q)))``: integer in,
   integer out, where float would need DQ, several float ops and Q. Opt-in (add
   ``"Lookup"`` to ``op_types``): measured on PP-OCR cls with onnxruntime 1.32, its
   element-wise ``Gather`` took 5.2 of 10.8 ms, more than the float ops it replaced.
8. ``Gather`` on axis 0 of a large 2-D float constant (an embedding table) stores the
   table as int8 with one scale per row; the gathered rows are rescaled in float.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import onnx
from onnxopt.passes.common.layers import is_depthwise
from onnxopt.passes.quantize.facts import DATA_INPUTS, GraphFacts, excluded
from onnxopt.passes.quantize.lookup import LookupRegion, lookup_regions

from onnxopt.graph import control_tensors, is_default_domain, node_attribute

__all__ = [
    "ANCHOR_OPS",
    "DEFAULT_OP_TYPES",
    "FLOW_OPS",
    "BiasUse",
    "LookupRegion",
    "Placement",
    "WeightUse",
    "place",
    "weight_axis",
]

ANCHOR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_OUTPUT_QUANTIZED_ANCHORS = frozenset({"Conv", "ConvTranspose"})
FLOW_OPS = frozenset(
    {
        "Add",
        "Mul",
        "Concat",
        "GlobalAveragePool",
        "AveragePool",
        "MaxPool",
        "Relu",
        "Clip",
        "Sigmoid",
        "LeakyRelu",
        "Resize",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
    }
)
#: Enabled by default. Measured (onnxruntime 1.32, 1 thread): PP-OCR det 480x640 int8 0.68x the
#: float latency with these; PP-OCR cls (48x192) 1.45x, too small for integer kernels to pay.
DEFAULT_OP_TYPES = ANCHOR_OPS | FLOW_OPS | {"Gather"}

_ALL_ACTIVATIONS = frozenset({"Add", "Mul", "Concat"})
_CONTROL_REASON = "its output decides an If/Loop condition (a small error there switches branches); weights kept float"
_MIN_TABLE = 4096
_MIN_WEIGHT_ONLY = 256  # smaller weights: two more nodes and a scale cost about what int8 saves


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


@dataclass
class Placement:
    """The nodes to quantize and the tensors, weights and biases that follows from them."""

    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    float_reasons: dict[str, str] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[BiasUse] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    absorbed: set[str] = field(default_factory=set)
    lookups: list[LookupRegion] = field(default_factory=list)
    observed: list[str] = field(default_factory=list)  # to calibrate: also what absorption hides
    weight_only: list[str] = field(default_factory=list)  # float anchors whose weight is stored as int8


def weight_axis(node: onnx.NodeProto, value_ndim: int, per_channel: bool) -> int | None:
    """Return the per-channel axis of ``node``'s weight (its output channels), or None for one scale."""
    if not per_channel:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if int(node_attribute(node, "group", 1)) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node_attribute(node, "transB", 0) else 1
    return value_ndim - 1 if value_ndim >= 2 else None


def _anchor_check(node: onnx.NodeProto, g: GraphFacts) -> str | None:
    inputs = list(node.input)
    if node.op_type in ("Conv", "ConvTranspose"):
        if len(inputs) < 2 or not g.index.is_constant(inputs[1]):
            return "its weight is not a constant"
        if len(inputs) > 2 and inputs[2] and not g.index.is_constant(inputs[2]):
            return "its bias is not a constant"
        return None if g.is_activation(inputs[0]) else "its input is not a float activation"
    if node.op_type == "Gemm":
        if float(node_attribute(node, "alpha", 1.0)) != 1.0 or node_attribute(node, "transA", 0):
            return "alpha != 1 or transA is set"
        if len(inputs) > 2 and inputs[2]:
            bias = g.index.constant(inputs[2])
            if bias is None or bias.ndim != 1 or float(node_attribute(node, "beta", 1.0)) != 1.0:
                return "its C input is not a constant vector with beta = 1"
    if not g.is_activation(inputs[0]):
        return "its first input is not a float activation"
    if not (g.is_activation(inputs[1]) or g.index.is_constant(inputs[1])):
        return "its second input is neither a float activation nor a constant"
    return None


def _table_check(node: onnx.NodeProto, g: GraphFacts) -> bool:
    table = g.index.constant(node.input[0])
    return (
        table is not None
        and table.ndim == 2
        and table.size >= _MIN_TABLE
        and table.dtype.kind == "f"
        and int(node_attribute(node, "axis", 0)) == 0
    )


def _clip_from_zero(node: onnx.NodeProto, g: GraphFacts) -> bool:
    if node.op_type == "Relu":
        return True
    low = g.index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attribute(node, "min")
    return low is not None and float(low) == 0.0


def place(
    model: onnx.ModelProto,
    *,
    op_types: Iterable[str] = DEFAULT_OP_TYPES,
    exclude: Iterable[str] = (),
    per_channel: bool = True,
    float_nodes: Mapping[str, str] | None = None,
    blocked: Mapping[str, str] | None = None,
    weight_only: bool = True,
    float_weights: Collection[str] = frozenset(),
    depthwise: bool = False,
) -> Placement:
    """Return the placement for ``model`` (main graph; nodes must have unique names).

    ``float_nodes`` (name → reason) are kept float on top of the rules, e.g. by the
    accuracy fallback; ``blocked`` (tensor → reason) are tensors calibration ruled out.
    ``weight_only``: an anchor kept float (by a rule or ``float_nodes``, not by the user)
    still stores its constant weight as int8, read through ``Cast`` and ``Mul`` that
    onnxruntime folds into a float initializer when the session starts: the file shrinks,
    run time does not change, and only the weight's rounding reaches the output;
    ``float_weights`` names nodes whose weight stays float all the same (the accuracy
    fallback's second step).
    ``depthwise`` (default False): depthwise convolutions compute in float (weight-only
    int8 as above). onnxruntime's int8 depthwise kernel was slower than its float one on
    both PP-OCR models (cls: 60 us against 22 us for a 200-channel 3x3 depthwise conv on
    2x96), and their few weights per channel (9 for 3x3) round coarsely with nothing to
    compensate (PP-OCR det, weights int8 and activations float, IoU of the text maps:
    0.9904 with depthwise weights int8, 0.9942 float): the accuracy fallback may return
    their weights to float.
    """
    g = GraphFacts(model)
    enabled = set(op_types)
    exclude = list(exclude)
    forced = dict(float_nodes or {})
    blocked = dict(blocked or {})
    result = Placement()
    chosen: dict[str, onnx.NodeProto] = {}
    regions = (
        {}
        if "Lookup" not in enabled
        else {r.output: r for r in lookup_regions(g, enabled, exclude) if not any(n in forced for n in r.nodes)}
    )
    in_region = {n for r in regions.values() for n in r.nodes}
    control = control_tensors(g.graph, g.index)
    for node in g.graph.node:
        if node.name in in_region:
            if node.output[0] in regions:
                chosen[node.name] = node
            continue
        if not is_default_domain(node) or node.op_type not in enabled:
            continue
        if excluded(node, exclude):
            result.float_reasons[node.name] = "excluded by the user"
        elif node.output and node.output[0] in control:
            result.float_reasons[node.name] = _CONTROL_REASON
        elif node.name in forced:
            result.float_reasons[node.name] = forced[node.name]
        elif node.op_type == "Gather":
            if _table_check(node, g):
                result.tables.append(node.name)
        elif node.op_type in ANCHOR_OPS:
            reason = _anchor_check(node, g) or (
                None
                if depthwise or not is_depthwise(node, g.index)
                else "depthwise convolution (computes in float by default)"
            )
            if reason:
                result.float_reasons[node.name] = reason
            else:
                chosen[node.name] = node
        elif node.op_type in FLOW_OPS and node.input and g.is_activation(node.input[0]):
            if node.op_type in _ALL_ACTIVATIONS and not all(g.is_activation(n) for n in node.input):
                result.float_reasons[node.name] = "has a constant input"
            else:
                chosen[node.name] = node

    def needs(node: onnx.NodeProto) -> list[str]:
        if node.output[0] in regions:
            return [regions[node.output[0]].input, node.output[0]]
        names = [n for n in node.input if g.is_activation(n)]
        if node.op_type == "Clip" or node.op_type in DATA_INPUTS:
            names = names[:1]
        if node.op_type in _OUTPUT_QUANTIZED_ANCHORS or node.op_type in FLOW_OPS:
            names += [node.output[0]]
        return names

    def quantized_output(name: str) -> bool:
        producer = g.index.producer.get(name)
        return (
            producer is not None
            and producer.name in chosen
            and (producer.op_type in _OUTPUT_QUANTIZED_ANCHORS or producer.op_type in FLOW_OPS or name in regions)
        )

    changed = True
    while changed:
        changed = False
        for name, node in list(chosen.items()):
            reason = None
            for tensor in needs(node):
                own_output = tensor == node.output[0] and node.op_type in _OUTPUT_QUANTIZED_ANCHORS
                why = blocked.get(tensor) or g.logic_reason(tensor, output_ok=own_output)
                if why:
                    reason = f"tensor {tensor!r} {why}"
                    break
            if reason is None and (node.op_type in FLOW_OPS or node.output[0] in regions):
                inputs = [regions[node.output[0]].input] if node.output[0] in regions else node.input
                feeds = any(quantized_output(t) for t in inputs)
                read = any(r.name in chosen and r.name != name for r in g.index.consumers.get(node.output[0], ()))
                if not (feeds and read):
                    reason = "no quantized neighbour on both sides (a Q/DQ pair would only add work)"
            if reason:
                del chosen[name]
                result.float_reasons[name] = reason
                changed = True

    tensors: dict[str, None] = {}
    for node in chosen.values():
        for tensor in needs(node):
            tensors[tensor] = None
        if node.output[0] in regions:
            result.lookups.append(regions[node.output[0]])
            continue
        if node.op_type in ("Relu", "Clip") and _clip_from_zero(node, g):
            source = node.input[0]
            producer = g.index.producer.get(source)
            if (
                producer is not None
                and producer.name in chosen
                and producer.op_type in _OUTPUT_QUANTIZED_ANCHORS
                and g.index.uses(source) == 1
            ):
                result.absorbed.add(node.name)
        if node.op_type in ANCHOR_OPS:
            _weights_and_bias(node, g, per_channel, result)
    if weight_only:
        for node in g.graph.node:
            if (
                node.op_type in ANCHOR_OPS
                and node.name not in chosen
                and node.name not in float_weights
                and node.output[0] not in control
                and is_default_domain(node)
                and node.op_type in enabled
                and not excluded(node, exclude)
            ):
                _weight_only(node, g, per_channel, result)
    result.observed = list(tensors)
    for name in result.absorbed:
        tensors.pop(chosen[name].input[0], None)
    result.nodes = chosen
    result.tensors = list(tensors)
    return result


def _weights_and_bias(node: onnx.NodeProto, g: GraphFacts, per_channel: bool, result: Placement) -> None:
    for i, name in enumerate(node.input[:2]):
        value = g.index.constant(name) if name else None
        if value is None or value.dtype.kind != "f":
            continue
        axis = weight_axis(node, value.ndim, per_channel) if i == 1 else None
        result.weights.append(WeightUse(node.name, i, axis))
        if i == 1 and node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            result.biases.append(BiasUse(node.name, 2, node.input[0], 1))


def _weight_only(node: onnx.NodeProto, g: GraphFacts, per_channel: bool, result: Placement) -> None:
    if len(node.input) < 2 or (node.op_type == "Gemm" and node_attribute(node, "transA", 0)):
        return
    value = g.index.constant(node.input[1])
    if value is None or value.dtype.kind != "f" or value.ndim < 2 or value.size < _MIN_WEIGHT_ONLY:
        return
    result.weights.append(WeightUse(node.name, 1, weight_axis(node, value.ndim, per_channel)))
    result.weight_only.append(node.name)
