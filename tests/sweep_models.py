"""Small single-operator and small-network models over opsets 7-21, IR versions 3-10 and dtypes (#17's sweep).

Each :class:`SweepCase` builds one model; the attribute-vs-input forms an operator took
across opsets (Clip bounds, Pad pads, Squeeze/Unsqueeze/ReduceMean axes, BatchNorm's
``spatial``) follow the opset, and below IR version 4 every initializer is also listed as
a graph input, as that IR requires. A case that onnxruntime cannot run as given (an
operator without a kernel for that dtype) is skipped by the sweep, not counted as a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["DTYPES", "OPSETS", "SweepCase", "sweep_cases"]

OPSETS = list(range(7, 22))
#: element types the sweep tries (the ones onnxruntime's CPU provider runs for the operator are kept)
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int32": np.int32, "int64": np.int64}
FLOATS = ("float32", "float16", "float64")
#: IR version each opset came with (onnx.helper.VERSION_TABLE)
_IR_OF_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}

Body = tuple[list[onnx.NodeProto], dict[str, np.ndarray], list[int]]  # nodes, initializers, output shape


@dataclass(frozen=True)
class SweepCase:
    """One sweep model: what it is and how to build it."""

    name: str
    opset: int
    ir_version: int
    dtype: str
    input_shape: tuple[int, ...]
    body: Callable[[int, np.dtype], Body]

    @property
    def id(self) -> str:
        """Return a test id: ``op-opsetN-irM-dtype``."""
        return f"{self.name}-opset{self.opset}-ir{self.ir_version}-{self.dtype}"

    def build(self) -> onnx.ModelProto:
        """Return the model."""
        dtype = np.dtype(DTYPES[self.dtype])
        nodes, weights, out_shape = self.body(self.opset, dtype)
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()]
        inputs = [helper.make_tensor_value_info("x", elem, list(self.input_shape))]
        if self.ir_version < 4:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]
        outputs = [helper.make_tensor_value_info("y", elem, out_shape)]
        graph = helper.make_graph(nodes, self.name, inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version
        return model


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _unary(op: str, **attrs: object) -> Callable[[int, np.dtype], Body]:
    return lambda opset, dtype: ([helper.make_node(op, ["x"], ["y"], **attrs)], {}, [2, 3, 4, 4])


def _binary(op: str) -> Callable[[int, np.dtype], Body]:
    def body(opset: int, dtype: np.dtype) -> Body:
        b = (_rng(1).uniform(0.5, 1.5, (1, 3, 1, 1))).astype(dtype)
        return [helper.make_node(op, ["x", "b"], ["y"])], {"b": b}, [2, 3, 4, 4]

    return body


def _clip(opset: int, dtype: np.dtype) -> Body:
    if opset < 11:
        return [helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], {}, [2, 3, 4, 4]
    bounds = {"lo": np.array(0, dtype), "hi": np.array(6, dtype)}
    return [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], bounds, [2, 3, 4, 4]


def _softmax(opset: int, dtype: np.dtype) -> Body:
    return [helper.make_node("Softmax", ["x"], ["y"], axis=1 if opset < 13 else -1)], {}, [2, 3, 4, 4]


def _matmul(opset: int, dtype: np.dtype) -> Body:
    w = _rng(2).standard_normal((4, 5)).astype(dtype)
    return [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, [2, 3, 4, 5]


def _gemm(opset: int, dtype: np.dtype) -> Body:
    rng = _rng(3)
    w, c = rng.standard_normal((16, 6)).astype(dtype), rng.standard_normal(6).astype(dtype)
    return [helper.make_node("Gemm", ["x", "w", "c"], ["y"])], {"w": w, "c": c}, [2, 6]


def _conv(opset: int, dtype: np.dtype) -> Body:
    rng = _rng(4)
    w, b = rng.standard_normal((5, 3, 3, 3)).astype(dtype), rng.standard_normal(5).astype(dtype)
    return [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], {"w": w, "b": b}, [2, 5, 4, 4]


def _batchnorm_attrs(opset: int) -> dict[str, object]:
    return {"spatial": 1} if opset < 9 else {}


def _conv_bn_relu_pool_gemm(opset: int, dtype: np.dtype) -> Body:
    rng = _rng(5)
    weights = {
        "w": rng.standard_normal((4, 3, 3, 3)),
        "g": rng.uniform(0.5, 1.5, 4),
        "be": rng.standard_normal(4),
        "m": rng.standard_normal(4),
        "v": rng.uniform(0.5, 2, 4),
        "fc": rng.standard_normal((4, 3)),
        "fb": rng.standard_normal(3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], **_batchnorm_attrs(opset)),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"]),
    ]
    return nodes, {k: v.astype(dtype) for k, v in weights.items()}, [2, 3]


def _mlp(opset: int, dtype: np.dtype) -> Body:
    rng = _rng(6)
    weights = {k: rng.standard_normal(s).astype(dtype) for k, s in (("w1", (4, 8)), ("b1", (8,)), ("w2", (8, 2)))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("MatMul", ["i", "w2"], ["y"]),
    ]
    return nodes, weights, [2, 3, 4, 2]


def _pad_conv(opset: int, dtype: np.dtype) -> Body:
    w = _rng(7).standard_normal((2, 3, 3, 3)).astype(dtype)
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], pads=pads, mode="constant")
        return [pad, helper.make_node("Conv", ["p", "w"], ["y"])], {"w": w}, [2, 2, 4, 4]
    pad = helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant")
    return [pad, helper.make_node("Conv", ["p", "w"], ["y"])], {"w": w, "pads": np.array(pads, np.int64)}, [2, 2, 4, 4]


def _squeeze_unsqueeze(opset: int, dtype: np.dtype) -> Body:
    if opset < 13:
        nodes = [
            helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
            helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
        ]
        return nodes, {}, [2, 3, 4, 4]
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Squeeze", ["u", "ax"], ["y"])]
    return nodes, {"ax": np.array([0], np.int64)}, [2, 3, 4, 4]


def _reduce_mean(opset: int, dtype: np.dtype) -> Body:
    if opset < 18:
        return [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], {}, [2, 3, 1, 1]
    node = helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=1)
    return [node], {"ax": np.array([2, 3], np.int64)}, [2, 3, 1, 1]


def _reshape_transpose(opset: int, dtype: np.dtype) -> Body:
    nodes = [
        helper.make_node("Reshape", ["x", "s"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0]),
    ]
    return nodes, {"s": np.array([6, 16], np.int64)}, [16, 6]


def _hardswish_pattern(opset: int, dtype: np.dtype) -> Body:
    consts = {"three": np.array(3, dtype), "six": np.array(6, dtype)}
    clip = (
        helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0)
        if opset < 11
        else helper.make_node("Clip", ["a", "zero", "six"], ["c"])
    )
    if opset >= 11:
        consts["zero"] = np.array(0, dtype)
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        clip,
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["y"]),
    ]
    return nodes, consts, [2, 3, 4, 4]


def _layernorm_pattern(opset: int, dtype: np.dtype) -> Body:
    axes = {"axes": [-1]} if opset < 18 else {}
    extra = {} if opset < 18 else {"ax": np.array([-1], np.int64)}
    mean_in = ["x"] if opset < 18 else ["x", "ax"]
    var_in = ["sq"] if opset < 18 else ["sq", "ax"]
    nodes = [
        helper.make_node("ReduceMean", mean_in, ["mu"], keepdims=1, **axes),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", var_in, ["var"], keepdims=1, **axes),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["nrm"]),
        helper.make_node("Mul", ["nrm", "gamma"], ["sc"]),
        helper.make_node("Add", ["sc", "beta"], ["y"]),
    ]
    rng = _rng(8)
    weights = {
        "eps": np.array(1e-5, dtype),
        "gamma": rng.uniform(0.5, 1.5, 4).astype(dtype),
        "beta": rng.standard_normal(4).astype(dtype),
        **extra,
    }
    return nodes, weights, [2, 3, 4, 4]


def _gelu_pattern(opset: int, dtype: np.dtype) -> Body:
    consts = {"sqrt2": np.array(np.sqrt(2.0), dtype), "one": np.array(1, dtype), "half": np.array(0.5, dtype)}
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    return nodes, consts, [2, 3, 4, 4]


#: name, builder, input shape, dtypes, first opset
_OPS: list[tuple[str, Callable[[int, np.dtype], Body], tuple[int, ...], tuple[str, ...], int]] = [
    ("Relu", _unary("Relu"), (2, 3, 4, 4), (*FLOATS, "int32", "int64"), 7),
    ("Sigmoid", _unary("Sigmoid"), (2, 3, 4, 4), FLOATS, 7),
    ("Tanh", _unary("Tanh"), (2, 3, 4, 4), FLOATS, 7),
    ("Abs", _unary("Abs"), (2, 3, 4, 4), (*FLOATS, "int32", "int64"), 7),
    ("Identity", _unary("Identity"), (2, 3, 4, 4), tuple(DTYPES), 7),
    ("LeakyRelu", _unary("LeakyRelu", alpha=0.1), (2, 3, 4, 4), FLOATS, 7),
    ("Erf", _unary("Erf"), (2, 3, 4, 4), FLOATS, 9),
    ("Softmax", _softmax, (2, 3, 4, 4), FLOATS, 7),
    ("Clip", _clip, (2, 3, 4, 4), FLOATS, 7),
    ("Add", _binary("Add"), (2, 3, 4, 4), tuple(DTYPES), 7),
    ("Mul", _binary("Mul"), (2, 3, 4, 4), tuple(DTYPES), 7),
    ("Div", _binary("Div"), (2, 3, 4, 4), FLOATS, 7),
    ("MatMul", _matmul, (2, 3, 4, 4), (*FLOATS, "int32", "int64"), 7),
    ("Gemm", _gemm, (2, 16), FLOATS, 7),
    ("Conv", _conv, (2, 3, 4, 4), FLOATS, 7),
    ("MaxPool", _unary("MaxPool", kernel_shape=[2, 2]), (2, 3, 4, 4), FLOATS, 7),
    ("AveragePool", _unary("AveragePool", kernel_shape=[2, 2]), (2, 3, 4, 4), FLOATS, 7),
    ("Pad+Conv", _pad_conv, (2, 3, 4, 4), FLOATS, 7),
    ("Unsqueeze+Squeeze", _squeeze_unsqueeze, (2, 3, 4, 4), tuple(DTYPES), 7),
    ("ReduceMean", _reduce_mean, (2, 3, 4, 4), FLOATS, 7),
    ("Reshape+Transpose", _reshape_transpose, (2, 3, 4, 4), tuple(DTYPES), 7),
    ("Conv+BN+Relu+Pool+Gemm", _conv_bn_relu_pool_gemm, (2, 3, 4, 4), FLOATS, 7),
    ("MLP", _mlp, (2, 3, 4, 4), FLOATS, 7),
    ("HardSwish-pattern", _hardswish_pattern, (2, 3, 4, 4), FLOATS, 7),
    ("LayerNorm-pattern", _layernorm_pattern, (2, 3, 4, 4), FLOATS, 7),
    ("Gelu-pattern", _gelu_pattern, (2, 3, 4, 4), FLOATS, 9),
]
# Output shapes for unary ops that change them.
_POOL_SHAPE = [2, 3, 3, 3]


def _fix_shape(name: str, body: Callable[[int, np.dtype], Body]) -> Callable[[int, np.dtype], Body]:
    if name not in ("MaxPool", "AveragePool"):
        return body
    return lambda opset, dtype: (body(opset, dtype)[0], {}, _POOL_SHAPE)


def _ir_versions(opset: int) -> list[int]:
    """Return the IR versions the sweep pairs with ``opset``: the one it came with and the newest (10)."""
    return sorted({_IR_OF_OPSET[opset], 10})


def sweep_cases() -> list[SweepCase]:
    """Return every case: each operator or network, at every opset from its first, each IR version and dtype."""
    cases = []
    for name, body, shape, dtypes, first in _OPS:
        for opset in OPSETS:
            if opset < first:
                continue
            for ir_version in _ir_versions(opset):
                for dtype in dtypes:
                    cases.append(SweepCase(name, opset, ir_version, dtype, shape, _fix_shape(name, body)))
    return cases
