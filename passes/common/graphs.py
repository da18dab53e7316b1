"""Graph surgery shared by the clean-up and fusion passes (private to ``onnxopt.passes``).

Every helper works on one graph at a time and treats nested bodies as readers of the
names they take from the enclosing scope, so a rewrite never cuts what a body reads.
Names are assumed unique across the model (ONNX's SSA rule); a body that redefines a
name shadows it and is left alone by renames.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import version_converter

from onnxopt.external import tensor_array
from onnxopt.graph import GraphIndex, iter_graphs, subgraphs
from onnxopt.normalize import infer_shapes

__all__ = [
    "Scope",
    "TypeMap",
    "bypass_node",
    "defined_names",
    "opset_version",
    "remove_nodes",
    "rename_uses",
    "upgrade_opset",
    "walk_scopes",
]

#: Ops whose result differs between runs: never folded, never merged.
NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """Return the model's opset for ``domain`` (0 when not imported)."""
    for opset in model.opset_import:
        if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
            return int(opset.version)
    return 0


def upgrade_opset(
    model: onnx.ModelProto, version: int, *, needed_for: str, otherwise: str, notes: list[str]
) -> onnx.ModelProto:
    """Return ``model`` converted to opset ``version`` of the default domain, saying so in ``notes``.

    When onnx's version converter fails, ``model`` comes back unchanged and the note says
    why and what the pass does instead (``otherwise``). Callers check the current opset
    first: a model already at ``version`` or above is not converted.
    """
    current = opset_version(model)
    try:
        upgraded = version_converter.convert_version(model, version)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        notes.append(f"could not upgrade opset {current} -> {version} for {needed_for} ({str(exc)[:120]}); {otherwise}")
        return model
    notes.append(f"upgraded the model from opset {current} to {version} ({needed_for} needs it)")
    return upgraded


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Return the names ``graph`` itself defines (inputs, initializers, node outputs)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def rename_uses(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> int:
    """Make every reader of a key of ``mapping`` (here and in nested bodies) read its value.

    Graph outputs are not renamed; a body that defines a name itself shadows it.
    Returns the number of inputs rewritten.
    """
    if not mapping:
        return 0
    count = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
                count += 1
        for sub in subgraphs(node):
            inner = {k: v for k, v in mapping.items() if k not in defined_names(sub)}
            count += rename_uses(sub, inner)
            for out in sub.output:
                if out.name in inner:  # a body passing an outer value straight through
                    out.name = inner[out.name]
                    count += 1
    return count


def remove_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Delete ``nodes`` from ``graph`` in place (other node references stay valid)."""
    for node in nodes:
        graph.node.remove(node)


def _rename_value_info(graph: onnx.GraphProto, old: str, new: str) -> None:
    for info in graph.value_info:
        if info.name == old:
            info.name = new


def bypass_node(graph: onnx.GraphProto, index: GraphIndex, node: onnx.NodeProto, source: str) -> str | None:
    """Remove ``node``, whose first output equals ``source``, rewiring readers to ``source``.

    When that output is a graph output its name must survive: the producer of ``source``
    (in this graph) is renamed to write it, which is safe only if ``source`` is itself
    neither a graph input, an initializer nor a graph output. Returns None on success,
    otherwise the reason the node was kept.
    """
    output = node.output[0]
    if output not in index.outputs:
        graph.node.remove(node)
        rename_uses(graph, {output: source})
        return None
    producer = index.producer.get(source)
    if producer is None:
        return f"{node.op_type} {output!r} is a graph output fed by an input, initializer or outer value"
    if source in index.outputs:
        return f"{node.op_type} {output!r} copies another graph output"
    graph.node.remove(node)
    for i, name in enumerate(producer.output):
        if name == source:
            producer.output[i] = output
    rename_uses(graph, {source: output})
    _rename_value_info(graph, source, output)
    return None


# --------------------------------------------------------------------------- types


class TypeMap:
    """Types of tensors as shape inference sees them (intermediate value_info recomputed).

    A name that several graphs define with different types is dropped as ambiguous.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._types: dict[str, onnx.TypeProto] | None = None
        self._note: str | None = None

    @property
    def note(self) -> str | None:
        """Return why shape inference failed, if it did."""
        self._infer()
        return self._note

    @property
    def types(self) -> dict[str, onnx.TypeProto]:
        """Return the known types by name (inferred on first use)."""
        return self._infer()

    def _infer(self) -> dict[str, onnx.TypeProto]:
        if self._types is not None:
            return self._types
        probe = _light_copy(self._model)
        inferred, self._note = infer_shapes(probe)
        types: dict[str, onnx.TypeProto] = {}
        ambiguous: set[str] = set()
        for graph in iter_graphs(inferred.graph):
            for info in [*graph.input, *graph.output, *graph.value_info]:
                self._add(types, info.name, info.type, ambiguous)
            for tensor in graph.initializer:
                self._add(
                    types,
                    tensor.name,
                    onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)),
                    ambiguous,
                )
        for name in ambiguous:
            types.pop(name, None)
        self._types = types
        return types

    @staticmethod
    def _add(types: dict[str, onnx.TypeProto], name: str, type_proto: onnx.TypeProto, ambiguous: set[str]) -> None:
        if not type_proto.HasField("tensor_type"):
            return
        known = types.get(name)
        if known is not None and known != type_proto:
            ambiguous.add(name)
        types[name] = type_proto

    def elem_type(self, name: str) -> int | None:
        """Return the element type of ``name`` or None."""
        t = self.types.get(name)
        return t.tensor_type.elem_type or None if t is not None else None

    def dims(self, name: str) -> list[int | None] | None:
        """Return the dims of ``name`` (None for a dynamic or symbolic dim), None if rank unknown."""
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in t.tensor_type.shape.dim]

    def rank(self, name: str) -> int | None:
        """Return the rank of ``name`` or None."""
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """Return the shape of ``name`` if every dim is a known number."""
        dims = self.dims(name)
        if dims is None or any(d is None for d in dims):
            return None
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy ``model`` for shape inference: no intermediate value_info, large weights as typed inputs.

    Shape inference reads the values of small (shape-like) initializers only, so large
    ones become graph inputs of the same type; the copy then costs little memory.
    """
    probe = onnx.ModelProto(ir_version=model.ir_version)
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    graph, copy = model.graph, probe.graph
    copy.name = graph.name
    copy.node.extend(graph.node)
    copy.input.extend(graph.input)
    copy.output.extend(graph.output)
    copy.sparse_initializer.extend(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor.ByteSize() <= _SMALL_TENSOR_BYTES:
            copy.initializer.append(tensor)
        elif tensor.name not in inputs:
            copy.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for sub in iter_graphs(copy):
        del sub.value_info[:]
    return probe


_SMALL_TENSOR_BYTES = 4096


# --------------------------------------------------------------------------- scopes


@dataclass
class Scope:
    """One graph with what it can see: constants of enclosing graphs and its own."""

    graph: onnx.GraphProto
    outer_constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    depth: int = 0

    @property
    def is_main(self) -> bool:
        """Return True for the model's main graph."""
        return self.depth == 0

    def constants(self) -> dict[str, onnx.TensorProto]:
        """Return every constant tensor visible in this graph by name (inner shadows outer)."""
        visible = {k: v for k, v in self.outer_constants.items() if k not in defined_names(self.graph)}
        inputs = {i.name for i in self.graph.input}
        visible.update({t.name: t for t in self.graph.initializer if t.name not in inputs})
        return visible

    def constant(self, name: str) -> np.ndarray | None:
        """Return the value of a visible constant, or None."""
        tensor = self.constants().get(name)
        return None if tensor is None else tensor_array(tensor)


def walk_scopes(model: onnx.ModelProto, visit: Callable[[Scope], None]) -> None:
    """Call ``visit`` on the main graph, then on every nested body, outermost first.

    A graph is visited before its bodies and the bodies are found after the visit, so
    ``visit`` may restructure its graph freely (inline an If, drop nodes).
    """

    def go(scope: Scope) -> None:
        visit(scope)
        visible = scope.constants()
        for node in list(scope.graph.node):
            for sub in subgraphs(node):
                go(Scope(sub, visible, scope.depth + 1))

    go(Scope(model.graph))
