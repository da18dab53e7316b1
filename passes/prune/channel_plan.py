"""What structured pruning removes: per channel group, a removal order, its error curve and cost.

For every prunable :class:`ChannelGroup` the consumers' input statistics give one
:class:`ConsumerSystem` each; greedy OBS (:func:`removal_order`) orders the channels and
gives the summed relative consumer error after each removal. A group's *cost* per channel
is the multiply-adds it saves (its sources' output rows, depthwise filters and consumers'
input columns, times their output positions on one calibration sample). Counts for an
overall MAC reduction are chosen on a price: each group removes the count minimising
``gain·error − price·MACs`` (``gain``: measured sensitivity of the model outputs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from onnxopt.passes.common.budget import measure_gains
from onnxopt.passes.common.layers import Layer, find_layers, to_canonical
from onnxopt.passes.common.linalg import augmented_gram
from onnxopt.passes.common.stats import collect_input_stats
from onnxopt.passes.prune.channel_groups import ChannelGroup, describe_types, find_channel_groups
from onnxopt.passes.prune.channel_math import ConsumerSystem, independent_gram, refit, removal_order
from onnxopt.passes.prune.channel_surgery import remove_channels

from onnxopt.graph import GraphIndex, NameGenerator, node_attribute, toposort
from onnxopt.progress import Progress
from onnxopt.runtime import Session, expose_tensors

__all__ = ["ChannelPlan", "GroupPlan", "build_channel_plan"]

log = logging.getLogger(__name__)

#: A consumer is re-fitted across features only from at least this many calibration rows
#: per input feature: with fewer (squeeze-excitation convs see one pooled row per sample)
#: least squares fits the calibration set exactly, its in-sample error is near 0 and says
#: nothing about other inputs. Such a consumer's features are treated as independent
#: (:func:`independent_gram`): a removed channel's mean goes into the bias, nothing else.
MIN_ROWS_PER_FEATURE = 4


@dataclass
class GroupPlan:
    """One prunable group: its consumers' systems, removal order, error curve and MACs per channel."""

    group: ChannelGroup
    layers: dict[str, Layer]
    systems: dict[str, ConsumerSystem]
    order: np.ndarray
    errors: np.ndarray
    cost: float
    allowed: np.ndarray
    gain: float = 1.0

    def kept(self, count: int) -> np.ndarray:
        """Return the sorted channels kept when ``count`` are removed."""
        return np.sort(self.order[count:])


