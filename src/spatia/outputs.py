"""Safe output writing and run records.

Outputs are written under a temporary name beside their final path and renamed when complete,
so an interrupted command never leaves a half-written file where a complete one is expected,
and an existing path is never overwritten.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from spatia.errors import OutputExistsError

RUN_RECORD_NAME = "spatia_run.json"
_RECORDED_PACKAGES = ("numpy", "scipy", "pandas", "anndata", "torch", "lightning", "pot", "tifffile")


def refuse_existing(path: Path, *, what: str = "output") -> None:
    """Raise `OutputExistsError` if `path` exists: spatia never overwrites a user's files."""
    if path.exists():
        raise OutputExistsError(
            f"the {what} already exists and spatia does not overwrite files",
            path=path,
            fix="choose a new output path, or move or delete the existing one yourself",
        )


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    Works for files and directories. On failure the temporary path is removed and `path` is
    untouched. Unless `overwrite` is set, an existing `path` raises `OutputExistsError` before
    any work is done.
    """
    path = Path(path)
    if not overwrite:
        refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_output: nothing was written to {tmp}")
        if overwrite and path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def package_versions() -> dict[str, str]:
    versions = {"spatia": _version("spatia"), "python": platform.python_version()}
    for name in _RECORDED_PACKAGES:
        versions[name] = _version(name)
    return versions


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_record(command: str, config: Any, seed: int | None) -> dict[str, Any]:
    """The resolved configuration, seed and versions of one command run."""
    return {
        "command": command,
        "argv": sys.argv,
        "seed": seed,
        "config": _jsonable(config),
        "versions": package_versions(),
        "platform": platform.platform(),
        "written_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str | Path, payload: Any, *, overwrite: bool = False) -> Path:
    """Write `payload` as indented JSON through a temporary file."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    return path


def write_run_record(
    directory: str | Path, command: str, config: Any, seed: int | None, *, name: str = RUN_RECORD_NAME
) -> Path:
    """Write `spatia_run.json` (resolved config, seed, versions) into `directory`."""
    return write_json(Path(directory) / name, run_record(command, config, seed), overwrite=True)
