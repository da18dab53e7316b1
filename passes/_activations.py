"""Weight layers and the statistics of their input activations over calibration data.

Shared by the pruning and low-rank passes. A :class:`Layer` is a Conv, ConvTranspose,
Gemm or MatMul whose weight is a constant; its weight has a *canonical* view
``[groups, outputs, inputs]`` in which every row maps one output of the layer from the
``inputs`` features it reads (for a Conv: input channel, kernel row, kernel column, the
im2col order), so the math modules see plain matrices whatever the ONNX layout.

:func:`collect_input_stats` runs the model once per calibration sample with the layers'
inputs exposed as outputs and accumulates, streaming, per layer input:

* ``sq_sum[g, j]``: the sum of squares of input feature ``j`` (activation norms);
* ``total[g, j]``: the sum of feature ``j`` (for means);
* ``gram[g, i, j]``: the second moment ``XᵀX`` of the features (when asked for),

never holding more than one sample's tensors. Rows of large feature maps are sampled
(``max_rows`` per sample), which keeps ``XᵀX`` an unbiased estimate up to scale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import onnx

from onnxopt.data import Dataset, Sample
from onnxopt.graph import GraphIndex, NameGenerator, control_tensors, nested_ops, node_attribute, set_initializer
from onnxopt.harness import PROFILES, Tolerance, compare_outputs
from onnxopt.progress import NullProgress, Progress
from onnxopt.runtime import Session, expose_tensors

__all__ = [
    "DEFAULT_BUDGET",
    "BudgetSpec",
    "HeldOutCheck",
    "InputStats",
    "Layer",
    "collect_input_stats",
    "find_layers",
    "from_canonical",
    "to_canonical",
    "write_weight",
]

log = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One weight layer of the main graph, keyed by its first output name."""

    key: str
    op_type: str
    activation: str
    weight: str
    shape: tuple[int, ...]
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def size(self) -> int:
        """Return the number of weights."""
        return int(np.prod(self.shape))

    @property
    def has_gram(self) -> bool:
        """Return True when the input second moment ``XᵀX`` can be collected for this layer."""
        return len(self.kernel) <= 2

    @property
    def signature(self) -> tuple:
        """Return what determines the rows built from the activation (layers sharing it share stats)."""
        return (self.activation, self.op_type == "Conv", self.trans_a, self.groups, self.kernel,
                self.strides, self.pads, self.dilations, self.auto_pad, self.shape[1:] if self.kernel else ())


def find_layers(graph: onnx.GraphProto, op_types: Iterable[str] = WEIGHT_OPS) -> tuple[list[Layer], list[str]]:
    """Return the weight layers of ``graph`` (constant 2-D MatMul RHS, Gemm B, Conv W) and notes."""
    index = GraphIndex(graph)
    wanted = set(op_types)
    layers: list[Layer] = []
    notes: list[str] = []
    control = control_tensors(graph, index)
    deciding: list[str] = []
    for node in graph.node:
        if node.op_type not in wanted or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if node.output[0] in control:
            deciding.append(node.output[0])
            continue
        weight = node.input[1]
        value = index.constant(weight)
        if value is None:
            continue
        if value.dtype != np.float32:
            notes.append(f"{node.output[0]}: weight {weight!r} is {value.dtype}, only float32 is handled")
            continue
        shape = tuple(int(d) for d in value.shape)
        if node.op_type in ("MatMul", "Gemm"):
            if value.ndim != 2:
                notes.append(f"{node.output[0]}: {node.op_type} weight is {value.ndim}-D; left alone")
                continue
            layers.append(Layer(
                node.output[0], node.op_type, node.input[0], weight, shape,
                trans_a=bool(node_attribute(node, "transA", 0)), trans_b=bool(node_attribute(node, "transB", 0)),
            ))
            continue
        spatial = value.ndim - 2
        if spatial < 1:
            continue
        auto_pad = node_attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        layers.append(Layer(
            node.output[0], node.op_type, node.input[0], weight, shape,
            groups=int(node_attribute(node, "group", 1)),  # type: ignore[arg-type]
            kernel=shape[2:],
            strides=tuple(node_attribute(node, "strides", [1] * spatial)),  # type: ignore[arg-type]
            pads=tuple(node_attribute(node, "pads", [0] * 2 * spatial)),  # type: ignore[arg-type]
            dilations=tuple(node_attribute(node, "dilations", [1] * spatial)),  # type: ignore[arg-type]
            auto_pad=auto_pad,
        ))
    if deciding:
        shown = ", ".join(deciding[:5]) + (" and more" if len(deciding) > 5 else "")
        notes.append(f"left {len(deciding)} layer(s) alone whose outputs decide an If/Loop condition (a small error "
                     f"there switches branches): {shown}")
    nested = nested_ops(graph, wanted)
    if nested:
        notes.append(f"left {nested} {'/'.join(sorted(wanted))} node(s) inside If/Loop/Scan bodies alone "
                     "(only main-graph layers are handled)")
    return layers, notes


