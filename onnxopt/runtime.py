"""onnxruntime plumbing shared by the harness, calibration and the passes' own checks."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.data import Sample
from onnxopt.errors import UnsupportedModelError
from onnxopt.external import has_lazy_tensors, session_parts
from onnxopt.model import exceeds_protobuf_limit, save_model

__all__ = [
    "OPTIMIZATION_LEVELS",
    "Session",
    "expose_tensors",
    "run_model",
    "tensor_types",
]

log = logging.getLogger(__name__)

#: onnxruntime's log level for onnxopt's own sessions and runs: fatal only. onnxruntime
#: prints load and run failures to stderr itself; onnxopt reports them as errors. Set
#: per session and per run, never process-wide: a program that imports onnxopt keeps
#: its own onnxruntime logging.
_LOG_SEVERITY = 4

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_ORT = ort.capi.onnxruntime_pybind11_state
#: what onnxruntime raises for a model it cannot load, and for a run that fails
_LOAD_ERRORS = (_ORT.Fail, _ORT.InvalidGraph, _ORT.InvalidArgument, _ORT.NotImplemented)
_RUN_ERRORS = (_ORT.Fail, _ORT.InvalidArgument, _ORT.RuntimeException)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


class Session:
    """An onnxruntime CPU session from a file, or a ModelProto (over 2 GB via a temp folder)."""

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        optimization: str = "disabled",
        threads: int | None = None,
        label: str = "model",
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        options.log_severity_level = _LOG_SEVERITY
        if threads:
            options.intra_op_num_threads = threads
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._arrays: list[np.ndarray] = []
        try:
            if isinstance(model, str | Path):  # onnxruntime reads the file and its external data itself
                self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            elif has_lazy_tensors(model):  # weights memory-mapped from their files, not copied
                serialized, names, self._arrays = session_parts(model)
                if names:
                    options.add_external_initializers(
                        names, [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
                    )
                self.session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
            elif exceeds_protobuf_limit(model):
                self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-session-")
                path = Path(self._tmp.name) / "model.onnx"
                save_model(model, path, external_data=True)
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
        except _LOAD_ERRORS as exc:
            raise UnsupportedModelError(f"onnxruntime cannot load the {label}: {_first_line(exc)}") from exc
        self.label = label
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, sample: Sample, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one sample; return outputs by name."""
        names = list(outputs) if outputs is not None else self.output_names
        run_options = ort.RunOptions()
        run_options.log_severity_level = _LOG_SEVERITY
        try:
            values = self.session.run(names, sample, run_options)
        except _RUN_ERRORS as exc:
            raise UnsupportedModelError(f"onnxruntime failed to run the {self.label}: {_first_line(exc)}") from exc
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        """Release the session and any temporary files."""
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_model(
    model: onnx.ModelProto | str | Path,
    samples: Iterable[Sample],
    *,
    optimization: str = "disabled",
    outputs: Sequence[str] | None = None,
    label: str = "model",
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` on every sample; return one dict of outputs per sample."""
    with Session(model, optimization=optimization, label=label) as session:
        return [session.run(s, outputs) for s in samples]


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Return the known type of every tensor of the main graph (value_info, I/O, initializers)."""
    graph = model.graph
    types: dict[str, onnx.TypeProto] = {}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type
    for tensor in graph.initializer:
        types[tensor.name] = onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    return types


def expose_tensors(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` with main-graph tensors ``names`` added as outputs.

    Types come from shape inference when known; otherwise the output is declared with
    an element type only, found by running type inference on the node that makes it.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    types = tensor_types(exposed)
    for name in names:
        if name in known:
            continue
        type_proto = types.get(name)
        info = onnx.ValueInfoProto(name=name)
        if type_proto is not None:
            info.type.tensor_type.elem_type = type_proto.tensor_type.elem_type
        exposed.graph.output.append(info)
        known.add(name)
    return exposed
