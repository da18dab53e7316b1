"""Exact fusions: BatchNorm and per-channel affine folding, MatMul+Add, LayerNorm, GELU and HardSwish.

Each pass is a matcher anchored on one op type: it walks producers and sole consumers
from the anchor, every failed check names its reason (collected into the notes), and
only a complete match is rewritten. Intermediate tensors must have exactly one reader
and must not be graph outputs; new weights are written under fresh names, so a weight
another node shares is cloned rather than changed. The arithmetic lives in
``affine_math``; every pass walks ``If``/``Loop``/``Scan`` bodies and leaves ops of other
domains alone.
"""

from __future__ import annotations

import onnx
from onnxopt.passes.fusion.activations import FuseGelu, FuseHardSwish, FuseLayerNorm
from onnxopt.passes.fusion.affine_math import batchnorm_affine, channel_vector, scale_output_channels, shift_bias
from onnxopt.passes.fusion.base import FLOATS, Fusion, Rewrite, add_weight, set_attribute
from onnxopt.passes.fusion.match import Matcher, NoMatch

from onnxopt.graph import NameGenerator, node_attribute
from onnxopt.pipeline import register_pass

__all__ = ["FoldBatchNorm", "FoldConvAffine", "FuseGelu", "FuseHardSwish", "FuseLayerNorm", "FuseMatMulAdd"]


@register_pass
class FoldBatchNorm(Fusion):
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
        op, group = layer.op_type, int(node_attribute(layer, "group", 1))
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
                bias = bias.reshape(-1) * float(node_attribute(layer, "beta", 1.0))
        else:
            if m.types.rank(layer.input[0]) != 2:
                raise NoMatch("MatMul input is not known to be 2-D")
            layout, channels = "kn", weight.shape[1]
        if scale.size != channels or (bias is not None and bias.size not in (1, channels)):
            raise NoMatch("channel counts differ")
        if weight.dtype.type not in FLOATS:
            raise NoMatch("weight is not floating point")
        graph = m.scope.graph

        def rewrite() -> str:
            new_weight = scale_output_channels(weight, scale, layout, group)
            new_bias = shift_bias(bias, scale, shift, channels, weight.dtype)
            layer.input[1] = add_weight(m, names, layer.input[1], new_weight)
            bias_name = add_weight(m, names, f"{layer.output[0]}_bias", new_bias)
            if len(layer.input) > 2:
                layer.input[2] = bias_name
            else:
                layer.input.append(bias_name)
            if op == "Gemm":
                set_attribute(layer, "beta", 1.0)
            if op == "MatMul":
                layer.op_type = "Gemm"
            layer.output[0] = node.output[0]
            graph.node.remove(node)
            return f"{op.lower()}_batchnorm_folded"

        return rewrite


#: How a per-channel constant after a Conv changes its weight and bias: (scales, sign of shift).
_AFFINE = {"Mul": (True, 0.0), "Add": (False, 1.0), "Sub": (False, -1.0)}


@register_pass
class FoldConvAffine(Fusion):
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
        group = int(node_attribute(conv, "group", 1))
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
                conv.input[1] = add_weight(
                    m, names, conv.input[1], scale_output_channels(weight, vector, layout, group)
                )
            if bias is not None or not scales:
                new_bias = shift_bias(
                    bias, vector if scales else None, None if scales else sign * vector, channels, weight.dtype
                )
                bias_name = add_weight(m, names, f"{conv.output[0]}_bias", new_bias)
                if len(conv.input) > 2:
                    conv.input[2] = bias_name
                else:
                    conv.input.append(bias_name)
            conv.output[0] = node.output[0]
            graph.node.remove(node)
            return f"{conv.op_type.lower()}_{node.op_type.lower()}_folded"

        return rewrite


@register_pass
class FuseMatMulAdd(Fusion):
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
        if weight.ndim != 2 or weight.dtype.type not in FLOATS or bias.dtype != weight.dtype:
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