@dataclass
class ChannelPlan:
    """The prunable groups of a model and how to rewrite it for chosen removal counts."""

    groups: list[GroupPlan]
    notes: list[str] = field(default_factory=list)
    total_macs: float = 0.0
    #: re-fit the consumers by least squares; False slices their weights (plain channel removal)
    refit: bool = True

    def consumer_weights(self, counts: Sequence[int]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Return the re-fitted (weight, bias) of each consumer that loses channels, in ONNX layout.

        A consumer reading several groups (through a ``Concat``) is re-fitted once, for the
        channels all of them remove.
        """
        removed: dict[str, list[np.ndarray]] = {}
        systems: dict[str, ConsumerSystem] = {}
        layers: dict[str, Layer] = {}
        for plan, count in zip(self.groups, counts, strict=True):
            if not count:
                continue
            for key, system in plan.systems.items():
                removed.setdefault(key, []).append(system.offset + plan.order[:count])
                systems[key], layers[key] = dataclasses.replace(system, offset=0), plan.layers[key]
        result: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for key, system in systems.items():
            layer = layers[key]
            keep = np.setdiff1d(np.arange(system.channels), np.concatenate(removed[key]))
            fitted = (
                refit(system, keep) if self.refit else system.weight[:, np.concatenate([system.features(keep), [-1]])]
            )
            weight, bias = fitted[:, :-1], fitted[:, -1]
            if layer.op_type == "Conv":
                result[key] = (weight.reshape(layer.shape[0], keep.size, *layer.shape[2:]), bias)
            elif layer.op_type == "ConvTranspose":
                out, kernel = layer.shape[1], int(np.prod(layer.shape[2:]))
                result[key] = (weight.T.reshape(keep.size, *layer.shape[1:]), bias.reshape(out, kernel).mean(1))
            elif layer.op_type == "Gemm" and layer.trans_b:
                result[key] = (weight, bias)
            else:
                result[key] = (weight.T, bias)
        return result

    def apply(self, model: onnx.ModelProto, counts: Sequence[int]) -> onnx.ModelProto:
        """Return a copy of ``model`` with ``counts[i]`` channels removed from group ``i``."""
        kept: list[np.ndarray | None] = []
        weights = self.consumer_weights(counts)
        groups = []
        for plan, count in zip(self.groups, counts, strict=True):
            groups.append(plan.group)
            kept.append(plan.kept(count) if count else None)
        matmuls = {c.output[0] for p in self.groups for c in p.group.consumers if c.op_type == "MatMul"}
        matmul_bias = {k: b for k, (_, b) in weights.items() if k in matmuls}
        result = remove_channels(
            model, groups, kept, {k: (w, None if k in matmul_bias else b) for k, (w, b) in weights.items()}
        )
        if matmul_bias:
            _add_bias_after(result, matmul_bias)
        return result

    def counts_at_price(self, price: float) -> list[int]:
        """Return per-group counts minimising ``gain·error − price·MACs`` over allowed counts."""
        counts = []
        for plan in self.groups:
            objective = plan.gain * plan.errors[plan.allowed] - price * plan.cost * plan.allowed
            counts.append(int(plan.allowed[int(np.argmin(objective))]))
        return counts

    def removed_macs(self, counts: Sequence[int]) -> float:
        """Return the multiply-adds saved by ``counts``."""
        return float(sum(p.cost * c for p, c in zip(self.groups, counts, strict=True)))

    def counts_for(self, fraction: float) -> list[int]:
        """Return the counts that remove about ``fraction`` of the model's MACs at least error."""
        if fraction <= 0 or not self.groups:
            return [0] * len(self.groups)
        target = fraction * self.total_macs
        low, high = 0.0, 1.0
        while self.removed_macs(self.counts_at_price(high)) < target and high < 1e12:
            high *= 4
        for _ in range(50):
            middle = (low + high) / 2
            if self.removed_macs(self.counts_at_price(middle)) < target:
                low = middle
            else:
                high = middle
        return self.counts_at_price(high)

    def measure_sensitivity(
        self, model: onnx.ModelProto, samples: list, *, probe: float = 0.5, progress: Progress | None = None
    ) -> None:
        """Set each group's ``gain``: model output error per unit of summed consumer error."""
        probes = []
        for i, plan in enumerate(self.groups):
            count = int(plan.allowed[np.argmin(np.abs(plan.allowed - probe * plan.group.channels))])
            counts = [0] * len(self.groups)
            counts[i] = count
            probes.append((float(plan.errors[count]), lambda c=counts: self.apply(model, c)))
        for plan, gain in zip(self.groups, measure_gains(model, samples, probes, progress), strict=True):
            plan.gain = gain


def _add_bias_after(model: onnx.ModelProto, biases: dict[str, np.ndarray | None]) -> None:
    """Insert ``Add(bias)`` after MatMul consumers whose re-fit moved a removed channel's mean."""
    graph = model.graph
    names = NameGenerator(model)
    for node in list(graph.node):
        bias = biases.get(node.output[0]) if node.output else None
        if node.op_type != "MatMul" or bias is None or not np.any(bias):
            continue
        raw = names.fresh(f"{node.output[0]}_unbiased")
        constant = names.fresh(f"{node.output[0]}_bias")
        graph.initializer.append(onnx.numpy_helper.from_array(bias.astype(np.float32), constant))
        out = node.output[0]
        node.output[0] = raw
        graph.node.append(helper.make_node("Add", [raw, constant], [out], name=names.fresh(f"{node.name}_bias")))
    toposort(graph)


def _node_macs(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], index: GraphIndex, sample: dict
) -> dict[str, float]:
    """Return each weight layer's multiply-adds on ``sample`` (output elements × inputs per output)."""
    names = sorted({n.output[0] for n in nodes})
    with Session(expose_tensors(model, names), label="model with exposed layer outputs") as session:
        values = session.run(sample, names)
    macs = {}
    for node in nodes:
        weight = index.constant(node.input[1])
        assert weight is not None
        if node.op_type == "Conv":
            outputs = weight.shape[0]
        elif node.op_type == "ConvTranspose":
            outputs = weight.shape[1] * int(node_attribute(node, "group", 1))
        elif node.op_type == "Gemm" and node_attribute(node, "transB", 0):
            outputs = weight.shape[0]
        else:
            outputs = weight.shape[-1]
        macs[node.output[0]] = float(np.prod(values[node.output[0]].shape)) * weight.size / max(outputs, 1)
    return macs


