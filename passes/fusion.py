"""Exact fusions: BatchNorm and per-channel affine folding, MatMul+Add, LayerNorm, GELU and HardSwish.

Each pass is a matcher anchored on one op type: it walks producers and sole consumers
from the anchor, every failed check names its reason (collected into the notes), and
only a complete match is rewritten. Intermediate tensors must have exactly one reader
and must not be graph outputs; new weights are written under fresh names, so a weight
another node shares is cloned rather than changed. The arithmetic lives in
``_fusemath``; every pass walks ``If``/``Loop``/``Scan`` bodies and leaves ops of other
domains alone.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper

from onnxopt.graph import NameGenerator, is_default_domain, node_attribute, set_initializer
from onnxopt.pipeline import Context, Pass, PassResult, register_pass

from ._fusemath import batchnorm_affine, channel_vector, scale_output_channels, shift_bias
from ._graphs import Scope, TypeMap, opset_version, walk_scopes
from ._match import Matcher, NoMatch
from ._patterns import erf_argument, hard_sigmoid_product, normalized_constant, tanh_argument

__all__ = ["FoldBatchNorm", "FoldConvAffine", "FuseGelu", "FuseHardSwish", "FuseLayerNorm", "FuseMatMulAdd"]

Rewrite = Callable[[], str]
_FLOATS = (np.float16, np.float32, np.float64)


def _set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def _new_weight(graph: onnx.GraphProto, names: NameGenerator, base: str, array: np.ndarray) -> str:
    name = names.fresh(f"{base}_fused")
    set_initializer(graph, name, array)
    return name


class _ModelMatcher(Matcher):
    """A matcher that also knows the default-domain opset of the model being rewritten."""

    def __init__(self, scope: Scope, types: TypeMap, opset: int) -> None:
        super().__init__(scope, types)
        self.opset = opset


class _Fusion(Pass):
    """A fusion anchored on ``anchors``: ``match`` checks and returns the rewrite to apply."""

    anchors: ClassVar[tuple[str, ...]] = ()
    min_opset: ClassVar[int] = 0
    produces: ClassVar[str] = ""

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Return the rewrite for the pattern anchored at ``node``; raise NoMatch otherwise."""
        raise NotImplementedError

    def prepare(self, model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
        """Return the model to rewrite (a pass may upgrade its opset first); the default keeps it."""
        return model

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Find every match and rewrite it (or, below ``min_opset``, only count it)."""
        notes: list[str] = []
        model = self.prepare(model, notes)
        opset = opset_version(model)
        types = TypeMap(model)
        names = NameGenerator(model)
        stats: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        found_too_old = 0

        def visit(scope: Scope) -> None:
            nonlocal found_too_old
            m = _ModelMatcher(scope, types, opset)
            for node in list(scope.graph.node):
                if node.op_type not in self.anchors or not is_default_domain(node):
                    continue
                if not node.output or m.index.producer.get(node.output[0]) != node:
                    continue  # removed by an earlier rewrite in this graph
                try:
                    rewrite = self.match(node, m, names)
                except NoMatch as failure:
                    reasons[re.sub(r"'[^']*'", "a tensor", str(failure))] += 1
                    continue
                if opset < self.min_opset:
                    found_too_old += 1
                    continue
                stats[rewrite()] += 1
                m.refresh()

        walk_scopes(model, visit)
        if found_too_old:
            notes.append(f"found {found_too_old} pattern(s) but left them: {self.produces} needs opset "
                         f"{self.min_opset}, the model imports opset {opset}")
        if types.note:
            notes.append(types.note)
        notes += [f"not fused {count}x: {reason}" for reason, count in reasons.most_common(8)]
        return PassResult(model, bool(stats), dict(stats), notes)


@register_pass
class FoldBatchNorm(_Fusion):
    """Fold an inference BatchNormalization into the linear layer before it.

    Matches BN(Conv | ConvTranspose | Gemm | MatMul) with constant BN parameters and a
    constant layer weight (and bias), where the layer's output feeds only the BN and is
    not a graph output. ConvTranspose weights are [Cin, Cout/group, ...]; Gemm honours
    transB and folds ``beta*C``; MatMul needs a 2-D constant weight and an input known to
    be 2-D (BN's channel axis 1 is then MatMul's N) and becomes a Gemm. Never fires on a
    BN whose training outputs are used or with ``spatial=0``.
    """

    name = "fold_batchnorm"
    exact = True
    anchors = ("BatchNormalization",)

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match BN after a linear layer."""
        if any(o for o in node.output[1:]):
            raise NoMatch("BatchNormalization has training outputs")
        if node_attribute(node, "spatial", 1) == 0:
            raise NoMatch("BatchNormalization with spatial=0")
        layer = m.producer(node.input[0], "Conv", "ConvTranspose", "Gemm", "MatMul")
        m.private(node.input[0])
        gamma, beta, mean, var = (m.constant(n) for n in node.input[1:5])
        scale, shift = batchnorm_affine(gamma, beta, mean, var, float(node_attribute(node, "epsilon", 1e-5)))
        weight = m.constant(layer.input[1])
        bias = m.optional_constant(layer, 2)
        op, group = layer.op_type, int(node_attribute(layer, "group", 1))  # type: ignore[arg-type]
        if op == "Conv":
            layout, channels = "conv", weight.shape[0]
        elif op == "ConvTranspose":
            layout, channels = "conv_transpose", weight.shape[1] * group
        elif weight.ndim != 2:
            raise NoMatch(f"{op} weight is not 2-D")
        elif op == "Gemm":
            layout = "nk" if node_attribute(layer, "transB", 0) else "kn"
            channels = weight.shape[0] if layout == "nk" else weight.shape[1]
            if bias is not None:
                if bias.ndim == 2 and bias.shape[0] != 1:
                    raise NoMatch("Gemm C varies along rows")
                bias = bias.reshape(-1) * float(node_attribute(layer, "beta", 1.0))  # type: ignore[arg-type]
        else:
            if m.types.rank(layer.input[0]) != 2:
                raise NoMatch("MatMul input is not known to be 2-D")
            layout, channels = "kn", weight.shape[1]
        if scale.size != channels or (bias is not None and bias.size not in (1, channels)):
            raise NoMatch("channel counts differ")
        if weight.dtype.type not in _FLOATS:
            raise NoMatch("weight is not floating point")
        graph = m.scope.graph

        def rewrite() -> str:
            new_weight = scale_output_channels(weight, scale, layout, group)
            new_bias = shift_bias(bias, scale, shift, channels, weight.dtype)
            layer.input[1] = _new_weight(graph, names, layer.input[1], new_weight)
            bias_name = _new_weight(graph, names, f"{layer.output[0]}_bias", new_bias)
            if len(layer.input) > 2:
                layer.input[2] = bias_name
            else:
                layer.input.append(bias_name)
            if op == "Gemm":
                _set_attribute(layer, "beta", 1.0)
            if op == "MatMul":
                layer.op_type = "Gemm"
            layer.output[0] = node.output[0]
            graph.node.remove(node)
            return f"{op.lower()}_batchnorm_folded"

        return rewrite


#: How a per-channel constant after a Conv changes its weight and bias: (scales, sign of shift).
_AFFINE = {"Mul": (True, 0.0), "Add": (False, 1.0), "Sub": (False, -1.0)}


@register_pass
class FoldConvAffine(_Fusion):
    """Fold ``Mul``/``Add``/``Sub`` by a per-output-channel constant into the Conv or ConvTranspose before it.

    The constant must be a scalar or vary only along the channel axis ([C,1,1],
    [1,C,1,1], ...), so the result has the layer's shape; ``Mul`` scales weight and bias,
    ``Add``/``Sub`` (layer minus constant only) shift the bias. ConvTranspose weights are
    [Cin, Cout/group, ...], so its output channel ``k`` is column ``k % (Cout/group)`` of
    group ``k // (Cout/group)``. The layer output must feed only this node and not be a
    graph output; the constant must share the weight's dtype.
    """

    name = "fold_conv_affine"
    exact = True
    anchors = tuple(_AFFINE)

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match Conv or ConvTranspose followed by a per-channel affine op."""
        candidates = node.input[:1] if node.op_type == "Sub" else node.input
        conv = None
        for name in candidates:
            try:
                conv = m.producer(name, "Conv", "ConvTranspose")
                break
            except NoMatch:
                continue
        if conv is None or len(node.input) != 2:
            raise NoMatch(f"{node.op_type} does not follow a Conv")
        value = m.constant(m.other_input(node, conv.output[0]))
        m.private(conv.output[0])
        weight = m.constant(conv.input[1])
        bias = m.optional_constant(conv, 2)
        group = int(node_attribute(conv, "group", 1))  # type: ignore[call-overload]
        if conv.op_type == "Conv":
            layout, channels = "conv", weight.shape[0]
        else:
            layout, channels = "conv_transpose", weight.shape[1] * group
        vector = channel_vector(value, weight.ndim, channels)
        if vector is None or value.dtype != weight.dtype:
            raise NoMatch(f"{node.op_type} constant is not per-channel of the weight's dtype")
        scales, sign = _AFFINE[node.op_type]
        graph = m.scope.graph

        def rewrite() -> str:
            if scales:
                conv.input[1] = _new_weight(graph, names, conv.input[1],
                                            scale_output_channels(weight, vector, layout, group))
            if bias is not None or not scales:
                new_bias = shift_bias(bias, vector if scales else None, None if scales else sign * vector,
                                      channels, weight.dtype)
                bias_name = _new_weight(graph, names, f"{conv.output[0]}_bias", new_bias)
                if len(conv.input) > 2:
                    conv.input[2] = bias_name
                else:
                    conv.input.append(bias_name)
            conv.output[0] = node.output[0]
            graph.node.remove(node)
            return f"{conv.op_type.lower()}_{node.op_type.lower()}_folded"

        return rewrite


@register_pass
class FuseMatMulAdd(_Fusion):
    """Turn ``Add(MatMul(X, W), bias)`` into ``Gemm(X, W, bias)``.

    Only when X is known to be 2-D (Gemm takes matrices), W is a constant 2-D matrix,
    the bias is a constant of shape [N], [1, N] or a scalar, the dtype is floating point,
    and the MatMul output feeds only the Add and is not a graph output.
    """

    name = "fuse_matmul_add"
    exact = True
    anchors = ("Add",)

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match MatMul followed by a bias Add."""
        matmul = None
        for name in node.input:
            try:
                matmul = m.producer(name, "MatMul")
                break
            except NoMatch:
                continue
        if matmul is None:
            raise NoMatch("Add does not follow a MatMul")
        bias_name = m.other_input(node, matmul.output[0])
        bias = m.constant(bias_name)
        weight = m.constant(matmul.input[1])
        if weight.ndim != 2 or weight.dtype.type not in _FLOATS or bias.dtype != weight.dtype:
            raise NoMatch("MatMul weight is not a 2-D float constant")
        if m.types.rank(matmul.input[0]) != 2:
            raise NoMatch("MatMul input is not known to be 2-D")
        if bias.shape not in ((weight.shape[1],), (1, weight.shape[1]), ()):
            raise NoMatch("bias is not [N] or [1, N]")
        m.private(matmul.output[0])
        graph = m.scope.graph

        def rewrite() -> str:
            matmul.op_type = "Gemm"
            matmul.input.append(bias_name)
            matmul.output[0] = node.output[0]
            graph.node.remove(node)
            return "gemm_created"

        return rewrite


@register_pass
class FuseLayerNorm(_Fusion):
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
        if normalized != list(range(rank - len(normalized), rank)) or \
                sorted(a % rank for a in m.reduce_axes(variance)) != normalized:
            raise NoMatch("ReduceMean does not reduce the trailing axes")
        shape = tuple(dims[normalized[0]:])
        if any(d is None for d in shape):
            raise NoMatch("normalized dims are not static")
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
            inputs = [x, _new_weight(graph, names, f"{last.output[0]}_scale", scale),
                      _new_weight(graph, names, f"{last.output[0]}_bias", bias)]
            fused = helper.make_node("LayerNormalization", inputs, [last.output[0]], axis=-len(shape),
                                     epsilon=epsilon, name=names.fresh(f"{last.output[0]}_layernorm"))
            for dead in chain[:-1]:
                graph.node.remove(dead)
            last.CopyFrom(fused)
            return "layernorm_fused"

        return rewrite


#: The GELU forms: the op that marks them, how to read its argument, Gelu's approximate attribute.
_GELU_FORMS = {"Erf": (erf_argument, "none"), "Tanh": (tanh_argument, "tanh")}


@register_pass
class FuseGelu(_Fusion):
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
            fused = helper.make_node("Gelu", [x], [last.output[0]], approximate=approximate,
                                     name=names.fresh(f"{last.output[0]}_gelu"))
            for dead in chain[:-1]:
                graph.node.remove(dead)
            last.CopyFrom(fused)
            return f"gelu_{approximate}_fused"

        return rewrite


_HARDSWISH_OPSET = 14


@register_pass
class FuseHardSwish(_Fusion):
    """Replace ``x * Clip(x + 3, 0, 6) / 6`` by ``HardSwish`` and ``Clip(x + 3, 0, 6) / 6`` by ``HardSigmoid``.

    Matches, anchored on the Clip (bounds as inputs or, below opset 11, attributes):
    ``Mul(x, Clip(Add(x, 3), 0, 6))`` then ``Div(·, 6)`` or ``Mul(·, 1/6)``; or the Clip
    divided first, ``Mul(x, Div(Clip, 6))`` (both orders of every commutative op). Without
    the product by the same ``x`` the Clip/Div pair alone becomes ``HardSigmoid(alpha=1/6,
    beta=0.5)``. Every intermediate must have one reader and not be a graph output; ``x``
    may have others. HardSwish needs opset 14: below it, when the model has the pattern,
    ``upgrade`` (default True) converts the model with ``onnx.version_converter`` and says
    so in the notes; when that is off or fails, the product becomes ``x * HardSigmoid(x)``
    (two ops instead of four, any opset). Must not fire for other constants (Add 3, Clip
    0..6, divisor 6), a Clip whose input is not ``x + 3``, or a product by another tensor.
    """

    name = "fuse_hardswish"
    exact = True
    anchors = ("Clip",)

    def __init__(self, *, upgrade: bool = True) -> None:
        self.upgrade = upgrade

    def prepare(self, model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
        """Upgrade to opset 14 when the model holds a HardSwish pattern and ``upgrade`` is set."""
        opset = opset_version(model)
        if not self.upgrade or opset >= _HARDSWISH_OPSET or not self._has_product(model):
            return model
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, _HARDSWISH_OPSET)
        except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
            notes.append(f"could not upgrade opset {opset} -> {_HARDSWISH_OPSET} for HardSwish "
                         f"({str(exc)[:120]}); wrote x * HardSigmoid(x) instead")
            return model
        notes.append(f"upgraded the model from opset {opset} to {_HARDSWISH_OPSET} (HardSwish needs it)")
        return upgraded

    def _has_product(self, model: onnx.ModelProto) -> bool:
        types = TypeMap(model)
        found = False

        def visit(scope: Scope) -> None:
            nonlocal found
            m = Matcher(scope, types)
            for node in scope.graph.node:
                if node.op_type == "Clip" and is_default_domain(node) and not found:
                    try:
                        found = hard_sigmoid_product(m, node).product is not None
                    except NoMatch:
                        continue

        walk_scopes(model, visit)
        return found

    def match(self, node: onnx.NodeProto, m: Matcher, names: NameGenerator) -> Rewrite:
        """Match the hard-sigmoid around the Clip ``node`` and the product by its input, if any."""
        found = hard_sigmoid_product(m, node)
        opset = m.opset if isinstance(m, _ModelMatcher) else 0
        graph = m.scope.graph

        def rewrite() -> str:
            last = found.chain[-1]
            output = last.output[0]
            if found.product is None:
                fused = [helper.make_node("HardSigmoid", [found.x], [output], alpha=1.0 / 6.0, beta=0.5,
                                          name=names.fresh(f"{output}_hardsigmoid"))]
                kind = "hardsigmoid_fused"
            elif opset >= _HARDSWISH_OPSET:
                fused = [helper.make_node("HardSwish", [found.x], [output], name=names.fresh(f"{output}_hardswish"))]
                kind = "hardswish_fused"
            else:
                gate = names.fresh(f"{output}_gate")
                fused = [helper.make_node("HardSigmoid", [found.x], [gate], alpha=1.0 / 6.0, beta=0.5,
                                          name=names.fresh(f"{output}_hardsigmoid")),
                         helper.make_node("Mul", [found.x, gate], [output], name=names.fresh(f"{output}_hardswish"))]
                kind = "hardswish_as_hardsigmoid_product"
            position = list(graph.node).index(last)
            for offset, new in enumerate(fused):
                graph.node.insert(position + offset, new)
            for dead in found.chain:
                graph.node.remove(dead)
            return kind

        return rewrite
