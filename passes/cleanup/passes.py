"""Exact clean-up passes: constant folding, shape simplification, no-ops, duplicates, dead code.

None of these changes a number the model computes: a folded value is what
onnxruntime computes for that node, a removed node returned its input unchanged, a
merged node computed the same thing twice. Every pass walks ``If``/``Loop``/``Scan``
bodies, counts a body's reads of outer names as uses, keeps graph outputs' names and
leaves ops of non-default domains alone.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import numpy_helper
from onnxopt.passes.cleanup.evaluate import EvaluationError, evaluate_node, predicted_bytes, tensor_bytes
from onnxopt.passes.cleanup.inline import definition_counts, inline_if, replace_with_constants
from onnxopt.passes.cleanup.noops import NOOP_RULES, compose_perm, merge_slices
from onnxopt.passes.cleanup.shapes import ShapeValue, output_dtype, propagate, shape_value
from onnxopt.passes.common.graphs import (
    NONDETERMINISTIC,
    Scope,
    TypeMap,
    bypass_node,
    opset_version,
    walk_scopes,
)

from onnxopt.external import tensor_array
from onnxopt.graph import GraphIndex, NameGenerator, is_default_domain, node_attribute, remove_unused, subgraphs
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

__all__ = ["EliminateDeadCode", "FoldConstants", "RemoveIdentities", "SimplifyShapes"]

_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_SHAPE_OPS = {"Shape", "Size", "Gather", "Slice", "Concat"}


def _notes(skipped: collections.Counter[str]) -> list[str]:
    return [f"{reason} (x{count})" for reason, count in sorted(skipped.items())]


@register_pass
class FoldConstants(Pass):
    """Replace nodes whose inputs are all constant by the values they compute.

    Rules:
    1. A default-domain node whose inputs are initializers (of its graph or an enclosing
       one) is run once by onnxruntime (the reference evaluator as fallback); its outputs
       become initializers (a graph output becomes a ``Constant`` node, keeping its name).
    2. An ``If`` whose condition is constant is replaced by the nodes of the branch taken.
    Never folded: random ops, QuantizeLinear/DequantizeLinear (their pairs mean something
    to quantized runtimes), ops of other domains, nodes with bodies (other than rule 2),
    and outputs above ``max_bytes`` or more than ``max_growth`` times their inputs' size
    (unless under ``small_bytes``) — folding never inflates the file.
    """

    name = "fold_constants"
    exact = True

    def __init__(self, *, max_bytes: int = 1 << 20, max_growth: float = 4.0, small_bytes: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_growth = max_growth
        self.small_bytes = small_bytes

    def _too_large(self, out_bytes: int, in_bytes: int) -> bool:
        if out_bytes <= self.small_bytes:
            return False
        return out_bytes > self.max_bytes or out_bytes > self.max_growth * max(in_bytes, 1)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Fold every constant node the rules allow."""
        stats: collections.Counter[str] = collections.Counter()
        skipped: collections.Counter[str] = collections.Counter()
        opsets = list(model.opset_import)
        names = NameGenerator(model)
        counts = definition_counts(model)

        def fold_once(scope: Scope) -> bool:
            """Fold what can be folded; return True after inlining an If (restart the scan)."""
            constants = scope.constants()
            for node in list(scope.graph.node):
                inputs = [n for n in node.input if n]
                if node.op_type == "If" and is_default_domain(node) and node.input[0] in constants:
                    condition = bool(tensor_array(constants[node.input[0]]).reshape(-1)[0])
                    inline_if(scope.graph, node, condition, names, counts)
                    stats["if_inlined"] += 1
                    return True
                if not inputs or not all(n in constants for n in inputs) or node.op_type == "Constant":
                    continue
                reason = self._refusal(node)
                if reason:
                    skipped[reason] += 1
                    continue
                given = {n: constants[n] for n in inputs}
                in_bytes = sum(tensor_bytes(t) for t in given.values())
                predicted = predicted_bytes(node, given)
                if predicted is not None and self._too_large(predicted, in_bytes):
                    skipped[f"{node.op_type} left unfolded: its output would exceed the size cap"] += 1
                    continue
                try:
                    values = evaluate_node(node, given, opsets, model.ir_version)
                except EvaluationError as exc:
                    skipped[f"could not evaluate {exc}"] += 1
                    continue
                if any(v.dtype == object for v in values):
                    skipped[f"{node.op_type} returns a non-tensor value"] += 1
                    continue
                if self._too_large(sum(v.nbytes for v in values), in_bytes):
                    skipped[f"{node.op_type} left unfolded: its output would exceed the size cap"] += 1
                    continue
                stats["folded"] += 1
                if replace_with_constants(scope.graph, node, values, constants):
                    return True
            return False

        def visit(scope: Scope) -> None:
            while fold_once(scope):
                pass

        walk_scopes(model, visit)
        return PassResult(model, bool(stats), dict(stats), _notes(skipped))

    @staticmethod
    def _refusal(node: onnx.NodeProto) -> str | None:
        if not is_default_domain(node):
            return f"left {node.domain}::{node.op_type} alone: unknown domain"
        if node.op_type in NONDETERMINISTIC or node.op_type.startswith("Random"):
            return f"never fold non-deterministic {node.op_type}"
        if node.op_type in _QDQ:
            return f"kept {node.op_type} (QDQ pairs are not folded)"
        if subgraphs(node):
            return f"kept {node.op_type} with a body"
        return None


