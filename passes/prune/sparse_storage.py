"""Sparse storage of pruned weights: mostly-zero initializers as ``sparse_initializer`` where smaller."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.external import tensor_array
from onnxopt.graph import replace_repeated

__all__ = ["store_sparse"]


def store_sparse(model: onnx.ModelProto) -> list[str]:
    """Move mostly-zero float initializers of the main graph to ``sparse_initializer`` where smaller.

    A sparse tensor stores values (4 bytes) and int64 linear indices (8 bytes) per
    non-zero, so it pays below one third density. onnxruntime densifies them on load.
    Returns the names moved.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    keep, moved = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or tensor.name in inputs:
            keep.append(tensor)
            continue
        array = tensor_array(tensor)
        flat = array.ravel()
        nonzero = np.flatnonzero(flat)
        if array.size < 64 or nonzero.size * 12 >= array.size * 4:
            keep.append(tensor)
            continue
        values = numpy_helper.from_array(flat[nonzero].astype(np.float32), tensor.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{tensor.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved.append(tensor.name)
    if moved:
        replace_repeated(graph.initializer, keep)
    return moved
