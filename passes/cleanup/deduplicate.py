"""Deduplication: merge identical initializers and nodes that compute the same value (``deduplicate``)."""

from __future__ import annotations

import collections

import onnx
from onnxopt.passes.common.graphs import (
    NONDETERMINISTIC,
    Scope,
    rename_uses,
    walk_scopes,
)

from onnxopt.external import tensor_digest, tensor_fingerprint
from onnxopt.graph import is_default_domain
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

__all__ = ["Deduplicate"]


def _quick_key(tensor: onnx.TensorProto) -> tuple[object, ...]:
    # dtype, shape and a few sampled blocks: only tensors that agree on it are hashed in
    # full, so a large model's weights are not all read (each round) to find no duplicate.
    return (tensor.data_type, tuple(tensor.dims), tensor_fingerprint(tensor))


def _merge_map(
    outer: list[tuple[str, onnx.TensorProto]], own: list[onnx.TensorProto]
) -> tuple[dict[str, str], list[onnx.TensorProto]]:
    """Return (duplicate name -> kept name, duplicate tensors) over outer constants, then own initializers."""
    groups: dict[tuple[object, ...], list[tuple[str, onnx.TensorProto, bool]]] = collections.defaultdict(list)
    for name, tensor in outer:
        groups[_quick_key(tensor)].append((name, tensor, False))
    for tensor in own:
        groups[_quick_key(tensor)].append((tensor.name, tensor, True))
    mapping: dict[str, str] = {}
    duplicates: list[onnx.TensorProto] = []
    for members in groups.values():
        if len(members) < 2 or not any(is_own for _, _, is_own in members):
            continue
        first: dict[bytes, str] = {}
        for name, tensor, is_own in members:
            digest = tensor_digest(tensor)  # a digest, not the bytes: no copy of the model in the keys
            if digest not in first:
                first[digest] = name
            elif is_own:
                mapping[name] = first[digest]
                duplicates.append(tensor)
    return mapping, duplicates


@register_pass
class Deduplicate(Pass):
    """Merge initializers with equal content and nodes that compute the same thing.

    Rules:
    1. Initializers of one graph with equal dtype, shape and bytes become one (graph
       inputs and outputs are never merged).
    2. Default-domain nodes with the same op, attributes (bodies included) and inputs
       become one; random ops never merge; a node whose output is a graph output is kept.
    """

    name = "deduplicate"
    exact = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Merge every duplicate."""
        stats: collections.Counter[str] = collections.Counter()

        def visit(scope: Scope) -> None:
            graph = scope.graph
            protected = {i.name for i in graph.input} | {o.name for o in graph.output}
            own = [t for t in graph.initializer if t.name not in protected]
            layouts = {(t.data_type, tuple(t.dims)) for t in own}
            # a body's initializer equal to an outer one reads the outer one instead
            shadowed = {t.name for t in graph.initializer} | protected
            outer = [
                (name, tensor)
                for name, tensor in scope.outer_constants.items()
                if name not in shadowed and (tensor.data_type, tuple(tensor.dims)) in layouts
            ]
            mapping, duplicates = _merge_map(outer, own)
            for tensor in duplicates:
                graph.initializer.remove(tensor)
            rename_uses(graph, mapping)
            stats["initializers_merged"] += len(duplicates)
            seen: dict[tuple[object, ...], onnx.NodeProto] = {}
            for node in list(graph.node):
                if (
                    not is_default_domain(node)
                    or node.op_type in NONDETERMINISTIC
                    or node.op_type.startswith("Random")
                    or not node.input
                ):
                    continue
                key = (
                    node.op_type,
                    tuple(node.input),
                    len(node.output),
                    tuple(
                        a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name)
                    ),
                )
                kept = seen.get(key)
                if kept is None:
                    seen[key] = node
                    continue
                pairs = dict(zip(node.output, kept.output, strict=True))
                if any(o in protected or (o and not k) for o, k in pairs.items()):
                    continue
                graph.node.remove(node)
                rename_uses(graph, {o: k for o, k in pairs.items() if o})
                stats["nodes_merged"] += 1

        walk_scopes(model, visit)
        return PassResult(model, any(stats.values()), {k: v for k, v in stats.items() if v}, [])