@register_pass
class SimplifyShapes(Pass):
    """Replace shape queries whose answer is static by constants (fold_constants does the rest).

    Rules, with shapes from ONNX shape inference run afresh on the current model:
    1. ``Shape`` (with its start/end) of a tensor whose selected dims are all numbers.
    2. ``Size`` of a tensor with a fully static shape (``Size(Shape(x))`` is the rank).
    3. ``Gather``/``Slice``/``Concat`` of shape values (tracked element by element through
       Shape, Gather, Slice, Unsqueeze, Squeeze, Concat and integer Cast) that pick only
       static dims, even when other dims of ``x`` are dynamic.
    4. A ``Reshape(x, target)`` whose target mixes numbers with ``x``'s own dims at the
       same position gets a constant target with 0 there ("copy this dim"; allowzero=0).
    Symbolic and unknown dims are never replaced by numbers; dynamic models stay dynamic.
    """

    name = "simplify_shapes"
    exact = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Replace every static shape query."""
        types = TypeMap(model)
        names = NameGenerator(model)
        stats: collections.Counter[str] = collections.Counter()
        notes = [types.note] if types.note else []

        def visit(scope: Scope) -> None:
            constants = scope.constants()
            known: dict[str, ShapeValue] = {}

            def constant(name: str) -> np.ndarray | None:
                tensor = constants.get(name)
                return None if tensor is None else tensor_array(tensor)

            for node in list(scope.graph.node):
                if not is_default_domain(node) or not node.input or not node.output:
                    continue
                if (
                    node.op_type == "Reshape"
                    and node.input[1] in known
                    and self._copy_dims(node, known, scope, names, constants)
                ):
                    stats["reshape_targets_resolved"] += 1
                    continue
                value: np.ndarray | None
                tracked = None if node.op_type == "Size" else propagate(node, known, constant, types)
                if tracked is not None and all(isinstance(e, int) for e in tracked.elements):
                    value = np.array(tracked.elements, dtype=np.int64)
                    value = value.reshape(()) if tracked.scalar else value
                elif node.op_type == "Size":
                    value = shape_value(node, types)
                else:
                    if tracked is not None:
                        known[node.output[0]] = tracked
                    continue
                dtype = output_dtype(node, types)
                if value is not None and dtype is not None and node.op_type in _SHAPE_OPS:
                    replace_with_constants(scope.graph, node, [value.astype(dtype)], constants)
                    stats[f"{node.op_type.lower()}_resolved"] += 1

        walk_scopes(model, visit)
        return PassResult(model, bool(stats), dict(stats), notes)

    @staticmethod
    def _copy_dims(
        node: onnx.NodeProto,
        known: dict[str, ShapeValue],
        scope: Scope,
        names: NameGenerator,
        constants: dict[str, onnx.TensorProto],
    ) -> bool:
        """Give a Reshape a constant target when its dynamic entries copy its input's own dims (as 0)."""
        if node_attribute(node, "allowzero", 0):
            return False
        target = []
        for position, element in enumerate(known[node.input[1]].elements):
            if isinstance(element, int):
                target.append(element)
            elif element == (node.input[0], position):
                target.append(0)
            else:
                return False
        name = names.fresh(f"{node.output[0]}_shape")
        tensor = numpy_helper.from_array(np.array(target, dtype=np.int64), name)
        scope.graph.initializer.append(tensor)
        constants[name] = tensor
        node.input[1] = name
        return True


