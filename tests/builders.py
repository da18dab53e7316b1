"""Tiny-graph builders and checks shared by the tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import Dataset
from onnxopt.graph import iter_graphs
from onnxopt.harness import Report, check, synthesize_inputs
from onnxopt.harness.judge import parse_metric
from onnxopt.pipeline import Context, PassResult, create_pass

__all__ = [
    "FLOAT",
    "assert_equivalent",
    "init",
    "make_model",
    "ops",
    "parse_model",
    "run_check",
    "run_pass",
    "unseen_inputs",
    "vi",
]

FLOAT = TensorProto.FLOAT


def vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    """Return a tensor value info."""
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array: np.ndarray | Sequence[float], dtype: type = np.float32) -> onnx.TensorProto:
    """Return an initializer holding ``array``."""
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    extra_opsets: Mapping[str, int] | None = None,
) -> onnx.ModelProto:
    """Build a checked model from nodes (the usual few-line test graph)."""
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def parse_model(text: str) -> onnx.ModelProto:
    """Build a model from ONNX text format."""
    return onnx.parser.parse_model(text)


def run_check(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    profile: str = "exact",
    data: Dataset | None = None,
    iterations: int = 3,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    metrics: Sequence[str] = (),
    **synth: object,
) -> Report:
    """Run the harness on two in-memory models.

    ``overrides``: per-output tolerance fields (``*`` for all); ``metrics``: declared task
    metrics (``OUTPUT:NAME>=FLOOR``), which replace the judge's inferred ones on their outputs.
    """
    data = data or synthesize_inputs(reference, iterations=iterations, **synth)  # type: ignore[arg-type]
    declared = [parse_metric(text) for text in metrics]
    return check(reference, candidate, data, profile=profile, overrides=overrides, metrics=declared)


def assert_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    profile: str = "exact",
    data: Dataset | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    metrics: Sequence[str] = (),
    **synth: object,
) -> Report:
    """Assert the harness judges ``candidate`` equivalent to ``reference``."""
    # onnx's shape inference cannot read sparse initializers: check the structure only then.
    onnx.checker.check_model(candidate, full_check=not any(g.sparse_initializer for g in [candidate.graph]))
    report = run_check(reference, candidate, profile=profile, data=data, overrides=overrides, metrics=metrics, **synth)
    assert report.passed, "\n".join(report.failures())
    return report


def unseen_inputs(model: onnx.ModelProto, n: int = 16) -> Dataset:
    """Return ``n`` synthesized inputs the pass under test never saw (calibration uses other seeds).

    Budget tests judge on these rather than on the held-out quarter a lossy pass tuned
    itself on, which would only restate the pass's own verdict.
    """
    return synthesize_inputs(model, iterations=n, seed=99)


def run_pass(name: str, model: onnx.ModelProto, **params: object) -> PassResult:
    """Run the registered pass ``name`` on a copy of ``model``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return create_pass(name, **params)(copy, Context())


def ops(model: onnx.ModelProto) -> list[str]:
    """Return the op types of every node, subgraphs included."""
    return [n.op_type for g in iter_graphs(model.graph) for n in g.node]
