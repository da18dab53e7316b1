"""Golden files (reference inputs and outputs) and per-output tolerance files."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.data import Dataset, Sample
from onnxopt.errors import CalibrationDataError
from onnxopt.harness.compare import Tolerance

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


log = logging.getLogger(__name__)


def save_golden(path: str | Path, samples: Sequence[Sample], outputs: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Save inputs and reference outputs so a later check needs no reference model."""
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, Any] = {"inputs": [], "outputs": []}
    for i, (sample, out) in enumerate(zip(samples, outputs, strict=True)):
        for kind, values in (("inputs", sample), ("outputs", out)):
            names = list(values)
            if i == 0:
                index[kind] = names
            for k, name in enumerate(names):
                arrays[f"{kind}_{i}_{k}"] = values[name]
    index["samples"] = len(samples)
    arrays["__index__"] = np.array(json.dumps(index))
    target = Path(path)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return target


def load_golden(path: str | Path) -> tuple[Dataset, list[dict[str, np.ndarray]]]:
    """Load what :func:`save_golden` wrote: (inputs, reference outputs)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            index = json.loads(str(npz["__index__"]))
            samples, outputs = [], []
            for i in range(index["samples"]):
                samples.append({n: npz[f"inputs_{i}_{k}"] for k, n in enumerate(index["inputs"])})
                outputs.append({n: npz[f"outputs_{i}_{k}"] for k, n in enumerate(index["outputs"])})
    except (OSError, KeyError, ValueError) as exc:
        raise CalibrationDataError(f"{path} is not a golden-outputs file written by --save-outputs ({exc})") from exc
    return Dataset(samples, source=str(path)), outputs


def load_tolerances(path: str | Path) -> dict[str, dict[str, float]]:
    """Read per-output tolerance overrides from TOML (``[outputs.NAME]``, ``[default]``)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CalibrationDataError(f"{path}: cannot read tolerances ({exc})") from exc
    valid = {f.name for f in dataclasses.fields(Tolerance)}
    result: dict[str, dict[str, float]] = {}
    tables = {"*": data.get("default", {}), **data.get("outputs", {})}
    for name, table in tables.items():
        bad = [k for k in table if k not in valid]
        if bad:
            raise CalibrationDataError(f"{path}: unknown tolerance {bad[0]!r}; valid: {', '.join(sorted(valid))}")
        result[name] = dict(table)
    return result
