"""CI cannot go green by skipping: with ``CI=true`` a missing real model or dependency fails.

Runs a throw-away test file under this repository's conftest in a subprocess, with and
without ``CI``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import pytest

@pytest.mark.real
def test_needs_a_real_model():
    pytest.skip("cannot fetch real model ppocr_det: no network")

def test_needs_torch():
    pytest.importorskip("a_module_that_is_not_installed")

def test_skips_for_another_reason():
    pytest.skip("only meaningful on Windows")
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("true", 2, 1), ("false", 0, 3)])
def test_skips_for_missing_dependencies_fail_in_ci(pytester, monkeypatch, ci, failed, skipped):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    real: real models\n")
    pytester.makepyfile(test_probe=PROBE)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=failed, skipped=skipped)
    if failed:
        result.stdout.fnmatch_lines(["*CI=true: this test may not skip*"])
