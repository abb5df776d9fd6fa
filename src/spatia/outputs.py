"""Safe output writing and run records.

Outputs are written under a temporary name beside their final path and renamed when complete,
so an interrupted command never leaves a half-written file where a complete one is expected,
and an existing path is never overwritten.
"""

from __future__ import annotations

import errno
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

from spatia.errors import OutputExistsError, OutputWriteError
from spatia.keys import RUN_RECORD_NAME

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
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise OutputWriteError(f"cannot write the output (a parent of the path is a file: {blocking})", path=path,
                               fix="choose an output path inside a directory")
    with user_output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with user_output_errors(path):
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"atomic_output: nothing was written to {tmp}")
            if overwrite and path.is_dir() and tmp.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


# errno values that mean "this place cannot take the output", not a bug
_OUTPUT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "the filesystem is read-only", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "the disk quota is exceeded", errno.ENOTDIR: "a parent of the path is a file",
                  errno.ENAMETOOLONG: "the path is too long"}


@contextmanager
def user_output_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError that means the output place is unusable into `OutputWriteError`.

    Covers permission, read-only filesystems, full disks and quotas, raised anywhere inside the
    block (including by libraries writing there), with the output path and the fix.
    """
    try:
        yield
    except OSError as error:
        converted = output_write_error(error, path)
        if converted is None:
            raise
        raise converted from None


def output_write_error(error: OSError, path: str | Path | None = None) -> OutputWriteError | None:
    """`OutputWriteError` for an OSError that means the output place is unusable, else None."""
    reason = _OUTPUT_ERRNOS.get(error.errno)
    if reason is None:
        return None
    return OutputWriteError(f"cannot write the output ({reason}: {error.filename or path})",
                            path=path if path is not None else error.filename,
                            fix="free disk space, or choose an output path in a directory you can write to")


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save` to a temporary name in the same directory, fsync, rename over `path`, fsync the
    directory: a kill or a full disk leaves the previous file whole (checkpoints, flow models)."""
    import torch

    path = Path(path)
    with user_output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    return path


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
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


def run_record(command: str, config: Any, seed: int | None, inputs: dict[str, Any] | None = None,
               results: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inputs, resolved configuration, seed, headline results and versions of one command run."""
    return {
        "command": command,
        "argv": sys.argv,
        "inputs": _jsonable(inputs or {}),
        "seed": seed,
        "config": _jsonable(config),
        "results": _jsonable(results or {}),
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
    directory: str | Path, command: str, config: Any, seed: int | None, *, inputs: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None, name: str = RUN_RECORD_NAME,
) -> Path:
    """Write `spatia_run.json` (inputs, resolved config, seed, versions) into `directory`.

    Every stage writes its record through this one function, so every record has the same
    fields: command, argv, inputs (absolute paths), seed, config, results (headline figures),
    versions, platform, time.
    """
    return write_json(Path(directory) / name, run_record(command, config, seed, inputs, results), overwrite=True)
