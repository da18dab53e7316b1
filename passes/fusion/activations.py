"""Activation and normalization fusions: LayerNorm, GELU, HardSwish/HardSigmoid (see ``fusion``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.graphs import Scope, TypeMap, opset_version, upgrade_opset, walk_scopes
from onnxopt.passes.fusion.base import Fusion, ModelMatcher, Rewrite, add_weight
from onnxopt.passes.fusion.match import Matcher, NoMatch
from onnxopt.passes.fusion.patterns import erf_argument, hard_sigmoid_product, normalized_constant, tanh_argument

from onnxopt.graph import NameGenerator, is_default_domain
from onnxopt.pipeline import register_pass

__all__ = ["FuseGelu", "FuseHardSwish", "FuseLayerNorm"]


@register_pass
class FuseLayerNorm(Fusion):
    """Replace the exported LayerNorm subgraph by ``LayerNormalization`` (opset >= 17).

    Matches ``ReduceMean(x) → Sub(x, ·) → Pow(·, 2) → ReduceMean → Add(eps) → Sqrt →
    Div(Sub, ·)`` with optional ``Mul(gamma)`` and ``Add(beta)``, reducing the trailing
    axes (an attribute below opset 18, an input from 18) with keepdims. gamma and beta
    must be constants varying only over the normalized axes, whose sizes must be static.
    Below opset 17 the pattern is left and counted in the notes.
    """

    name = "fuse_layernorm"
    exact = True
    anchors = ("ReduceMean",)
    min_opset = 17
    produces = "LayerNormalization"

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match the LayerNorm subgraph starting at its first ReduceMean."""
        x = node.input[0]
        sub = m.sole_consumer(node.output[0], "Sub")
        if list(sub.input) != [x, node.output[0]]:
            raise NoMatch("Sub is not x - mean")
        m.private(sub.output[0], readers=2)
        readers = m.index.consumers[sub.output[0]]
        square = next((r for r in readers if r.op_type in ("Pow", "Mul")), None)
        divide = next((r for r in readers if r.op_type == "Div" and list(r.input[:1]) == [sub.output[0]]), None)
        if square is None or divide is None:
            raise NoMatch("centred value does not feed Pow and Div")
        if square.op_type == "Pow":
            m.scalar(square.input[1], 2.0)
        elif list(square.input) != [sub.output[0]] * 2:
            raise NoMatch("Mul is not a square")
        variance = m.sole_consumer(square.output[0], "ReduceMean")
        add_eps = m.sole_consumer(variance.output[0], "Add")
        epsilon = m.scalar(m.other_input(add_eps, variance.output[0]))
        sqrt = m.sole_consumer(add_eps.output[0], "Sqrt")
        if m.sole_consumer(sqrt.output[0], "Div") != divide:
            raise NoMatch("Sqrt does not feed the Div")
        rank, dims = m.types.rank(x), m.types.dims(x)
        if rank is None or dims is None:
            raise NoMatch("input rank unknown")
        normalized = sorted(a % rank for a in m.reduce_axes(node))
        if (
            normalized != list(range(rank - len(normalized), rank))
            or sorted(a % rank for a in m.reduce_axes(variance)) != normalized
        ):
            raise NoMatch("ReduceMean does not reduce the trailing axes")
        trailing = dims[normalized[0] :]
        if any(d is None for d in trailing):
            raise NoMatch("normalized dims are not static")
        shape = tuple(int(d) for d in trailing if d is not None)
        chain = [node, sub, square, variance, add_eps, sqrt, divide]
        affine: dict[str, np.ndarray] = {}
        for op in ("Mul", "Add"):
            try:
                nxt = m.sole_consumer(chain[-1].output[0], op)
                value = m.constant(m.other_input(nxt, chain[-1].output[0]))
            except NoMatch:
                continue
            affine[op] = normalized_constant(value, shape, rank)
            chain.append(nxt)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(m.types.elem_type(x) or onnx.TensorProto.FLOAT))
        graph, last = m.scope.graph, chain[-1]

        def rewrite() -> str:
            scale = affine.get("Mul", np.ones(shape)).astype(dtype)
            bias = affine.get("Add", np.zeros(shape)).astype(dtype)
            inputs = [
                x,
                add_weight(m, names, f"{last.output[0]}_scale", scale),
                add_weight(m, names, f"{last.output[0]}_bias", bias),
            ]
            fused = helper.make_node(
                "LayerNormalization",
                inputs,
                [last.output[0]],
                axis=-len(shape),
                epsilon=epsilon,
                name=names.fresh(f"{last.output[0]}_layernorm"),
            )
            for dead in chain[:-1]:
                graph.node.remove(dead)
            last.CopyFrom(fused)
            return "layernorm_fused"

        return rewrite


