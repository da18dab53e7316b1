"""Inputs for a check: synthesized from the model's signature when none are given."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxopt.data import Dataset, Sample, model_inputs
from onnxopt.errors import CalibrationDataError

log = logging.getLogger(__name__)


def synthesize_inputs(
    model: onnx.ModelProto,
    *,
    iterations: int = 3,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    float_range: tuple[float, float] = (-1.0, 1.0),
    int_range: tuple[int, int] = (0, 1),
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
    dynamic_dim: int = 64,
) -> Dataset:
    """Make ``iterations`` random samples that fit the model's inputs.

    Floats are uniform in ``float_range``; integers uniform in ``int_range`` (inclusive;
    per input in ``int_ranges``) so that index-like inputs stay in range; booleans are
    fair coin flips. A dynamic dimension takes its value from ``shapes``; otherwise an
    input's first unknown dimension (usually the batch) is 1 and later ones are
    ``dynamic_dim``; dimensions sharing a symbolic name get one value.
    """
    shapes = dict(shapes or {})
    int_ranges = dict(int_ranges or {})
    specs = model_inputs(model)
    unknown = [n for n in [*shapes, *int_ranges] if n not in {s.name for s in specs}]
    if unknown:
        raise CalibrationDataError(
            f"no model input named {unknown[0]!r}; inputs: {', '.join(s.describe() for s in specs)}"
        )
    symbols: dict[str, int] = {}
    resolved: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise CalibrationDataError(
                    f"--shape for {spec.name!r} has {len(shape)} dims, the model expects {spec.describe()}"
                )
            for dim, value in zip(spec.shape, shape, strict=True):
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
            resolved[spec.name] = shape
    for spec in specs:
        if spec.name in resolved:
            continue
        dims = []
        first_unknown = True
        for dim in spec.shape:
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                dims.append(symbols[dim])
                first_unknown = False
            else:
                value = 1 if first_unknown else dynamic_dim
                first_unknown = False
                if isinstance(dim, str):
                    symbols[dim] = value
                dims.append(value)
        resolved[spec.name] = tuple(dims)
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for _ in range(iterations):
        sample: Sample = {}
        for spec in specs:
            shape = resolved[spec.name]
            if spec.dtype == np.bool_:
                sample[spec.name] = np.asarray(rng.random(shape) < 0.5)
            elif np.issubdtype(spec.dtype, np.integer):
                low, high = int_ranges.get(spec.name, int_range)
                sample[spec.name] = np.asarray(rng.integers(low, high + 1, size=shape), dtype=spec.dtype)
            elif np.issubdtype(spec.dtype, np.floating):
                low_f, high_f = float_range
                sample[spec.name] = np.asarray(rng.uniform(low_f, high_f, size=shape), dtype=spec.dtype)
            else:
                raise CalibrationDataError(f"cannot synthesize input {spec.describe()}; pass data with --data")
        samples.append(sample)
    return Dataset(samples, source="synthesized")
