"""Read-only facts about a main graph that the int8 placement rules read (private to ``quantize``).

Which tensors are float activations (typed float, or untyped but made by an op that only
makes floats), which are read as integer or shape logic, and which nodes the user
excluded by name, op type or a regular expression on the name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx

from onnxopt.graph import SHAPE_ONLY_OPS, GraphIndex, node_attribute
from onnxopt.runtime import tensor_types

__all__ = ["DATA_INPUTS", "GraphFacts", "excluded"]

#: Ops whose inputs from this position on are shapes or parameters, not data.
DATA_INPUTS = {
    "Reshape": 1,
    "Resize": 1,
    "Upsample": 1,
    "Slice": 1,
    "Expand": 1,
    "Tile": 1,
    "Pad": 1,
    "Gather": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "Clip": 1,
    "TopK": 1,
    "Split": 1,
    "ReduceMean": 1,
    "ReduceSum": 1,
    "ReduceMax": 1,
    "ReduceMin": 1,
    "CumSum": 1,
}
_LOGIC_OPS = frozenset(
    {
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "Floor",
        "Ceil",
        "Round",
        "Mod",
        "Range",
        "ConstantOfShape",
        "OneHot",
        "NonMaxSuppression",
    }
)
_FLOATS = frozenset({onnx.TensorProto.FLOAT})
_FLOAT_ONLY = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "Relu",
        "Sigmoid",
        "Softmax",
        "HardSigmoid",
        "Erf",
        "Tanh",
        "GlobalAveragePool",
        "AveragePool",
        "BatchNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "HardSwish",
        "Sqrt",
    }
)


def excluded(node: onnx.NodeProto, patterns: Iterable[str]) -> bool:
    """Return True when a pattern names ``node``, its op type, or fully matches its name as a regular expression."""
    for pattern in patterns:
        if pattern in (node.name, node.op_type):
            return True
        try:
            if re.fullmatch(pattern, node.name):
                return True
        except re.error:
            continue
    return False


class GraphFacts:
    """Read-only facts about the main graph that the rules need."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.index = GraphIndex(model.graph)
        self.types = {name: t.tensor_type.elem_type for name, t in tensor_types(model).items()}
        self.outputs = {o.name for o in model.graph.output}

    def is_activation(self, name: str) -> bool:
        """Return True for a float tensor computed at run time (not a constant)."""
        if not name or self.index.is_constant(name):
            return False
        if name in self.types:
            return self.types[name] in _FLOATS
        producer = self.index.producer.get(name)  # untyped: trust ops that only make floats
        return producer is not None and producer.op_type in _FLOAT_ONLY

    def logic_reason(self, name: str, *, output_ok: bool = False) -> str | None:
        """Return why ``name`` may not be quantized, or None (``output_ok``: a graph output may be)."""
        if name in self.outputs and not output_ok:
            return "is a graph output"
        if not self.is_activation(name):
            return "is not a float activation"
        for reader in self.index.consumers.get(name, ()):
            if reader.op_type in SHAPE_ONLY_OPS:
                continue
            if reader.op_type in _LOGIC_OPS or (
                reader.op_type == "Cast"
                and node_attribute(reader, "to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            ):
                return f"feeds integer logic ({reader.op_type} {reader.name})"
            limit = DATA_INPUTS.get(reader.op_type)
            if limit is not None and name in list(reader.input)[limit:]:
                return f"is a shape/parameter input of {reader.op_type} {reader.name}"
            if reader.op_type == "Where" and reader.input[0] == name:
                return f"is a condition of Where {reader.name}"
        return None
