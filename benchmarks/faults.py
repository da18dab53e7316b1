"""Faults a gate must catch and rewrites it must pass, for the gate test and the harness benchmark.

Every function changes the model in place and returns it. Weights are looked for as
initializers (normalize the model first: Paddle exports keep them in Constant nodes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import iter_graphs, toposort

__all__ = [
    "ACTIVATIONS",
    "FAULTS",
    "REWRITES",
    "activation_to_identity",
    "output_becomes_nan",
    "rename_internal_tensors",
    "reorder_nodes",
    "scale_weight_slice",
    "shift_weight_values",
    "target_weight",
    "weight_tensors",
]

ACTIVATIONS = ("Relu", "HardSigmoid", "Clip", "LeakyRelu", "HardSwish", "Tanh")


def weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Float initializers of rank >= 2 that feed a Conv/MatMul/Gemm/LSTM (any graph), largest first."""
    graphs = list(iter_graphs(model.graph))
    weight_inputs = {
        name
        for graph in graphs
        for node in graph.node
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM")
        for name in node.input[1:3]
    }
    found = [
        tensor
        for graph in graphs
        for tensor in graph.initializer
        if tensor.name in weight_inputs and len(tensor.dims) >= 2 and tensor.data_type == onnx.TensorProto.FLOAT
    ]
    found.sort(key=lambda t: -int(np.prod(t.dims)))
    return found


def target_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    """Return the weight the weight faults change: a third of the way down the size order."""
    weights = weight_tensors(model)
    return weights[len(weights) // 3]


def _edit_weight(model: onnx.ModelProto, change: Callable[[np.ndarray], None]) -> onnx.ModelProto:
    tensor = target_weight(model)
    value = numpy_helper.to_array(tensor).copy()
    change(value)
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def scale_weight_slice(model: onnx.ModelProto) -> onnx.ModelProto:
    """Scale the first quarter of the target weight's leading axis by 1.3."""

    def change(w: np.ndarray) -> None:
        w[: max(1, w.shape[0] // 4)] *= 1.3

    return _edit_weight(model, change)


def shift_weight_values(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shift 2 % of the target weight's values by 5 % of its range."""

    def change(w: np.ndarray) -> None:
        rng = np.random.default_rng(0)
        flat = w.reshape(-1)
        picked = rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)
        flat[picked] += 0.05 * (flat.max() - flat.min())

    return _edit_weight(model, change)


def activation_to_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the middle activation of every graph that has one by Identity.

    If branches hold copies of the network (one per sample rate, in Silero), so the
    fault must reach whichever branch runs.
    """
    for graph in iter_graphs(model.graph):
        nodes = [n for n in graph.node if n.op_type in ACTIVATIONS]
        if nodes:
            node = nodes[len(nodes) // 2]
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    return model


def output_becomes_nan(model: onnx.ModelProto) -> onnx.ModelProto:
    """Multiply the first graph output by NaN."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_before_nan"
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_value"))
    model.graph.node.append(helper.make_node("Mul", [out + "_before_nan", "nan_value"], [out]))
    return model


def reorder_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shuffle the nodes of every graph, then restore a topological order."""
    rng = np.random.default_rng(0)
    for graph in iter_graphs(model.graph):
        order = rng.permutation(len(graph.node))
        nodes = [onnx.NodeProto() for _ in order]
        for copy, index in zip(nodes, order, strict=True):
            copy.CopyFrom(graph.node[int(index)])
        del graph.node[:]
        graph.node.extend(nodes)
        toposort(graph)
    return model


def rename_internal_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename every main-graph tensor that is not an input, output or initializer."""
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    mapping: dict[str, str] = {}
    for node in graph.node:
        for name in node.output:
            if name and name not in keep:
                mapping[name] = f"renamed_{len(mapping)}"
    for sub in iter_graphs(graph):  # subgraphs read outer-scope tensors by name
        for node in sub.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            if sub is graph:
                node.output[:] = [mapping.get(n, n) for n in node.output]
    del graph.value_info[:]
    return model


FAULTS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "scale_weight_slice_by_1.3": scale_weight_slice,
    "activation_to_identity": activation_to_identity,
    "shift_2pct_of_weight_by_5pct_of_range": shift_weight_values,
    "output_becomes_nan": output_becomes_nan,
}
REWRITES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "itself": lambda m: m,
    "reordered_nodes": reorder_nodes,
    "renamed_internal_tensors": rename_internal_tensors,
}