#: The GELU forms: the op that marks them, how to read its argument, Gelu's approximate attribute.
_GELU_FORMS = {"Erf": (erf_argument, "none"), "Tanh": (tanh_argument, "tanh")}


@register_pass
class FuseGelu(Fusion):
    """Replace ``x * 0.5 * (1 + erf(x / sqrt 2))`` (and the tanh form) by ``Gelu`` (opset >= 20).

    One matcher serves both forms: the inner argument is read per form (Erf of x/sqrt2 or
    x*(1/sqrt2); Tanh of sqrt(2/pi)*(x + 0.044715*x^3)); the outer product is matched in
    its common arrangements ``(x*(1+e))*0.5``, ``((1+e)*0.5)*x`` and ``(x*0.5)*(1+e)``.
    Below opset 20 Gelu does not exist in the default domain: the pattern is left and counted.
    """

    name = "fuse_gelu"
    exact = True
    anchors = tuple(_GELU_FORMS)
    min_opset = 20
    produces = "Gelu"

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match a GELU around the Erf or Tanh ``node``."""
        read_argument, approximate = _GELU_FORMS[node.op_type]
        x, before = read_argument(m, node)
        _require_kernel(m, x, "Gelu")
        one_plus = m.sole_consumer(node.output[0], "Add")
        m.scalar(m.other_input(one_plus, node.output[0]), 1.0)
        first = m.sole_consumer(one_plus.output[0], "Mul")
        other = m.other_input(first, one_plus.output[0])
        if other == x:  # (x * (1 + e)) * 0.5
            last = m.sole_consumer(first.output[0], "Mul")
            m.scalar(m.other_input(last, first.output[0]), 0.5)
            chain = [*before, node, one_plus, first, last]
        elif m.is_constant(other):  # ((1 + e) * 0.5) * x
            m.scalar(other, 0.5)
            last = m.sole_consumer(first.output[0], "Mul")
            if m.other_input(last, first.output[0]) != x:
                raise NoMatch("GELU product does not multiply by x")
            chain = [*before, node, one_plus, first, last]
        else:  # (x * 0.5) * (1 + e)
            half = m.producer(other, "Mul")
            m.scalar(m.other_input(half, x), 0.5)
            m.private(half.output[0])
            chain = [*before, node, one_plus, half, first]
        graph, last = m.scope.graph, chain[-1]

        def rewrite() -> str:
            fused = helper.make_node(
                "Gelu", [x], [last.output[0]], approximate=approximate, name=names.fresh(f"{last.output[0]}_gelu")
            )
            for dead in chain[:-1]:
                graph.node.remove(dead)
            last.CopyFrom(fused)
            return f"gelu_{approximate}_fused"

        return rewrite


_HARDSWISH_OPSET = 14
#: element types onnxruntime's CPU provider has no kernel for (measured, onnxruntime 1.32; found by the sweep)
_NO_CPU_KERNEL = {"HardSwish": (onnx.TensorProto.DOUBLE,), "Gelu": (onnx.TensorProto.DOUBLE,)}


def _require_kernel(m: Matcher, x: str, op: str) -> None:
    """Raise NoMatch when onnxruntime could not run ``op`` on ``x``'s element type."""
    elem = m.types.elem_type(x)
    if elem in _NO_CPU_KERNEL[op]:
        raise NoMatch(f"onnxruntime has no {op} kernel for {onnx.TensorProto.DataType.Name(elem).lower()} inputs")


