"""The one statistics collector: a model's intermediate tensors, streamed one sample at a time in bounded memory.

Calibration observers (:func:`onnxopt.calibration.collect_statistics`) and the passes'
layer-input statistics (``onnxopt.passes.common.stats``) both need the values of
intermediate tensors over calibration data, reduced to statistics as they go. Exposing
every tensor at once would hold one sample's activations of all of them; here the
tensors are exposed as extra outputs of a copy of the model in groups whose estimated
size for one sample stays under a memory budget, and each group is one pass over the
data. Peak memory is one sample's tensors of one group plus the statistics, never
samples × tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.progress import NullProgress, Progress
from onnxopt.runtime import Session, expose_tensors

__all__ = ["DEFAULT_MEMORY_BUDGET", "stream_tensors"]

log = logging.getLogger(__name__)

#: Bytes one group of exposed tensors may take for one sample.
DEFAULT_MEMORY_BUDGET = 512 << 20


def _element_count(shape: Iterable[int | str | None], fallback: int) -> int:
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or dim <= 0:
            return fallback
        count *= dim
    return count


def tensor_sizes(model: onnx.ModelProto, sample: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, int]:
    """Estimate each tensor's bytes for ``sample``'s input shapes (unknown: the largest known)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for graph_input in fixed.graph.input:
        if graph_input.name in sample:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, value in zip(dims, sample[graph_input.name].shape, strict=False):
                dim.Clear()
                dim.dim_value = int(value)
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.info("shape inference for calibration grouping failed: %s", exc)
    shapes: dict[str, list[int | str | None]] = {}
    for info in fixed.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    known = [_element_count(shapes[n], -1) for n in names if n in shapes]
    largest = max([k for k in known if k > 0], default=1 << 20)
    return {n: 4 * _element_count(shapes.get(n, [None]), largest) for n in names}


def size_groups(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Split ``names``, in order, into groups whose summed ``sizes`` stay under ``budget`` (one name may exceed it)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return [g for g in groups if g]


def stream_tensors(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    samples: Sequence[Sample],
    consume: Callable[[dict[str, np.ndarray]], None],
    *,
    progress: Progress | None = None,
    task: str = "calibrating",
    label: str = "model under calibration",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Call ``consume(values)`` once per sample and group of ``tensors``; return the number of groups.

    ``values`` maps each tensor of the group to its value for that sample. Graph inputs
    among ``tensors`` are taken from the sample (they cost nothing to hold) and go with
    the first group; the others are exposed as outputs of a copy of ``model``, in groups
    whose estimated size for one sample stays under ``memory_budget`` bytes.
    """
    if not tensors or not len(samples):
        return 0
    inputs = {i.name for i in model.graph.input}
    given = [t for t in tensors if t in inputs]
    exposed = [t for t in tensors if t not in inputs]
    groups = size_groups(exposed, tensor_sizes(model, samples[0], exposed), memory_budget) if exposed else []
    groups = groups or [[]]
    log.info("streaming %d tensors in %d group(s) over %d samples", len(tensors), len(groups), len(samples))
    with (progress or NullProgress()).task(task, len(groups) * len(samples)) as advance:
        for number, group in enumerate(groups):
            own = given if number == 0 else []
            with contextlib.ExitStack() as stack:
                session = stack.enter_context(Session(expose_tensors(model, group), label=label)) if group else None
                for sample in samples:
                    values = session.run(sample, group) if session is not None else {}
                    values.update({name: np.asarray(sample[name]) for name in own})
                    consume(values)
                    del values
                    advance.advance()
    return len(groups)
