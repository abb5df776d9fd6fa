"""The output directory of a build: refusing a foreign or complete one, starting or checking
the state of a resumed one, removing what a failed fresh build wrote, and turning an output
place that cannot take the dataset into `OutputWriteError`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from spatia.errors import DatasetError, OutputExistsError, OutputWriteError
from spatia.mist.store import BUILD_DIR_NAME, MANIFEST_NAME
from spatia.outputs import user_output_errors, write_json


def check_output(out_dir: Path) -> bool:
    """Refuse a complete dataset or a foreign non-empty directory; True when `out_dir` holds an
    interrupted build (to be checked against this one's state before resuming)."""
    if (out_dir / MANIFEST_NAME).exists():
        raise OutputExistsError(
            "a complete MIST dataset already exists here and spatia does not overwrite it",
            path=out_dir,
            fix="choose a new output directory, or delete this one yourself",
        )
    if (out_dir / BUILD_DIR_NAME / "state.json").exists():
        return True
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            "the output path exists and is not an empty directory or an interrupted MIST build",
            path=out_dir,
            fix="choose a new output directory (spatia never writes into a non-empty one)",
        )
    return False


def prepare_output(out_dir: Path, state: dict[str, Any], interrupted: bool) -> None:
    """Start a new build (write its state) or check that the interrupted one has the same
    inputs, config, seed and vocabulary."""
    state_file = out_dir / BUILD_DIR_NAME / "state.json"
    if interrupted:
        previous = json.loads(state_file.read_text())
        differences = [k for k in ("format_version", "config", "seed", "sources", "genes") if previous.get(k) != state.get(k)]
        if differences:
            raise DatasetError(
                "this directory holds an interrupted build of different inputs or options "
                f"(differs in: {', '.join(differences)}); it cannot be resumed with these",
                path=out_dir,
                fix="rerun with the original bundles, options and seed to resume, or delete the directory to start over",
            )
        return
    (out_dir / BUILD_DIR_NAME / "index").mkdir(parents=True, exist_ok=True)
    write_json(state_file, state)


_LMDB_WRITE_PROBLEMS = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system")


@contextlib.contextmanager
def output_errors(out_dir: Path):
    """An output place that cannot take the dataset (no permission, read-only, full disk, also
    as LMDB reports it) becomes `OutputWriteError`, naming the directory and the fix."""
    import lmdb

    fix = "free disk space (or choose another output directory); rerunning the same command resumes the build"
    try:
        with user_output_errors(out_dir):
            yield
    except OutputWriteError as error:
        raise OutputWriteError(error.problem, path=out_dir, fix=fix) from None
    except lmdb.MapFullError:
        raise OutputWriteError("an LMDB store reached lmdb_map_size_gb", path=out_dir,
                               fix="build again with a larger lmdb_map_size_gb") from None
    except lmdb.Error as error:
        reason = next((p for p in _LMDB_WRITE_PROBLEMS if p in str(error)), None)
        if reason is None:
            raise
        raise OutputWriteError(f"cannot write the dataset's stores ({reason.lower()})", path=out_dir, fix=fix) from None


def remove_output(out_dir: Path, existed: bool) -> None:
    """Remove what a failed fresh build wrote (the directory itself unless it existed, empty)."""
    if not existed:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for item in out_dir.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
