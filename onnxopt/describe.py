"""A description of a model: opsets, signature, ops, parameters and where weights live."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxopt.data import model_inputs, model_outputs
from onnxopt.graph import iter_graphs, iter_tensors, subgraphs
from onnxopt.model import ModelSource, load_model, model_stats

__all__ = ["ModelDescription", "describe_model"]


@dataclass
class ModelDescription:
    """What ``onnxopt inspect`` shows."""

    path: str
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    nodes: int
    subgraphs: dict[str, int]
    ops: dict[str, int]
    params: int
    param_bytes_by_dtype: dict[str, int]
    weights: dict[str, int]
    external_files: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    file_bytes: int | None = None
    #: external data locations that resolve outside the model's folder (optimize and check refuse them)
    external_outside: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return dict(self.__dict__)


def describe_model(source: ModelSource) -> ModelDescription:
    """Describe a model without changing it (external data is located, not required)."""
    path = str(source) if isinstance(source, str | Path) else "<in-memory model>"
    model = load_model(source, load_external_data=False)
    external_tensors = 0
    external_bytes = 0
    files: set[str] = set()
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            external_tensors += 1
            external_bytes += int(info.get("length", 0))
            files.add(info.get("location", "?"))
    stats = model_stats(model)
    kinds: collections.Counter[str] = collections.Counter()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if subgraphs(node):
                kinds[node.op_type] += 1
    initializer_count = sum(len(g.initializer) for g in iter_graphs(model.graph))
    constant_nodes = stats.ops.get("Constant", 0)
    file_bytes = None
    outside: list[str] = []
    if isinstance(source, str | Path):
        base = Path(source).parent.resolve()
        outside = sorted(f for f in files if not f or base not in (base / f).resolve().parents)
        inside = [f for f in files if f not in outside and (base / f).is_file()]
        file_bytes = Path(source).stat().st_size + sum((base / f).stat().st_size for f in inside)
    return ModelDescription(
        path=path,
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        inputs=[s.describe() for s in model_inputs(model)],
        outputs=[s.describe() for s in model_outputs(model)],
        nodes=stats.nodes,
        subgraphs=dict(kinds),
        ops=stats.ops,
        params=stats.params,
        param_bytes_by_dtype=stats.param_bytes_by_dtype,
        weights={
            "initializers": initializer_count,
            "constant_nodes": constant_nodes,
            "params_in_constant_nodes": stats.weights_in_constants,
            "external_tensors": external_tensors,
            "external_bytes": external_bytes,
        },
        external_files=sorted(files),
        functions=[f"{f.domain}::{f.name}" for f in model.functions],
        file_bytes=file_bytes,
        external_outside=outside,
    )
