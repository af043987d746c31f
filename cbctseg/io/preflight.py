"""Checks before the model loads: what would otherwise fail only after the whole ensemble ran on the first case."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

PROBE_BYTES = 64 * 1024


class PreflightError(RuntimeError):
    """The run cannot work in this environment; the message says what to change."""


def budget_seconds(value: float | str | None) -> float | None:
    """A per-case time budget: None (the default) or a finite number of seconds >= 0, 0 meaning no limit."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise PreflightError(f"time budget {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise PreflightError(f"time budget {value!r} must be a finite number of seconds >= 0 (0: no limit)")
    return seconds


def _probe(folder: Path, what: str) -> None:
    """Create, write and remove a small file in `folder` as this run will."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".cbctseg-", suffix=".probe")
    except OSError as e:
        raise PreflightError(f"{what} {folder} is not writable ({e.strerror})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
    except OSError as e:
        raise PreflightError(f"{what} {folder} cannot take a file of {PROBE_BYTES // 1024} KiB ({e.strerror})") from e
    finally:
        Path(name).unlink(missing_ok=True)


def check_output(output_root: Path, output_folder: str) -> None:
    """The output root is a folder (made if missing) where results.json and the label-map folder can be written."""
    root = Path(output_root)
    if root.exists() and not root.is_dir():
        raise PreflightError(f"output {root} is not a folder")
    folder = root / output_folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"output folder {folder} cannot be made ({e.strerror})") from e
    for path, what in ((root, "output"), (folder, "output folder")):
        _probe(path, what)


def check_temp() -> Path:
    """The temporary directory (compilers and AOT packages unpack there): one exists and takes a file.

    An explicit TMPDIR that is unusable is refused rather than silently replaced by /tmp, as Python would do.
    """
    explicit = os.environ.get("TMPDIR")
    if explicit:
        if not Path(explicit).is_dir():
            raise PreflightError(f"TMPDIR={explicit} is not a folder")
        _probe(Path(explicit), "TMPDIR")
    try:
        temp = Path(tempfile.gettempdir())
    except FileNotFoundError as e:
        raise PreflightError(f"no usable temporary directory ({e}); set TMPDIR to a writable folder") from e
    _probe(temp, "temporary directory")
    return temp


def free_gib(folder: Path) -> float:
    """Free space on the file system of `folder`, in GiB (for the log)."""
    return shutil.disk_usage(folder).free / 1024**3
