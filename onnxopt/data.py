"""Input data for calibration and checks: model signatures and npz datasets.

Two file layouts are accepted, both checked against the model's inputs:

* one ``.npz`` whose arrays are named after the model inputs, samples stacked on a new
  first axis (``x`` of shape ``(N, 1, 3, 32, 32)`` for an input ``x: [1, 3, 32, 32]``).
  When an input's first dimension is the fixed value 1, ``(N, 3, 32, 32)`` is accepted
  too and read as N samples of batch 1;
* a directory of ``.npz`` files, one sample each, arrays shaped like the inputs.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxopt.errors import CalibrationDataError, UnsupportedModelError

__all__ = ["Dataset", "InputSpec", "Sample", "check_calibration", "load_dataset", "model_inputs", "save_dataset"]

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, symbolic names or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        """Return ``name: dtype[d0, d1, ...]`` for messages."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def _value_info_spec(info: onnx.ValueInfoProto) -> InputSpec:
    if not info.type.HasField("tensor_type"):
        raise UnsupportedModelError(
            f"input {info.name!r} is not a tensor (sequence/map/optional inputs are not supported)"
        )
    tensor_type = info.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    dims: list[int | str | None] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value >= 0:  # some exporters write -1 for "dynamic"
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
    return InputSpec(info.name, dtype, tuple(dims))


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Return the inputs a caller must feed (graph inputs that have no initializer)."""
    initialized = {t.name for t in model.graph.initializer}
    return [_value_info_spec(i) for i in model.graph.input if i.name not in initialized]


def model_outputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Return the graph outputs as specs (same shape notation as inputs)."""
    specs = []
    for info in model.graph.output:
        try:
            specs.append(_value_info_spec(info))
        except UnsupportedModelError:
            specs.append(InputSpec(info.name, np.dtype(object), ()))
    return specs


class Dataset(Sequence[Sample]):
    """An ordered list of samples, each a dict from input name to array."""

    def __init__(self, samples: list[Sample], *, source: str = "<memory>") -> None:
        self.samples = samples
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def spaced(self, limit: int) -> Dataset:
        """Return at most ``limit`` samples, evenly spaced over the whole set (all when fewer)."""
        n = len(self.samples)
        if n <= limit:
            return self
        picks = np.linspace(0, n - 1, limit).round().astype(int)
        return Dataset([self.samples[i] for i in picks], source=self.source)

    def split(self, holdout: float = 0.25) -> tuple[Dataset, Dataset]:
        """Split into (calibration, held-out) parts; the held-out part is the tail.

        ``holdout`` is a fraction of the samples; each part keeps at least one sample
        when there are two or more.
        """
        n = len(self.samples)
        if n < 2:
            return self, Dataset(list(self.samples), source=self.source)
        k = min(n - 1, max(1, round(n * holdout)))
        return (
            Dataset(self.samples[: n - k], source=self.source),
            Dataset(self.samples[n - k :], source=self.source),
        )


def load_dataset(path: str | Path, model: onnx.ModelProto | None = None) -> Dataset:
    """Read an npz file or a directory of npz files; validate against ``model`` if given."""
    source = Path(path)
    if not source.exists():
        raise CalibrationDataError(f"{source}: no such file or directory; pass an .npz or a folder")
    specs = {s.name: s for s in model_inputs(model)} if model is not None else None
    if source.is_dir():
        files = sorted(source.glob("*.npz"))
        if not files:
            raise CalibrationDataError(f"{source} holds no .npz files; one sample per .npz expected")
        samples = [dict(_read_npz(f)) for f in files]
    else:
        arrays = _read_npz(source)
        samples = _unstack(arrays, specs, source)
    dataset = Dataset(samples, source=str(source))
    if specs is not None:
        validate_dataset(dataset, list(specs.values()))
    return dataset


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(f"{path} is not a readable .npz file ({exc})") from exc


