"""The wheel holds every package of the tree: pyproject's explicit list must not fall behind it."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


def _package_name(init: Path) -> str:
    parts = init.parent.relative_to(ROOT).parts
    return ".".join(("onnxopt", *parts)) if parts[0] == "passes" else ".".join(parts)


def test_every_package_directory_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {_package_name(p) for top in ("onnxopt", "passes") for p in (ROOT / top).rglob("__init__.py")}
    assert found == set(config["packages"])
    assert config["package-dir"]["onnxopt.passes"] == "passes"
