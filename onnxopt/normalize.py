"""Normalization run once before a pipeline: one place where weights live, shapes if known.

* ``Constant`` nodes that hold tensors (Paddle and some TensorFlow exports store every
  weight this way) become initializers of the graph they are in, so a pass reads and
  writes a weight the same way wherever the exporter put it.
* Shape inference is best effort: when it fails (dynamic dims, custom ops, > 2 GB) the
  model is still optimized, and the reason is returned as a note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from onnxopt.graph import constant_node_value, is_default_domain, iter_graphs, replace_repeated
from onnxopt.model import exceeds_protobuf_limit

__all__ = ["NormalizeResult", "declare_initializers", "infer_shapes", "lift_constants", "normalize"]

log = logging.getLogger(__name__)


@dataclass
class NormalizeResult:
    """What normalization did to a model."""

    model: onnx.ModelProto
    lifted_constants: int = 0
    shapes_inferred: bool = False
    notes: list[str] = field(default_factory=list)


def declare_initializers(model: onnx.ModelProto) -> int:
    """List every initializer as a graph input too when the IR version requires it; return how many.

    Before IR version 4 an initializer is the default value of a graph input and must
    be one (onnx.checker refuses the model otherwise). Passes add initializers freely
    (quantization scales, an opset upgrade turning ``Pad``'s ``pads`` attribute into a
    tensor), so the pipeline declares the new ones after each pass on such models.
    """
    if model.ir_version >= 4:
        return 0
    added = 0
    for graph in iter_graphs(model.graph):
        declared = {i.name for i in graph.input}
        for tensor in graph.initializer:
            if tensor.name not in declared:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
                declared.add(tensor.name)
                added += 1
    return added


def lift_constants(model: onnx.ModelProto) -> int:
    """Turn tensor-valued ``Constant`` nodes into initializers, in place; return the count.

    Left alone: a Constant whose output is a graph output (an initializer may not be
    one in every runtime), sparse constants, and every Constant of an IR < 4 model,
    where initializers must also be graph inputs.
    """
    if model.ir_version < 4:
        return 0
    lifted = 0
    for graph in iter_graphs(model.graph):
        outputs = {o.name for o in graph.output}
        keep: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []
        for node in graph.node:
            if (
                node.op_type == "Constant"
                and is_default_domain(node)
                and len(node.output) == 1
                and node.output[0] not in outputs
            ):
                value = constant_node_value(node)
                if value is not None:
                    tensor = onnx.numpy_helper.from_array(value, node.output[0])
                    new_inits.append(tensor)
                    continue
            keep.append(node)
        if new_inits:
            lifted += len(new_inits)
            replace_repeated(graph.node, keep)
            graph.initializer.extend(new_inits)
    return lifted


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Run ONNX shape inference if it can; return the model and a note when it could not."""
    if exceeds_protobuf_limit(model):
        return model, "shape inference skipped: the model is over 2 GB"
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.info("shape inference failed: %s", reason)
        return model, f"shape inference failed, continuing without it: {reason[:200]}"
    return inferred, None


def normalize(model: onnx.ModelProto, *, shapes: bool = True) -> NormalizeResult:
    """Lift Constant weights to initializers and infer shapes where possible (in place)."""
    result = NormalizeResult(model=model)
    result.lifted_constants = lift_constants(model)
    if result.lifted_constants:
        result.notes.append(f"lifted {result.lifted_constants} Constant nodes to initializers")
    if shapes:
        inferred, note = infer_shapes(model)
        if note:
            result.notes.append(note)
        else:
            result.model = inferred
            result.shapes_inferred = True
    return result