@register_pass
class FuseHardSwish(Fusion):
    """Replace ``x * Clip(x + 3, 0, 6) / 6`` by ``HardSwish`` and ``Clip(x + 3, 0, 6) / 6`` by ``HardSigmoid``.

    Matches, anchored on the Clip (bounds as inputs or, below opset 11, attributes):
    ``Mul(x, Clip(Add(x, 3), 0, 6))`` then ``Div(·, 6)`` or ``Mul(·, 1/6)``; or the Clip
    divided first, ``Mul(x, Div(Clip, 6))`` (both orders of every commutative op). Without
    the product by the same ``x`` the Clip/Div pair alone becomes ``HardSigmoid(alpha=1/6,
    beta=0.5)``. Every intermediate must have one reader and not be a graph output; ``x``
    may have others. HardSwish needs opset 14: below it the product becomes
    ``x * HardSigmoid(x)`` (two ops instead of four, any opset) and the model keeps its
    opset, which runtimes pinned to it need; ``allow_opset_upgrade=True`` instead converts
    the model with ``onnx.version_converter`` when it has the pattern, saying so in the
    notes. Must not fire for other constants (Add 3, Clip 0..6, divisor 6), a Clip whose
    input is not ``x + 3``, or a product by another tensor.
    """

    name = "fuse_hardswish"
    exact = True
    anchors = ("Clip",)

    def __init__(self, *, allow_opset_upgrade: bool = False) -> None:
        self.allow_opset_upgrade = allow_opset_upgrade

    def prepare(self, model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
        """Upgrade to opset 14 when the model holds a HardSwish pattern and the upgrade is allowed."""
        opset = opset_version(model)
        if opset >= _HARDSWISH_OPSET or not self._has_product(model):
            return model
        if not self.allow_opset_upgrade:
            notes.append(
                f"kept opset {opset}: HardSwish needs opset {_HARDSWISH_OPSET}, so x * HardSigmoid(x) was written "
                "instead (--param allow_opset_upgrade=true upgrades the model and fuses one op)"
            )
            return model
        return upgrade_opset(
            model, _HARDSWISH_OPSET, needed_for="HardSwish", otherwise="wrote x * HardSigmoid(x) instead", notes=notes
        )

    def _has_product(self, model: onnx.ModelProto) -> bool:
        types = TypeMap(model)
        found = False

        def visit(scope: Scope) -> None:
            nonlocal found
            m = Matcher(scope, types)
            for node in scope.graph.node:
                if node.op_type == "Clip" and is_default_domain(node) and not found:
                    try:
                        match = hard_sigmoid_product(m, node)
                        _require_kernel(m, match.x, "HardSwish")
                        found = match.product is not None
                    except NoMatch:
                        continue

        walk_scopes(model, visit)
        return found

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match the hard-sigmoid around the Clip ``node`` and the product by its input, if any."""
        found = hard_sigmoid_product(m, node)
        _require_kernel(m, found.x, "HardSwish")  # HardSigmoid has the same kernels
        opset = m.opset if isinstance(m, ModelMatcher) else 0
        graph = m.scope.graph

        def rewrite() -> str:
            last = found.chain[-1]
            output = last.output[0]
            if found.product is None:
                fused = [_hardsigmoid(found.x, output, names.fresh(f"{output}_hardsigmoid"))]
                kind = "hardsigmoid_fused"
            elif opset >= _HARDSWISH_OPSET:
                fused = [helper.make_node("HardSwish", [found.x], [output], name=names.fresh(f"{output}_hardswish"))]
                kind = "hardswish_fused"
            else:
                gate = names.fresh(f"{output}_gate")
                fused = [
                    _hardsigmoid(found.x, gate, names.fresh(f"{output}_hardsigmoid")),
                    helper.make_node("Mul", [found.x, gate], [output], name=names.fresh(f"{output}_hardswish")),
                ]
                kind = "hardswish_as_hardsigmoid_product"
            position = list(graph.node).index(last)
            for offset, new in enumerate(fused):
                graph.node.insert(position + offset, new)
            for dead in found.chain:
                graph.node.remove(dead)
            return kind

        return rewrite


def _hardsigmoid(x: str, output: str, name: str) -> onnx.NodeProto:
    """Return ``HardSigmoid(x)`` with ReLU6's gate constants: ``clip(x / 6 + 0.5, 0, 1)``."""
    return helper.make_node("HardSigmoid", [x], [output], alpha=1.0 / 6.0, beta=0.5, name=name)
