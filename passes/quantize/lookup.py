"""Lookup regions of ``quantize_int8``: found in the graph, then tabulated (private to ``quantize``).

A lookup region is a connected group of elementwise ops whose only non-constant input
is one quantized tensor and whose single result is read by a quantized node (placement
rule 7); the rewrite replaces it by ``Gather`` on the table ``Q_out(f(DQ_in(q)))`` of
every input code, computed by running the region's own nodes under onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxopt.passes.quantize.facts import GraphFacts, excluded

from onnxopt.calibration import QuantParams, dequantize, quantize
from onnxopt.graph import GraphIndex, is_default_domain
from onnxopt.runtime import Session

__all__ = ["LookupRegion", "lookup_regions", "lookup_table"]

_ELEMENTWISE = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Clip",
        "Relu",
        "HardSigmoid",
        "HardSwish",
        "Sigmoid",
        "Tanh",
        "LeakyRelu",
        "Neg",
        "Abs",
        "Erf",
        "Sqrt",
        "Exp",
        "Softplus",
        "Elu",
        "Selu",
    }
)


@dataclass(frozen=True)
class LookupRegion:
    """Elementwise nodes computing ``output = f(input)`` of one tensor; replaced by a table."""

    input: str
    output: str
    nodes: tuple[str, ...]


def _uniform_constant(g: GraphFacts, name: str) -> bool:
    value = g.index.constant(name)
    return value is not None and value.size >= 1 and bool(np.all(value == value.flat[0]))


def lookup_regions(g: GraphFacts, enabled: set[str], exclude: list[str]) -> list[LookupRegion]:
    """Return maximal elementwise regions with one activation input and one result."""
    regions = []
    taken: set[str] = set()
    for start in g.graph.node:
        if start.name in taken or start.op_type not in _ELEMENTWISE or not is_default_domain(start):
            continue
        sources = [n for n in start.input if n and not _uniform_constant(g, n)]
        if len(sources) != 1 or not g.is_activation(sources[0]):
            continue
        source = sources[0]
        members: dict[str, onnx.NodeProto] = {}
        produced = {source}
        grew = True
        while grew:
            grew = False
            for reader in [r for t in list(produced) for r in g.index.consumers.get(t, ())]:
                if (
                    reader.name in members
                    or reader.name in taken
                    or reader.op_type not in _ELEMENTWISE
                    or not is_default_domain(reader)
                    or excluded(reader, exclude)
                    or len(reader.output) != 1
                ):
                    continue
                if all(n in produced or _uniform_constant(g, n) for n in reader.input if n):
                    members[reader.name] = reader
                    produced.add(reader.output[0])
                    grew = True
        exits = [
            n.output[0]
            for n in members.values()
            if n.output[0] in g.outputs or any(r.name not in members for r in g.index.consumers.get(n.output[0], ()))
        ]
        single_activation = len(members) == 1 and next(iter(members.values())).op_type in ("Relu", "Clip")
        if len(exits) == 1 and g.is_activation(exits[0]) and not single_activation:
            order = [n.name for n in g.graph.node if n.name in members]
            regions.append(LookupRegion(source, exits[0], tuple(order)))
            taken.update(members)
    return regions


def lookup_table(
    model: onnx.ModelProto,
    region: list[onnx.NodeProto],
    source: str,
    result: str,
    source_params: QuantParams,
    result_params: QuantParams,
) -> np.ndarray:
    """Return ``Q_result(f(DQ_source(code)))`` for every code of the source type, ``f`` being ``region``."""
    info = np.iinfo(source_params.dtype)
    codes = np.arange(info.min, info.max + 1).astype(source_params.dtype)
    values = dequantize(codes, source_params)
    index = GraphIndex(model.graph)
    constants: list[Any] = []
    for node in region:
        for name in node.input:
            value = index.constant(name) if name else None
            if value is not None and name not in {c.name for c in constants}:
                constants.append(numpy_helper.from_array(np.asarray(value.reshape(-1)[0], dtype=value.dtype), name))
    graph = helper.make_graph(
        [_copy(n) for n in region],
        "lookup",
        [helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, [len(codes)])],
        [helper.make_tensor_value_info(result, onnx.TensorProto.FLOAT, None)],
        constants,
    )
    mini = helper.make_model(graph, opset_imports=list(model.opset_import))
    mini.ir_version = model.ir_version
    with Session(mini, label="lookup region") as session:
        mapped = session.run({source: values})[result].reshape(-1)
    return quantize(mapped, result_params)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