def _unstack(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec] | None, source: Path) -> list[Sample]:
    if not arrays:
        raise CalibrationDataError(f"{source} holds no arrays")
    per_input: dict[str, list[np.ndarray]] = {}
    for name, array in arrays.items():
        spec = specs.get(name) if specs else None
        if array.ndim == 0:
            raise CalibrationDataError(f"{source}: array {name!r} is a scalar; stack samples on a new first axis")
        if spec is not None and array.ndim == len(spec.shape) and spec.shape and spec.shape[0] == 1:
            per_input[name] = [array[i : i + 1] for i in range(array.shape[0])]
        else:
            per_input[name] = [np.asarray(array[i]) for i in range(array.shape[0])]
    counts = {name: len(v) for name, v in per_input.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(
            f"{source}: arrays hold different numbers of samples {counts}; stack the same N for each"
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationDataError(
            f"{source} holds 0 samples (every array has length 0 on its first axis); stack at least one "
            "representative input per array"
        )
    return [{name: per_input[name][i] for name in per_input} for i in range(n)]


def validate_dataset(dataset: Dataset, specs: list[InputSpec]) -> None:
    """Raise :class:`CalibrationDataError` unless every sample fits the model's inputs."""
    expected = "; ".join(s.describe() for s in specs)
    by_name = {s.name: s for s in specs}
    for index, sample in enumerate(dataset):
        missing = [n for n in by_name if n not in sample]
        extra = [n for n in sample if n not in by_name]
        if missing or extra:
            what = []
            if missing:
                what.append(f"missing {missing}")
            if extra:
                what.append(f"unknown {extra}")
            raise CalibrationDataError(
                f"{dataset.source}: sample {index} has {' and '.join(what)}; the model expects {expected}"
            )
        for name, array in sample.items():
            spec = by_name[name]
            if not isinstance(array, np.ndarray):
                raise CalibrationDataError(f"{dataset.source}: {name!r} of sample {index} is not an array")
            if array.dtype != spec.dtype:
                raise CalibrationDataError(
                    f"{dataset.source}: {name!r} is {array.dtype}, the model expects {spec.dtype} "
                    f"({spec.describe()}); convert it with astype"
                )
            if spec.shape and array.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"{dataset.source}: {name!r} of sample {index} has shape {array.shape}, the "
                    f"model expects {spec.describe()} (stacked files add a first axis for samples)"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=False)):
                if isinstance(want, int) and want > 0 and got != want:
                    raise CalibrationDataError(
                        f"{dataset.source}: {name!r} of sample {index} has size {got} on axis "
                        f"{axis}, the model expects {spec.describe()}"
                    )


def check_calibration(dataset: Dataset) -> None:
    """Raise :class:`CalibrationDataError` when a float input of some sample holds NaN.

    Lossy passes fit statistics to these samples; a NaN spreads through every layer it
    reaches and through the statistics (an all-NaN calibration file made a digits model
    with top-1 0.10 that every held-out check passed, NaN matching NaN). Infinities are
    accepted: attention masks hold -inf.
    """
    for index, sample in enumerate(dataset):
        for name, array in sample.items():
            value = np.asarray(array)
            if value.dtype.kind == "f" and np.isnan(value).any():
                raise CalibrationDataError(
                    f"{dataset.source}: {name!r} of sample {index} holds {int(np.isnan(value).sum())} NaN "
                    "value(s); calibration inputs must be numbers (replace or drop those samples)"
                )


def save_dataset(dataset: Dataset | list[Sample], path: str | Path) -> Path:
    """Write samples as one stacked npz (every sample must have the same shapes)."""
    samples = list(dataset)
    if not samples:
        raise CalibrationDataError("no samples to save")
    names = list(samples[0])
    stacked = {name: np.stack([s[name] for s in samples]) for name in names}
    target = Path(path)
    np.savez(target, **stacked)  # type: ignore[arg-type]
    return target
