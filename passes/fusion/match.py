"""A small matching vocabulary for the fusions (private to ``onnxopt.passes``).

A matcher walks producers and sole consumers of one graph; every check that fails
raises :class:`NoMatch` with its reason, so a pass can say why a rule did not fire.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxopt.passes.common.graphs import Scope, TypeMap

from onnxopt.external import Spill, tensor_array
from onnxopt.graph import GraphIndex, is_default_domain, node_attribute

__all__ = ["Matcher", "NoMatch"]


class NoMatch(Exception):
    """A rule does not apply; the message says why."""


class Matcher:
    """Producers, sole consumers and constants of one graph, with checks that explain failures."""

    def __init__(self, scope: Scope, types: TypeMap, spill: Spill | None = None) -> None:
        self.scope = scope
        self.types = types
        #: where rewrites write the large weights they produce (None: in memory)
        self.spill = spill
        self.refresh()

    def refresh(self) -> None:
        """Re-index the graph after a rewrite."""
        self.index = GraphIndex(self.scope.graph)
        self._constants = self.scope.constants()

    def producer(self, name: str, *ops: str) -> onnx.NodeProto:
        """Return the default-domain node of one of ``ops`` that makes ``name``."""
        node = self.index.producer.get(name)
        if node is None or node.op_type not in ops or not is_default_domain(node):
            raise NoMatch(f"{name!r} is not made by {'/'.join(ops)}")
        return node

    def sole_consumer(self, name: str, *ops: str) -> onnx.NodeProto:
        """Return the only reader of ``name``, which must be one of ``ops``; ``name`` is no graph output."""
        self.private(name)
        node = self.index.consumers[name][0]
        if node.op_type not in ops or not is_default_domain(node):
            raise NoMatch(f"{name!r} feeds {node.op_type}, not {'/'.join(ops)}")
        return node

    def private(self, name: str, readers: int = 1) -> None:
        """Check ``name`` has exactly ``readers`` readers and is not a graph output."""
        if name in self.index.outputs:
            raise NoMatch(f"{name!r} is a graph output")
        if len(self.index.consumers.get(name, ())) != readers:
            raise NoMatch(f"{name!r} has other consumers")

    def constant(self, name: str) -> np.ndarray:
        """Return the value of constant ``name``."""
        tensor = self._constants.get(name)
        if tensor is None:
            raise NoMatch(f"{name!r} is not a constant")
        return tensor_array(tensor)

    def optional_constant(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """Return input ``position`` of ``node`` as a constant, None when absent."""
        if len(node.input) <= position or not node.input[position]:
            return None
        return self.constant(node.input[position])

    def scalar(self, name: str, expected: float | None = None, rtol: float = 1e-4) -> float:
        """Return constant ``name`` as a float; it must hold one value (close to ``expected``)."""
        value = self.constant(name)
        if value.size != 1:
            raise NoMatch(f"{name!r} is not a scalar")
        number = float(value.reshape(-1)[0])
        if expected is not None and not np.isclose(number, expected, rtol=rtol, atol=0.0):
            raise NoMatch(f"{name!r} is {number}, not {expected}")
        return number

    def other_input(self, node: onnx.NodeProto, name: str) -> str:
        """Return the input of binary ``node`` that is not ``name``."""
        if len(node.input) != 2 or name not in node.input:
            raise NoMatch(f"{node.op_type} does not read {name!r}")
        return node.input[1] if node.input[0] == name else node.input[0]

    def is_constant(self, name: str) -> bool:
        """Return True when ``name`` is a visible constant."""
        return name in self._constants

    def reduce_axes(self, node: onnx.NodeProto) -> list[int]:
        """Return the axes of a ReduceMean (attribute before opset 18, input from 18)."""
        axes = node_attribute(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.constant(node.input[1]).reshape(-1).tolist()
        if axes is None:
            raise NoMatch("ReduceMean reduces every axis")
        if not node_attribute(node, "keepdims", 1):
            raise NoMatch("ReduceMean drops the reduced axes")
        return [int(a) for a in axes]
