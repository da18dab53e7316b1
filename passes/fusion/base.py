"""The shared shape of every fusion pass: anchor, match with reasons, rewrite (see ``fusion``)."""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.graphs import Scope, TypeMap, opset_version, walk_scopes
from onnxopt.passes.fusion.match import Matcher, NoMatch

from onnxopt.external import Spill
from onnxopt.graph import NameGenerator, is_default_domain, set_initializer
from onnxopt.pipeline import Context, Pass, PassResult

__all__ = ["Fusion", "ModelMatcher", "Rewrite", "add_weight", "set_attribute"]

Rewrite = Callable[[], str]
FLOATS = (np.float16, np.float32, np.float64)


def set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    """Set (replace or add) attribute ``name`` of ``node``."""
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


def add_weight(m: Matcher, names: NameGenerator, base: str, array: np.ndarray) -> str:
    """Add ``array`` as a new initializer of ``m``'s graph named after ``base`` and return its name.

    A large array goes to the matcher's spill file when the pipeline has one.
    """
    name = names.fresh(f"{base}_fused")
    set_initializer(m.scope.graph, name, array, spill=m.spill)
    return name


class ModelMatcher(Matcher):
    """A matcher that also knows the default-domain opset of the model being rewritten."""

    def __init__(self, scope: Scope, types: TypeMap, opset: int, spill: Spill | None = None) -> None:
        super().__init__(scope, types, spill)
        self.opset = opset


class Fusion(Pass):
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
            m = ModelMatcher(scope, types, opset, ctx.spill)
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
            notes.append(
                f"found {found_too_old} pattern(s) but left them: {self.produces} needs opset "
                f"{self.min_opset}, the model imports opset {opset}"
            )
        if types.note:
            notes.append(types.note)
        notes += [f"not fused {count}x: {reason}" for reason, count in reasons.most_common(8)]
        return PassResult(model, bool(stats), dict(stats), notes)
