"""Graph helpers every pass needs, on the ONNX protobuf itself.

Subgraphs (``If``/``Loop``/``Scan`` bodies) are first-class: a node whose body reads a
tensor of the enclosing graph counts as a consumer of that tensor ("outer-scope
reference"), so dead-code removal and rewrites never cut what a body still reads.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from onnxopt.external import Spill

__all__ = [
    "SHAPE_ONLY_OPS",
    "GraphIndex",
    "NameGenerator",
    "constant_node_value",
    "control_tensors",
    "drop_shape_annotations",
    "is_default_domain",
    "iter_graphs",
    "iter_tensors",
    "nested_ops",
    "node_attribute",
    "outer_references",
    "remove_unused",
    "rename_input",
    "replace_repeated",
    "set_initializer",
    "subgraphs",
    "toposort",
]


def is_default_domain(node: onnx.NodeProto) -> bool:
    """Return True for ops of the standard ONNX domain."""
    return node.domain in ("", "ai.onnx")


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """Return the graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every graph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def _iter_attr_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every stored tensor: initializers, sparse initializers and attribute tensors.

    Covers all subgraphs and the bodies of model-local functions.
    """
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from _iter_attr_tensors(graph.node)
    for function in model.functions:
        for node in function.node:
            yield from _iter_attr_tensors([node])
            for sub in subgraphs(node):
                for graph in iter_graphs(sub):
                    yield from graph.initializer
                    yield from _iter_attr_tensors(graph.node)


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Return the names ``graph`` (or any graph nested in it) reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for sub in subgraphs(node):
            used |= outer_references(sub)
        defined.update(node.output)
    # A body may return an outer value directly: its output names it without a node.
    used.update(o.name for o in graph.output)
    used.discard("")
    return used - defined


def nested_ops(graph: onnx.GraphProto, op_types: Iterable[str]) -> int:
    """Return how many nodes of ``op_types`` sit inside ``graph``'s If/Loop/Scan bodies.

    Passes that work on the main graph only use it to say what they left alone.
    """
    wanted = set(op_types)
    return sum(
        1
        for node in graph.node
        for sub in subgraphs(node)
        for g in iter_graphs(sub)
        for inner in g.node
        if inner.op_type in wanted and is_default_domain(inner)
    )


#: ops whose output depends on their input's shape only (no pass changes shapes by rounding)
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def control_tensors(graph: onnx.GraphProto, index: GraphIndex | None = None) -> set[str]:
    """Return the main-graph tensors that an ``If`` condition or a ``Loop`` trip count/condition depends on.

    A lossy pass must leave the layers writing them exact: a small error there switches
    branches or changes the number of iterations, and a check on a few held-out samples
    can miss it (an ``If`` on the sum of a pruned MatMul: cosine 0.89 on the calibration
    samples, while the held-out quarter passed). The walk stops at ``Shape``/``Size``:
    a condition on a tensor's shape does not depend on its values. ``index``: the
    caller's :class:`GraphIndex` of ``graph``, if it has one.
    """
    index = index or GraphIndex(graph)
    deciding = {"If": 1, "Loop": 2}  # If: cond; Loop: trip count M and cond
    pending = [
        name
        for node in graph.node
        if is_default_domain(node) and node.op_type in deciding
        for name in node.input[: deciding[node.op_type]]
        if name
    ]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        producer = index.producer.get(name)
        if producer is not None and not (producer.op_type in SHAPE_ONLY_OPS and is_default_domain(producer)):
            pending.extend(i for i in producer.input if i)
    return found


def node_attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Return the Python value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class GraphIndex:
    """Producers, consumers, initializers and outputs of one graph.

    Build it again after a rewrite; it is a snapshot, not a live view.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.sparse_initializers: dict[str, onnx.SparseTensorProto] = {
            s.values.name: s for s in graph.sparse_initializer
        }
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            seen: set[str] = set()
            for name in itertools.chain(node.input, *(outer_references(g) for g in subgraphs(node))):
                if name and name not in seen:
                    seen.add(name)
                    self.consumers[name].append(node)

    def uses(self, name: str) -> int:
        """Return how many nodes read ``name``, counting graph outputs as one use each."""
        return len(self.consumers.get(name, ())) + (1 if name in self.outputs else 0)

    def constant(self, name: str) -> np.ndarray | None:
        """Return the value of ``name`` when it is an initializer or a Constant output."""
        tensor = self.initializers.get(name)
        if tensor is not None and name not in self.inputs:
            from onnxopt.external import tensor_array  # external imports this module

            return tensor_array(tensor)
        sparse = self.sparse_initializers.get(name)
        if sparse is not None and name not in self.inputs:
            return _densify(sparse)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and is_default_domain(node):
            return constant_node_value(node)
        return None

    def is_constant(self, name: str) -> bool:
        """Return True when ``name`` holds a value known without running the model."""
        if (name in self.initializers or name in self.sparse_initializers) and name not in self.inputs:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant" and is_default_domain(node)


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Return the dense value of a sparse tensor (COO indices, flat or per-dimension)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, tuple(sparse.dims))
    dense[flat] = values
    return dense.reshape(tuple(sparse.dims))


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """Return the value a ``Constant`` node holds (None for sparse or unknown forms)."""
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(value)
        if attr.name == "value_float":
            return np.array(value, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(value, dtype=np.float32)
        if attr.name == "value_int":
            return np.array(value, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(value, dtype=np.int64)
    return None


def set_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray, *, spill: Spill | None = None) -> None:
    """Add initializer ``name`` holding ``array``, or replace the one with that name.

    With ``spill`` a large array is written to that file instead of held (see
    :func:`onnxopt.external.replace_initializer`).
    """
    from onnxopt.external import replace_initializer  # external imports this module

    replace_initializer(graph, name, array, spill=spill)


def drop_shape_annotations(model: onnx.ModelProto) -> int:
    """Remove every ``value_info`` entry (main graph and subgraphs); return how many there were."""
    count = 0
    for graph in iter_graphs(model.graph):
        count += len(graph.value_info)
        del graph.value_info[:]
    return count


class NameGenerator:
    """Hand out tensor and node names that are unused anywhere in the model."""

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto) -> None:
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self._used: set[str] = set()
        for g in iter_graphs(graph):
            self._used.update(i.name for i in g.input)
            self._used.update(o.name for o in g.output)
            self._used.update(t.name for t in g.initializer)
            self._used.update(sp.values.name for sp in g.sparse_initializer)
            for node in g.node:
                self._used.update(node.input)
                self._used.update(node.output)
                self._used.add(node.name)
        self._counters: dict[str, itertools.count[int]] = collections.defaultdict(itertools.count)

    def fresh(self, base: str) -> str:
        """Return a new unique name built from ``base``."""
        if base not in self._used:
            self._used.add(base)
            return base
        counter = self._counters[base]
        while True:
            candidate = f"{base}__{next(counter)}"
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every reader of ``old`` in ``graph`` (and its bodies) read ``new`` instead.

    A body that defines its own ``old`` shadows the outer one and is left alone.
    Graph outputs are not renamed. Returns the number of inputs rewritten.
    """
    count = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                count += 1
        for sub in subgraphs(node):
            if old in outer_references(sub):
                count += rename_input(sub, old, new)
    return count


def remove_unused(graph: onnx.GraphProto) -> int:
    """Delete nodes and initializers nothing reads; return how many were removed.

    Roots are the graph outputs and outer-scope reads of nested bodies; nodes with
    side effects do not exist in ONNX inference graphs, so every node is removable.
    Nested bodies are cleaned too (their roots are their own outputs).
    """
    removed = 0
    for node in graph.node:
        for sub in subgraphs(node):
            removed += remove_unused(sub)
    live = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(out in live for out in node.output if out):
            keep.append(node)
            live.update(node.input)
            for sub in subgraphs(node):
                live |= outer_references(sub)
    removed += len(graph.node) - len(keep)
    if len(keep) != len(graph.node):
        kept_ids = {id(n) for n in keep}
        survivors = [n for n in graph.node if id(n) in kept_ids]
        replace_repeated(graph.node, survivors)
    # An initializer that is also a graph input is that input's default value: keep it.
    live.update(i.name for i in graph.input)
    unused_inits = [t for t in graph.initializer if t.name not in live]
    if unused_inits:
        keep_inits = [t for t in graph.initializer if t.name in live]
        removed += len(unused_inits)
        replace_repeated(graph.initializer, keep_inits)
    unused_sparse = [sp for sp in graph.sparse_initializer if sp.values.name not in live]
    if unused_sparse:
        removed += len(unused_sparse)
        replace_repeated(graph.sparse_initializer, [sp for sp in graph.sparse_initializer if sp.values.name in live])
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer} | {o.name for o in graph.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    if stale:
        replace_repeated(graph.value_info, [v for v in graph.value_info if v.name in produced])
    return removed


def replace_repeated(field: object, items: list) -> None:
    """Make a repeated protobuf field hold exactly ``items`` (copied; safe when they came from it)."""
    copies = [type(item)() for item in items]
    for copy, item in zip(copies, items, strict=True):
        copy.CopyFrom(item)
    del field[:]  # type: ignore[attr-defined]
    field.extend(copies)  # type: ignore[attr-defined]


def toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes so every node follows its producers (stable otherwise).

    Raises ValueError on a cycle. Outer-scope reads of bodies count as inputs.
    """
    producer_index: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer_index[out] = i
    deps: list[set[int]] = []
    for i, node in enumerate(graph.node):
        names = set(node.input)
        for sub in subgraphs(node):
            names |= outer_references(sub)
        deps.append({producer_index[n] for n in names if n in producer_index} - {i})
    dependents: dict[int, list[int]] = collections.defaultdict(list)
    remaining = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            dependents[j].append(i)
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for k in dependents[i]:
            remaining[k] -= 1
            if remaining[k] == 0:
                heapq.heappush(ready, k)
    if len(order) != len(graph.node):
        raise ValueError("the graph has a cycle; it cannot be sorted")
    if order != list(range(len(order))):
        replace_repeated(graph.node, [graph.node[i] for i in order])
