"""Write a command's outputs (model, JSON report, JUnit, golden file) as one set: all or none.

Each location is checked before any work starts (a 20-minute int8 run must not end in
"cannot write"), and at the end every file is first written into a hidden staging folder
next to its target and only then renamed into place. A failure on the way removes what
was staged, the folders created for it and any file already renamed that did not exist
before, so a failed or interrupted command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxopt.errors import OutputLocationError

__all__ = ["Output", "check_location", "write_outputs"]


@dataclass(frozen=True)
class Output:
    """One file to write: where, the option that named it, and a function writing it to a path."""

    path: Path
    option: str
    write: Callable[[Path], object]


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_location(path: Path, option: str) -> None:
    """Raise :class:`OutputLocationError` unless ``path`` can be written (missing folders are created)."""
    if path.is_dir():
        raise OutputLocationError(f"{option} {path} is a folder; name a file inside it")
    ancestor = _folder(path)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputLocationError(f"{option} {path}: {ancestor} is a file, not a folder; choose another location")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{option} {path}: the folder {ancestor} is not writable; choose another location")


def _make_folders(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, recording each one created (outermost first)."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)


def write_outputs(outputs: Sequence[Output]) -> None:
    """Write every output or, on any failure (Ctrl-C included), none of them."""
    seen: dict[Path, str] = {}
    for output in outputs:
        check_location(output.path, output.option)
        key = output.path.resolve()
        if key in seen:
            raise OutputLocationError(f"{seen[key]} and {output.option} name the same file {output.path}")
        seen[key] = output.option
    created: list[Path] = []
    stages: list[tuple[Path, Output]] = []
    moved: list[Path] = []
    current = outputs[0] if outputs else None
    done = False
    try:
        for output in outputs:
            current = output
            folder = _folder(output.path)
            _make_folders(folder, created)
            stage = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
            stages.append((stage, output))
            output.write(stage / output.path.name)
        for stage, output in stages:
            current = output
            folder = _folder(output.path)
            for staged in sorted(stage.iterdir()):
                target = folder / staged.name
                existed = target.exists()
                os.replace(staged, target)
                if not existed:
                    moved.append(target)
        done = True
    except OSError as exc:
        what = f"{current.option} {current.path}" if current is not None else "output"
        raise OutputLocationError(f"{what}: cannot write ({exc.strerror or exc}); nothing was written") from exc
    finally:
        for stage, _ in stages:
            shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for path in moved:
                path.unlink(missing_ok=True)
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