@register_pass
class RemoveIdentities(Pass):
    """Remove nodes that return their input unchanged and merge chained layout ops.

    Rules (default domain only; see ``_noops`` for each op's proof obligations):
    1. Identity; Dropout without a used mask and not in training mode; Cast to the
       input's own type; Reshape to the input's static shape; Transpose with the identity
       perm; Pad with zero pads; Slice covering every element; Expand that does not grow;
       Concat of one input.
    2. Transpose of a Transpose becomes one Transpose (none when the perms cancel).
    3. Reshape of a Reshape reads the first Reshape's input when its target has no 0
       copying a dim of the intermediate.
    4. Slice of a Slice along different axes (constant bounds) becomes one Slice.
    A graph output keeps its name: the producer of the removed node's input is renamed
    to it, or the node stays when that input is a graph input, initializer, outer value
    or another graph output.
    """

    name = "remove_identities"
    exact = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Remove every provable no-op."""
        types = TypeMap(model)
        names = NameGenerator(model)
        opset = opset_version(model)
        stats: collections.Counter[str] = collections.Counter()
        skipped: collections.Counter[str] = collections.Counter()

        def visit(scope: Scope) -> None:
            graph = scope.graph
            index = GraphIndex(graph)
            for node in list(graph.node):
                if not is_default_domain(node) or not node.input:
                    continue
                producer = index.producer.get(node.input[0])
                if self._merge_chain(node, producer, scope, types, names):
                    stats[f"{node.op_type.lower()}_chains_merged"] += 1
                    index = GraphIndex(graph)
                rule = NOOP_RULES.get(node.op_type)
                if rule is None:
                    continue
                source = rule(node, scope.constant, types, opset)
                if source is None:
                    continue
                if source.startswith("skip: "):
                    skipped[f"kept {node.op_type}: {source[6:]}"] += 1
                    continue
                renames_producer = node.output[0] in index.outputs
                reason = bypass_node(graph, index, node, source)
                if reason:
                    skipped[f"kept {reason}"] += 1
                    continue
                stats[f"{node.op_type.lower()}_removed"] += 1
                # Only a graph-output bypass renames a producer's output; otherwise every reader
                # of the removed output now reads ``source``, whose producer entry still holds,
                # and re-indexing after each removal would make the pass quadratic in nodes.
                if renames_producer:
                    index = GraphIndex(graph)

        walk_scopes(model, visit)
        notes = [f"{reason} (x{count})" for reason, count in sorted(skipped.items()) if count]
        return PassResult(model, bool(stats), dict(stats), notes[:20])

    @staticmethod
    def _merge_chain(
        node: onnx.NodeProto, producer: onnx.NodeProto | None, scope: Scope, types: TypeMap, names: NameGenerator
    ) -> bool:
        if producer is None or producer.op_type != node.op_type or not is_default_domain(producer):
            return False
        if node.op_type == "Slice":
            merged = merge_slices(producer, node, scope.constant, types.rank(node.input[0]))
            if merged is None:
                return False
            node.input[0] = producer.input[0]
            for position, array in enumerate(merged, start=1):
                name = names.fresh(f"{node.output[0]}_{('starts', 'ends', 'axes', 'steps')[position - 1]}")
                scope.graph.initializer.append(numpy_helper.from_array(array, name))
                if position < len(node.input):
                    node.input[position] = name
                else:
                    node.input.append(name)
            return True
        if node.op_type == "Transpose":
            first, second = node_attribute(producer, "perm"), node_attribute(node, "perm")
            if first is None or second is None or len(first) != len(second):
                return False
            perm = compose_perm(list(first), list(second))
            node.input[0] = producer.input[0]
            for attr in node.attribute:
                if attr.name == "perm":
                    del attr.ints[:]
                    attr.ints.extend(perm)
            return True
        if node.op_type == "Reshape" and len(node.input) > 1:
            target = scope.constant(node.input[1])
            if target is None or (0 in target.reshape(-1) and not node_attribute(node, "allowzero", 0)):
                return False
            node.input[0] = producer.input[0]
            return True
        return False


@register_pass
class EliminateDeadCode(Pass):
    """Delete nodes and initializers no output depends on, in every graph.

    Rules:
    1. Roots are graph outputs and what nested bodies read from outer scopes.
    2. Main-graph inputs are never removed (they are the model's interface); an
       initializer that doubles as a main-graph input (a default value) is kept.
    3. Loop/Scan body inputs are positional and If branches have none, so no body input
       is ever removed.
    """

    name = "eliminate_dead_code"
    exact = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Remove everything unused (``remove_unused`` keeps a graph input's default, rule 2)."""
        removed = remove_unused(model.graph)
        return PassResult(model, removed > 0, {"removed": removed} if removed else {}, [])
