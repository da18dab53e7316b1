"""Evaluate one node on constant inputs (private to ``onnxopt.passes``).

onnxruntime runs the node first, so a folded value is what the runtime would have
computed; the ONNX reference evaluator is the fallback for what onnxruntime refuses.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxopt.external import is_lazy, materialize, tensor_array

__all__ = ["EvaluationError", "evaluate_node", "predicted_bytes", "tensor_bytes"]

log = logging.getLogger(__name__)


class EvaluationError(Exception):
    """Neither onnxruntime nor the reference evaluator could run the node."""


def _tiny_model(
    node: onnx.NodeProto, inputs: dict[str, onnx.TensorProto], opsets: list[onnx.OperatorSetIdProto], ir_version: int
) -> onnx.ModelProto:
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    # The tiny model is serialized: lazy inputs are read into it (only this node's inputs).
    tensors = [materialize(t, copy=True) if is_lazy(t) else t for t in inputs.values()]
    graph = helper.make_graph([node], "fold", [], outputs, tensors)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = max(ir_version, 4)
    return model


def evaluate_node(
    node: onnx.NodeProto, inputs: dict[str, onnx.TensorProto], opsets: list[onnx.OperatorSetIdProto], ir_version: int
) -> list[np.ndarray]:
    """Return the values of ``node``'s (non-empty) outputs given its constant inputs."""
    model = _tiny_model(node, inputs, opsets, ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [np.asarray(v) for v in session.run(None, {})]
    except (
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.InvalidGraph,
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.NotImplemented,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ) as exc:
        log.debug("onnxruntime cannot fold %s: %s", node.op_type, exc)
    from onnx.reference import ReferenceEvaluator

    try:
        values = ReferenceEvaluator(model).run(None, {})
    except Exception as exc:  # the reference evaluator raises anything from numpy
        raise EvaluationError(
            f"{node.op_type}: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
        ) from exc
    return [np.asarray(v) for v in values]


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    return tensor_array(tensor)


def predicted_bytes(node: onnx.NodeProto, inputs: dict[str, onnx.TensorProto]) -> int | None:
    """Return the output size in bytes of ops that create data, before running them.

    Only the ops that can blow a small input up into a large tensor are predicted;
    for the rest None means "measure after evaluating".
    """
    try:
        if node.op_type == "ConstantOfShape":
            shape = _array(inputs[node.input[0]])
            return int(np.prod(shape, dtype=np.int64)) * 4
        if node.op_type == "Expand":
            data = inputs[node.input[0]]
            expanded = np.broadcast_shapes(tuple(data.dims), tuple(int(d) for d in _array(inputs[node.input[1]])))
            return int(np.prod(expanded, dtype=np.int64)) * 4
        if node.op_type == "Tile":
            data = inputs[node.input[0]]
            repeats = _array(inputs[node.input[1]])
            return int(np.prod(data.dims, dtype=np.int64) * np.prod(repeats, dtype=np.int64)) * 4
        if node.op_type == "Range":
            start, limit, delta = (float(_array(inputs[n])) for n in node.input[:3])
            return int(max(0.0, np.ceil((limit - start) / delta))) * 8 if delta else None
    except (KeyError, ValueError, IndexError):
        return None
    return None


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Return the size of ``tensor``'s data in bytes."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