def build_channel_plan(
    model: onnx.ModelProto,
    samples: list,
    *,
    multiple: int = 8,
    max_ratio: float = 0.75,
    exclude: Sequence[str] = (),
    seed: int = 0,
    progress: Progress | None = None,
) -> ChannelPlan:
    """Find the prunable channel groups, collect consumer statistics, order channels by OBS cost."""
    import fnmatch

    graph = model.graph
    groups = find_channel_groups(graph, describe_types(model))
    notes = [f"{g.key}: left alone ({g.blocked})" for g in groups if g.blocked]
    layers = {layer.key: layer for layer in find_layers(graph)[0]}
    candidates = []
    for group in groups:
        if group.blocked:
            continue
        names = [n for node in [*group.sources, *group.consumers] for n in (node.name, node.output[0], node.op_type)]
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names if n):
            notes.append(f"{group.key}: excluded")
        elif any(c.output[0] not in layers or not layers[c.output[0]].has_gram for c in group.consumers):
            notes.append(f"{group.key}: left alone (a consumer has no input statistics)")
        elif group.channels < 2 * multiple:
            notes.append(f"{group.key}: left alone (only {group.channels} channels)")
        else:
            candidates.append(group)
    plans: list[GroupPlan] = []
    if not candidates:
        return ChannelPlan(plans, notes)
    consumer_layers = list({c.output[0]: layers[c.output[0]] for g in candidates for c in g.consumers}.values())
    stats = collect_input_stats(model, consumer_layers, samples, gram=True, seed=seed, progress=progress)
    index = GraphIndex(graph)
    weighted = [
        n
        for n in graph.node
        if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")
        and len(n.input) > 1
        and index.constant(n.input[1]) is not None
    ]
    macs = _node_macs(model, weighted, index, samples[0])
    shared: dict[str, ConsumerSystem] = {}
    few: list[str] = []
    for group in candidates:
        systems = {}
        for consumer in group.consumers:
            layer = layers[consumer.output[0]]
            offset = group.offset(consumer)[0]
            if layer.key in shared:
                systems[layer.key] = dataclasses.replace(shared[layer.key], offset=offset)
                continue
            st = stats[layer.key]
            matrix = to_canonical(layer, index.constant(layer.weight))[0].astype(np.float64)
            bias = index.constant(consumer.input[2]) if len(consumer.input) > 2 and consumer.input[2] else None
            if bias is None:
                bias = np.zeros(layer.shape[1] if layer.op_type == "ConvTranspose" else matrix.shape[0])
            if layer.op_type == "ConvTranspose":
                bias = np.repeat(bias, int(np.prod(layer.shape[2:])))
            per = int(np.prod(layer.kernel)) if layer.op_type == "Conv" else 1
            gram, mean = st.mean_gram[0], st.mean[0]
            if st.rows < MIN_ROWS_PER_FEATURE * gram.shape[0]:
                gram = independent_gram(gram, mean)
                few.append(layer.key)
            system = ConsumerSystem(
                np.concatenate([matrix, np.broadcast_to(bias, matrix.shape[:1])[:, None]], 1),
                augmented_gram(gram, mean),
                per,
            )
            shared[layer.key] = system
            systems[layer.key] = dataclasses.replace(system, offset=offset)
        order, errors = removal_order(list(systems.values()), group.channels)
        touched = [*group.sources, *[t for t in group.through if t.op_type == "Conv"]]
        cost = sum(macs.get(node.output[0], 0.0) for node in touched) / group.channels
        cost += sum(macs.get(node.output[0], 0.0) / group.offset(node)[1] for node in group.consumers)
        counts = np.arange(group.channels + 1)
        allowed = counts[
            (((group.channels - counts) % multiple == 0) & (counts <= max_ratio * group.channels)) | (counts == 0)
        ]
        plans.append(GroupPlan(group, {k: layers[k] for k in systems}, systems, order, errors, cost, allowed))
    if few:
        notes.append(
            f"{len(few)} consumer(s) saw fewer than {MIN_ROWS_PER_FEATURE} calibration rows per input "
            f"feature (e.g. squeeze-excitation convs, one pooled row per sample): removed channels "
            f"only move their mean into the bias there ({', '.join(few[:3])}{' …' if len(few) > 3 else ''})"
        )
    return ChannelPlan(plans, notes, float(sum(macs.values())))
