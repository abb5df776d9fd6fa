"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lmdb

from spatia.mist import decode_record


def copy_bundle(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a bundle's files except `skip` (tests modify the copy, never the original)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copyfile(item, target / item.name)
    return target


def decoded_records(root: Path, level: str) -> dict[str, dict]:
    """Every record of a MIST level store, decoded, by key."""
    env = lmdb.open(str(root / f"{level}.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): decode_record(v) for k, v in txn.cursor()}
    env.close()
    return out