# --------------------------------------------------------------------------- weight views


def to_canonical(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """Return ``weight`` as ``[groups, outputs per group, input features]``."""
    if layer.op_type == "MatMul":
        return weight.T[None]
    if layer.op_type == "Gemm":
        return (weight if layer.trans_b else weight.T)[None]
    if layer.op_type == "Conv":
        out = weight.shape[0]
        return weight.reshape(layer.groups, out // layer.groups, -1)
    # ConvTranspose [C, O/g, k...]: a row per (output channel, kernel position), reading C/g channels
    return weight.reshape(layer.groups, weight.shape[0] // layer.groups, -1).transpose(0, 2, 1)


def from_canonical(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """Invert :func:`to_canonical`."""
    if layer.op_type == "MatMul":
        return np.ascontiguousarray(matrix[0].T)
    if layer.op_type == "Gemm":
        return np.ascontiguousarray(matrix[0] if layer.trans_b else matrix[0].T)
    if layer.op_type == "Conv":
        return np.ascontiguousarray(matrix.reshape(layer.shape))
    return np.ascontiguousarray(matrix.transpose(0, 2, 1).reshape(layer.shape))


def write_weight(graph: onnx.GraphProto, names: NameGenerator, weight: str, value: np.ndarray,
                 readers: Sequence[onnx.NodeProto]) -> str:
    """Store ``value`` as the weight read by ``readers``; return the tensor name used.

    An initializer nobody else reads is replaced in place; otherwise (other readers, or a
    Constant node's output) a new initializer is made and ``readers`` are rewired to it.
    """
    index = GraphIndex(graph)
    is_initializer = weight in index.initializers
    reader_ids = {id(n) for n in readers}
    others = [n for n in index.consumers.get(weight, []) if id(n) not in reader_ids]
    if is_initializer and not others and weight not in index.outputs:
        set_initializer(graph, weight, value.astype(np.float32))
        return weight
    new_name = names.fresh(weight)
    set_initializer(graph, new_name, value.astype(np.float32))
    for node in readers:
        for i, name in enumerate(node.input):
            if name == weight and i > 0:
                node.input[i] = new_name
    return new_name


# --------------------------------------------------------------------------- statistics


@dataclass
class InputStats:
    """Streaming statistics of one layer input: row count, feature sums of squares, ``XᵀX``."""

    rows: int
    sq_sum: np.ndarray
    gram: np.ndarray | None = None
    total: np.ndarray | None = None  # per-feature sums [groups, features], for means

    @property
    def mean(self) -> np.ndarray | None:
        """Return the mean of each input feature ``[groups, features]``, or None when not collected."""
        return None if self.total is None else self.total / max(self.rows, 1)

    @property
    def norms(self) -> np.ndarray:
        """Return the RMS of each input feature, ``[groups, features]``."""
        return np.sqrt(self.sq_sum / max(self.rows, 1))

    @property
    def mean_gram(self) -> np.ndarray | None:
        """Return ``XᵀX / rows`` (float64), or None when not collected."""
        return None if self.gram is None else self.gram / max(self.rows, 1)


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _conv_rows(layer: Layer, x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Return sampled im2col rows ``[P, groups, C/g·kh·kw]`` of a 1-D or 2-D Conv input."""
    if x.ndim == 3:
        x = x[:, :, None, :]
    kernel = (1, *layer.kernel) if len(layer.kernel) == 1 else layer.kernel
    strides = (1, *layer.strides) if len(layer.strides) == 1 else layer.strides
    dilations = (1, *layer.dilations) if len(layer.dilations) == 1 else layer.dilations
    pads = (0, layer.pads[0], 0, layer.pads[1]) if len(layer.pads) == 2 else layer.pads
    n, c, h, w = x.shape
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = layer.auto_pad == "SAME_UPPER"
        ph = _same_pads(h, kernel[0], strides[0], dilations[0], upper)
        pw = _same_pads(w, kernel[1], strides[1], dilations[1], upper)
        pads = (ph[0], pw[0], ph[1], pw[1])
    elif layer.auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (h + pads[0] + pads[2] - (kernel[0] - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - (kernel[1] - 1) * dilations[1] - 1) // strides[1] + 1
    total = n * out_h * out_w
    chosen = rng.choice(total, size=max_rows, replace=False) if total > max_rows else np.arange(total)
    b, rest = np.divmod(chosen, out_h * out_w)
    oh, ow = np.divmod(rest, out_w)
    rows_h = oh[:, None] * strides[0] + np.arange(kernel[0])[None] * dilations[0]
    rows_w = ow[:, None] * strides[1] + np.arange(kernel[1])[None] * dilations[1]
    patches = padded[b[:, None, None, None], np.arange(c)[None, :, None, None],
                     rows_h[:, None, :, None], rows_w[:, None, None, :]]
    return patches.reshape(len(chosen), layer.groups, -1)


def layer_rows(layer: Layer, x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Return the rows ``[P, groups, features]`` that ``layer``'s weight rows are applied to."""
    if layer.op_type == "Conv":
        return _conv_rows(layer, x, max_rows, rng)
    if layer.op_type == "ConvTranspose":
        rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    elif layer.op_type == "Gemm" and layer.trans_a:
        rows = x.T
    else:
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        rows = rows[rng.choice(rows.shape[0], size=max_rows, replace=False)]
    return rows.reshape(rows.shape[0], layer.groups, -1)


def layer_inputs(model: onnx.ModelProto, layers: Sequence[Layer]) -> tuple[dict[tuple, list[Layer]], list[str]]:
    """Group layers that read the same input the same way; return the groups and the tensors to expose.

    Graph inputs need no exposing: a sample already holds them.
    """
    by_signature: dict[tuple, list[Layer]] = {}
    for layer in layers:
        by_signature.setdefault(layer.signature, []).append(layer)
    inputs = {i.name for i in model.graph.input}
    return by_signature, sorted({layer.activation for layer in layers if layer.activation not in inputs})


def collect_input_stats(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    samples: Iterable[Sample],
    *,
    gram: bool = True,
    max_rows: int = 1024,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, InputStats]:
    """Return the input statistics of every layer (by key), one calibration sample at a time.

    Layers reading the same activation the same way share one accumulator. ``gram``
    asks for ``XᵀX`` (for layers where :attr:`Layer.has_gram`). For a ConvTranspose the
    gram is over input channels, exact for the output error when strides cover the kernel.
    """
    samples = list(samples)
    rng = np.random.default_rng(seed)
    by_signature, exposed = layer_inputs(model, layers)
    accumulators: dict[tuple, InputStats] = {}
    progress = progress or NullProgress()
    with Session(expose_tensors(model, exposed), label="model with exposed layer inputs") as session, \
            progress.task("collecting layer inputs", len(samples)) as task:
        for sample in samples:
            values = session.run(sample, exposed) if exposed else {}
            values.update(sample)  # layers reading graph inputs read them from the sample
            for signature, group in by_signature.items():
                layer = group[0]
                rows = layer_rows(layer, np.asarray(values[layer.activation], dtype=np.float32), max_rows, rng)
                acc = accumulators.get(signature)
                if acc is None:
                    acc = InputStats(0, np.zeros(rows.shape[1:], dtype=np.float64),
                                     total=np.zeros(rows.shape[1:], dtype=np.float64))
                    if gram and layer.has_gram:
                        acc.gram = np.zeros((rows.shape[1], rows.shape[2], rows.shape[2]), dtype=np.float64)
                    accumulators[signature] = acc
                acc.rows += rows.shape[0]
                acc.sq_sum += np.einsum("pgi,pgi->gi", rows, rows, dtype=np.float64)
                acc.total += rows.sum(axis=0, dtype=np.float64)  # type: ignore[operator]
                if acc.gram is not None:
                    grouped = np.ascontiguousarray(rows.transpose(1, 0, 2))
                    acc.gram += np.matmul(grouped.transpose(0, 2, 1), grouped).astype(np.float64)
            del values
            task.advance()
    return {layer.key: accumulators[sig] for sig, group in by_signature.items() for layer in group}


# --------------------------------------------------------------------------- error budget

Outputs = list[dict[str, np.ndarray]]
Acceptance = Callable[[Outputs, Outputs], bool]
BudgetSpec = Union[float, Mapping[str, float], Acceptance, None]  # noqa: UP007  (runtime alias, py3.10)


@runtime_checkable
class Judge(Protocol):
    """Anything that judges candidate outputs against reference outputs with a summary (int8's ``Target``)."""

    def judge(self, reference: Outputs, candidate: Outputs) -> tuple[bool, str]:
        """Return (within the budget, a one-line summary)."""
        ...


Budget = Union[Tolerance, Acceptance, Judge]  # noqa: UP007  (runtime alias, py3.10)

#: The default budget of the lossy passes, on held-out calibration samples: the harness's
#: ``int8`` profile (floors on every output's cosine similarity and SQNR against the input
#: model, and on top-1 agreement of score-like outputs), the profile the pipeline's
#: verifier applies to lossy passes, so a pass never hands the verifier a failing model.
DEFAULT_BUDGET: Tolerance = PROFILES["int8"]


def budget_tolerance(budget: BudgetSpec, overrides: Mapping[str, float] | None = None) -> Tolerance | Acceptance:
    """Resolve a pass's ``budget`` parameter (and ``ctx.budget`` overrides) to a check.

    ``None``: :data:`DEFAULT_BUDGET`; a float: that minimum output cosine; a mapping:
    :class:`Tolerance` fields replacing the default's; a callable ``(reference outputs,
    candidate outputs) -> bool``: a task-level check (Python API only).
    """
    if callable(budget):
        return budget
    tolerance = DEFAULT_BUDGET
    fields = set(Tolerance.__dataclass_fields__)
    if isinstance(budget, Mapping):
        unknown = [k for k in budget if k not in fields]
        if unknown:
            raise ValueError(f"budget has no field {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
        tolerance = tolerance.replace(**dict(budget))
    elif budget is not None:
        tolerance = tolerance.replace(min_cosine=float(budget))
    extra = {k: v for k, v in (overrides or {}).items() if k in fields}
    return tolerance.replace(**extra) if extra else tolerance


#: At most this many fitted samples (evenly spaced) are judged besides the held-out ones,
#: so a large calibration set does not multiply the cost of every check.
FITTED_SAMPLES = 32


class HeldOutCheck:
    """Judge candidate models against the input model on held-out samples, under a budget.

    ``fitted`` are the samples the pass fitted its statistics on: a candidate must also
    stay within the budget itself (not a stricter one) on them. The held-out samples
    estimate how the change generalizes; they are few, so without this a model could pass
    them and fail on inputs the pass had seen (silero_vad_half pruned to 70 %: within
    budget on its 6 held-out chunks, outside the int8 profile on all 24).
    """

    def __init__(self, model: onnx.ModelProto, samples: Sequence[Sample], budget: Budget,
                 fitted: Sequence[Sample] = ()) -> None:
        self.samples = list(samples)
        self.fitted = list(Dataset(list(fitted)).spaced(FITTED_SAMPLES))
        self.budget = budget
        with Session(model, label="input model") as session:
            started = time.perf_counter()
            self.reference: Outputs = [session.run(s) for s in self.samples]
            #: the input model's run time per held-out sample, for callers that budget their own runs
            self.seconds_per_run = (time.perf_counter() - started) / max(len(self.samples), 1)
            self.fitted_reference: Outputs = [session.run(s) for s in self.fitted]
        self.evaluations = 0

    def __call__(self, candidate: onnx.ModelProto, budget: Budget | None = None) -> tuple[bool, str]:
        """Return whether ``candidate`` is within budget (or a stricter ``budget``), and a one-line summary."""
        self.evaluations += 1
        with Session(candidate, label="candidate") as session:
            passed, summary = _judge(self.reference, [session.run(s) for s in self.samples],
                                     self.budget if budget is None else budget)
            if passed and self.fitted:
                fitted_passed, fitted_summary = _judge(self.fitted_reference, [session.run(s) for s in self.fitted],
                                                       self.budget)
                if not fitted_passed:
                    return False, f"held-out passed; on the calibration samples {fitted_summary}"
        return passed, summary


def _judge(reference: Outputs, outputs: Outputs, budget: Budget) -> tuple[bool, str]:
    if isinstance(budget, Judge):
        return budget.judge(reference, outputs)
    if callable(budget):
        passed = bool(budget(reference, outputs))
        return passed, "task check " + ("passed" if passed else "failed")
    result = compare_outputs(reference, outputs, profile=budget)
    floats = [o for o in result.outputs if o.elements]
    summary = ", ".join(f"{o.name}: cosine {o.cosine:.5f} SQNR {o.sqnr_db:.1f} dB" for o in floats[:3])
    return result.passed, summary


def relative_output_error(reference: Outputs, candidate: Outputs) -> float:
    """Return the mean over float outputs of ``Σ‖c − r‖² / Σ‖r‖²`` across samples."""
    errors = []
    for name, first in reference[0].items():
        if not np.issubdtype(np.asarray(first).dtype, np.floating):
            continue
        noise = sum(float(np.sum((np.asarray(c[name], np.float64) - r[name]) ** 2))
                    for r, c in zip(reference, candidate, strict=True))
        signal = sum(float(np.sum(np.asarray(r[name], np.float64) ** 2)) for r in reference)
        errors.append(noise / max(signal, 1e-30))
    return float(np.mean(errors)) if errors else 0.0


Probe = tuple[float, Callable[[], onnx.ModelProto]]


def measure_gains(model: onnx.ModelProto, samples: Sequence[Sample], probes: Sequence[Probe],
                  progress: Progress | None = None) -> list[float]:
    """Return, per probe ``(predicted layer error, build model)``, model output error / layer error.

    Each probe changes one layer by a known relative output error; the ratio says how
    much of a layer's error reaches the model outputs (its measured sensitivity).
    """
    with Session(model, label="input model") as session:
        reference = [session.run(s) for s in samples]
    gains = []
    with (progress or NullProgress()).task("measuring layer sensitivity", len(probes)) as task:
        for layer_error, build in probes:
            if layer_error <= 0:
                gains.append(1.0)
            else:
                with Session(build(), label="probe") as session:
                    outputs = [session.run(s) for s in samples]
                gains.append(relative_output_error(reference, outputs) / layer_error)
            task.advance()
    return gains


def search_largest(passes: Callable[[float], bool], low: float, high: float, steps: int) -> float:
    """Return the largest ``x`` in ``[low, high]`` with ``passes(x)`` (monotone), by bisection.

    ``low`` is assumed to pass; ``high`` is tried first.
    """
    if passes(high):
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def describe_budget(budget: Tolerance | Acceptance | Any) -> str:
    """Return a short description of a resolved budget for notes."""
    if isinstance(budget, Tolerance):
        parts = [f"cosine ≥ {budget.min_cosine}" if budget.min_cosine is not None else "",
                 f"SQNR ≥ {budget.min_sqnr_db} dB" if budget.min_sqnr_db is not None else "",
                 f"top-1 ≥ {budget.min_top1}" if budget.min_top1 is not None else ""]
        return "held-out " + ", ".join(p for p in parts if p)
    return "held-out task check"
