"""Replace constants and inline branches in place (private to ``onnxopt.passes``)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxopt.passes.common.graphs import rename_uses

from onnxopt.graph import NameGenerator, iter_graphs, toposort

__all__ = ["definition_counts", "inline_if", "replace_with_constants"]


def replace_with_constants(
    graph: onnx.GraphProto, node: onnx.NodeProto, values: list[np.ndarray], constants: dict[str, onnx.TensorProto]
) -> bool:
    """Replace ``node`` by its computed output ``values``.

    Outputs become initializers of ``graph`` (recorded in ``constants``); an output that
    is also a graph output becomes a ``Constant`` node instead, so its name survives.
    Returns True when the node list was rebuilt (earlier node references are stale).
    """
    outputs = {o.name for o in graph.output}
    names = [o for o in node.output if o]
    as_nodes = []
    for name, value in zip(names, values, strict=True):
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if name in outputs:
            as_nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            graph.initializer.append(tensor)
            constants[name] = tensor
    if len(as_nodes) == 1:
        node.CopyFrom(as_nodes[0])  # in place: the node keeps its position and references stay valid
        return False
    graph.node.extend(as_nodes)
    graph.node.remove(node)
    if as_nodes:
        toposort(graph)
    return bool(as_nodes)


def definition_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    """Count how many places define each name (inputs, initializers, node outputs), bodies included."""
    counts: collections.Counter[str] = collections.Counter()
    for graph in iter_graphs(model.graph):
        counts.update(i.name for i in graph.input)
        counts.update(t.name for t in graph.initializer)
        for node in graph.node:
            counts.update(o for o in node.output if o)
    return counts


def inline_if(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    condition: bool,
    names: NameGenerator,
    counts: collections.Counter[str],
) -> None:
    """Replace an ``If`` whose condition is known by the nodes of the branch it takes.

    Names the branch defines that are also defined elsewhere get fresh names; each
    branch output produced by a branch node takes the If output's name, others are
    copied by an ``Identity`` (an initializer or an outer value passed through).
    """
    attr_name = "then_branch" if condition else "else_branch"
    branch = onnx.GraphProto()
    for attr in node.attribute:
        if attr.name == attr_name:
            branch.CopyFrom(attr.g)
    produced = [o for n in branch.node for o in n.output if o]
    mapping: dict[str, str] = {}
    for name in [*produced, *(t.name for t in branch.initializer)]:
        if counts[name] > 1:
            mapping[name] = names.fresh(name)
    taken: set[str] = set()
    identities: list[onnx.NodeProto] = []
    for if_output, branch_output in zip(node.output, branch.output, strict=False):
        source = branch_output.name
        if not if_output:
            continue
        if source in produced and source not in taken:
            mapping[source] = if_output
            taken.add(source)
        else:
            identities.append(
                helper.make_node(
                    "Identity", [mapping.get(source, source)], [if_output], name=names.fresh(f"{if_output}_inlined")
                )
            )
    for inner in branch.node:
        for i, out in enumerate(inner.output):
            if out in mapping:
                inner.output[i] = mapping[out]
    for tensor in branch.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    rename_uses(branch, mapping)
    if_outputs = set(node.output)
    graph.node.remove(node)
    graph.node.extend(branch.node)
    graph.node.extend(identities)
    graph.initializer.extend(branch.initializer)
    for info in branch.value_info:
        info.name = mapping.get(info.name, info.name)
        if info.name not in if_outputs:
            graph.value_info.append(info)
    toposort(graph)
