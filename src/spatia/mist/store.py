"""MIST dataset storage: record encoding, LMDB stores, the index tables and the manifest.

Layout of a dataset directory::

    DATASET_DIR/
      manifest.json          written last; `"complete": true` marks a finished build
      cell.lmdb/             one LMDB environment per level, values = encoded records
      niche.lmdb/
      tissue.lmdb/
      cell_index.parquet     one row per record, in dataset order (row i = item i)
      niche_index.parquet
      tissue_index.parquet
      spatia_run.json        resolved config, seed, package versions
      .build/                only while a build runs or after it was interrupted

Record values (little-endian), one format for the three levels::

    header  24 bytes: magic b"MIST", version u8, level u8, has_mask u8, codec u8,
            height u16, width u16, nnz u32, meta_len u32, payload_len u32
    payload payload_len bytes once decoded; stored as is (codec 0) or LZ4-compressed
            (codec 1, imagecodecs.lz4_encode without header). Decoded, it holds:
      image   height * width bytes, uint8, row-major
      mask    ceil(height * width / 8) bytes, numpy.packbits of the bool mask (if has_mask)
      indices nnz * 4 bytes, uint32 gene-vocabulary indices, ascending
      values  nnz * 4 bytes, uint32 raw counts
      meta    meta_len bytes, UTF-8 JSON (niche: member cell IDs and grid position; tissue:
              niche IDs in grid order)

Masked cell crops are mostly zeros, so LZ4 shrinks them about tenfold (and keeps each value
far below an LMDB page, where an uncompressed 64 px crop would take two).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spatia.errors import DatasetError
from spatia.keys import LEVELS

FORMAT_NAME = "spatia-mist"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PENDING_MANIFEST_NAME = "manifest.json.pending"
"""The manifest of a finished build until `.build/` is removed; then renamed to `MANIFEST_NAME`."""
BUILD_DIR_NAME = ".build"

_MAGIC = b"MIST"
_RECORD_VERSION = 1
_HEADER = struct.Struct("<4sBBBBHHIII")
CODECS = {"none": 0, "lz4": 1}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
_LEVEL_CODES = {level: code for code, level in enumerate(LEVELS)}  # cell 0, niche 1, tissue 2
_LEVEL_NAMES = {v: k for k, v in _LEVEL_CODES.items()}


def store_path(root: str | Path, level: str) -> Path:
    """`DATASET_DIR/<level>.lmdb`."""
    return Path(root) / f"{level}.lmdb"


def index_path(root: str | Path, level: str) -> Path:
    """`DATASET_DIR/<level>_index.parquet`."""
    return Path(root) / f"{level}_index.parquet"


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One decoded record of any level.

    `image` uint8 (H, W); `mask` bool (H, W) or None; `indices` uint32 (nnz,) gene-vocabulary
    indices; `values` uint32 (nnz,) raw counts; `meta` a small JSON-able dict.
    """

    level: str
    image: np.ndarray
    mask: np.ndarray | None
    indices: np.ndarray
    values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def dense_counts(self, n_genes: int, dtype: Any = np.float32) -> np.ndarray:
        """The count vector in vocabulary order: (n_genes,) of `dtype`."""
        out = np.zeros(n_genes, dtype=dtype)
        out[self.indices] = self.values
        return out


def encode_record(
    level: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    indices: np.ndarray,
    values: np.ndarray,
    meta: dict[str, Any] | None = None,
    codec: str = "lz4",
) -> bytes:
    """Serialise one record (see the module docstring for the byte layout)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    indices = np.asarray(indices)
    values = np.asarray(values)
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError("indices and values must be 1-D arrays of the same length")
    masks = None if mask is None else np.asarray(mask)[None]
    return encode_records(level, image[None], masks, np.array([0, len(indices)]), indices, values, [meta or {}], codec=codec)[0]


def encode_records(
    level: str,
    images: np.ndarray,
    masks: np.ndarray | None,
    indptr: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    metas: list[dict[str, Any]] | None = None,
    codec: str = "lz4",
) -> list[bytes]:
    """Serialise n records at once (same bytes as `encode_record` for each).

    `images` uint8 (n, H, W); `masks` bool (n, H, W) or None; counts as CSR arrays `indptr`
    (n+1,), `indices` and `values` (nnz,); `metas` n dicts or None.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, h, w = images.shape
    image_bytes = images.reshape(n, h * w)
    mask_bytes = None
    if masks is not None:
        if masks.shape != images.shape:
            raise ValueError(f"masks shape {masks.shape} differs from images shape {images.shape}")
        mask_bytes = np.packbits(masks.reshape(n, h * w).astype(bool, copy=False), axis=1)
    index_buffer = np.ascontiguousarray(indices, dtype="<u4").tobytes()
    value_buffer = np.ascontiguousarray(values, dtype="<u4").tobytes()
    bounds = (np.asarray(indptr, dtype=np.int64) * 4).tolist()
    has_mask = masks is not None
    code = CODECS[codec]
    compress = _lz4_encode() if code == 1 else None
    out = []
    for i in range(n):
        meta = metas[i] if metas is not None else None
        meta_bytes = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode() if meta else b""
        lo, hi = bounds[i], bounds[i + 1]
        parts = [image_bytes[i].tobytes()]
        if mask_bytes is not None:
            parts.append(mask_bytes[i].tobytes())
        parts += [index_buffer[lo:hi], value_buffer[lo:hi], meta_bytes]
        payload = b"".join(parts)
        header = _HEADER.pack(
            _MAGIC, _RECORD_VERSION, _LEVEL_CODES[level], has_mask, code, h, w, (hi - lo) // 4, len(meta_bytes), len(payload)
        )
        out.append(header + (compress(payload) if compress is not None else payload))
    return out


def _lz4_encode():
    import imagecodecs

    return imagecodecs.lz4_encode


def decode_record(buffer: bytes | memoryview) -> Record:
    """Inverse of `encode_record`. Arrays are read-only views of the (decoded) payload."""
    magic, version, level_code, has_mask, codec, h, w, nnz, meta_len, payload_len = _HEADER.unpack_from(buffer, 0)
    if magic != _MAGIC or version != _RECORD_VERSION:
        raise DatasetError(
            f"a record has magic {magic!r} / version {version}, expected {_MAGIC!r} / {_RECORD_VERSION}",
            fix="rebuild the dataset with this version of spatia",
        )
    body = memoryview(buffer)[_HEADER.size :]
    if codec == CODECS["lz4"]:
        import imagecodecs

        payload = imagecodecs.lz4_decode(body, out=payload_len)
    elif codec == CODECS["none"]:
        payload = body
    else:
        raise DatasetError(f"a record uses unknown codec {codec}", fix="rebuild the dataset with this version of spatia")
    if len(payload) != payload_len:
        raise DatasetError("a record is truncated", fix="the dataset is damaged: rebuild it with `spatia build`")
    pos = 0
    image = np.frombuffer(payload, dtype=np.uint8, count=h * w, offset=pos).reshape(h, w)
    pos += h * w
    mask = None
    if has_mask:
        n_bytes = (h * w + 7) // 8
        bits = np.frombuffer(payload, dtype=np.uint8, count=n_bytes, offset=pos)
        mask = np.unpackbits(bits, count=h * w).reshape(h, w).view(bool)
        pos += n_bytes
    indices = np.frombuffer(payload, dtype="<u4", count=nnz, offset=pos)
    pos += 4 * nnz
    values = np.frombuffer(payload, dtype="<u4", count=nnz, offset=pos)
    pos += 4 * nnz
    meta = json.loads(bytes(payload[pos : pos + meta_len])) if meta_len else {}
    return Record(_LEVEL_NAMES[level_code], image, mask, indices, values, meta)


# ---------------------------------------------------------------------------------------------
# LMDB stores
# ---------------------------------------------------------------------------------------------


def open_writer(path: str | Path, map_size_gb: float):
    """An LMDB environment for writing (created if absent)."""
    import lmdb

    Path(path).mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=int(map_size_gb * 2**30), subdir=True, readahead=False, meminit=False, max_dbs=0)


REWRITE_BATCH_BYTES = 16 * 2**20
"""Bytes of records per transaction while a store is rewritten."""


def rewrite_store(path: str | Path, map_size_gb: float) -> None:
    """Rewrite an LMDB store so that its file depends only on its records: a fresh environment
    written in key order (appends, in transactions of `REWRITE_BATCH_BYTES`), with zero-filled
    pages (`meminit`), then swapped in for ``data.mdb`` atomically. Same records, same bytes,
    whatever the order, grouping or interruptions of the writes that made the store."""
    import lmdb

    path = Path(path)
    tmp = path.with_name(path.name + ".rewrite")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    source = lmdb.open(str(path), readonly=True, lock=False, subdir=True, readahead=False)
    target = lmdb.open(str(tmp), map_size=int(map_size_gb * 2**30), subdir=True, lock=False, meminit=True,
                       readahead=False, max_dbs=0)
    try:
        with source.begin() as read:
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            for key, value in read.cursor():
                batch.append((bytes(key), bytes(value)))
                size += len(key) + len(value)
                if size >= REWRITE_BATCH_BYTES:
                    with target.begin(write=True) as txn:
                        txn.cursor().putmulti(batch, append=True)
                    batch, size = [], 0
            if batch:
                with target.begin(write=True) as txn:
                    txn.cursor().putmulti(batch, append=True)
        target.sync(True)
    finally:
        target.close()
        source.close()
    os.replace(tmp / "data.mdb", path / "data.mdb")
    (path / "lock.mdb").unlink(missing_ok=True)  # the writer's lock file (process IDs); readers use none
    shutil.rmtree(tmp, ignore_errors=True)


def write_records(env, items: list[tuple[bytes, bytes]]) -> None:
    """Put `(key, value)` pairs in one transaction (overwriting equal keys: rewrites are
    idempotent, which is what makes a resumed build duplicate-free)."""
    with env.begin(write=True) as txn:
        for key, value in items:
            txn.put(key, value, overwrite=True)


_READ_ENVS: dict[str, Any] = {}
_READ_ENVS_PID = os.getpid()


def _shared_read_env(path: Path):
    """This process's read-only handle of an LMDB environment (py-lmdb allows one per path and
    process). Handles inherited through fork are dropped first: the parent's stay valid."""
    global _READ_ENVS_PID
    if _READ_ENVS_PID != os.getpid():
        for env in _READ_ENVS.values():
            env.close()
        _READ_ENVS.clear()
        _READ_ENVS_PID = os.getpid()
    key = str(Path(path).resolve())
    env = _READ_ENVS.get(key)
    if env is None:
        import lmdb

        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_readers=2048)
        _READ_ENVS[key] = env
    return env


def close_read_env(path: str | Path) -> None:
    """Close this process's read handle of `path` (readers reopen it on their next read)."""
    env = _READ_ENVS.pop(str(Path(path).resolve()), None)
    if env is not None and _READ_ENVS_PID == os.getpid():
        env.close()


class RecordReader:
    """Read-only access to one level's LMDB store, safe across processes.

    The environment is opened lazily by the process that reads (each DataLoader worker gets its
    own handle, whatever the start method) and shared by all readers of the same path in that
    process; pickling carries only the path.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def get_bytes(self, key: str) -> bytes:
        with _shared_read_env(self.path).begin(buffers=False) as txn:
            value = txn.get(key.encode())
        if value is None:
            raise DatasetError(
                f"record {key!r} is missing from the store",
                path=self.path,
                fix="the dataset is damaged: rebuild it with `spatia build`",
            )
        return value

    def get(self, key: str) -> Record:
        return decode_record(self.get_bytes(key))

    def count(self) -> int:
        return int(_shared_read_env(self.path).stat()["entries"])

    def close(self) -> None:
        close_read_env(self.path)


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check `manifest.json`; refuse incomplete, foreign or newer datasets.

    Raises `DatasetError` naming the directory, the problem and the fix.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("the dataset directory does not exist", path=root, fix="pass the DATASET_DIR written by `spatia build`")
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        if (root / BUILD_DIR_NAME).exists():
            progress = build_progress(root)
            done = f" ({progress[0]} of {progress[1]} chunks done)" if progress else ""
            raise DatasetError(
                f"the dataset is incomplete: its build was interrupted{done}",
                path=root,
                fix="rerun the same `spatia build` command to resume it, or delete the directory and build again",
            )
        raise DatasetError("not a MIST dataset (no manifest.json)", path=root, fix="pass the DATASET_DIR written by `spatia build`")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"manifest.json cannot be read ({exc})", path=manifest, fix="rebuild the dataset") from None
    if data.get("format") != FORMAT_NAME:
        raise DatasetError(f"manifest.json is not a {FORMAT_NAME} manifest", path=manifest, fix="pass a dataset written by `spatia build`")
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"dataset format version {data.get('format_version')} is not supported (this spatia reads {FORMAT_VERSION})",
            path=manifest,
            fix="rebuild the dataset with this version of spatia, or use the spatia version that wrote it",
        )
    if data.get("complete") is not True:
        raise DatasetError("the dataset is not marked complete", path=manifest, fix="rerun `spatia build` to finish it")
    for level in LEVELS:
        for path in (store_path(root, level), index_path(root, level)):
            if not path.exists():
                raise DatasetError(f"{path.name} is missing", path=root, fix="the dataset is damaged: rebuild it with `spatia build`")
    return data


def build_progress(root: str | Path) -> tuple[int, int] | None:
    """(chunks done, chunks planned) of an interrupted build, when known."""
    state = Path(root) / BUILD_DIR_NAME / "progress.json"
    try:
        data = json.loads(state.read_text())
        return int(data["done"]), int(data["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gene_mask_from_manifest(manifest: dict[str, Any]) -> np.ndarray:
    """bool (n_slides, G): genes each slide measured, slides in manifest order."""
    n_genes = len(manifest["genes"])
    masks = np.zeros((len(manifest["slides"]), n_genes), dtype=bool)
    for i, slide in enumerate(manifest["slides"]):
        masks[i, np.asarray(slide["measured_gene_indices"], dtype=np.int64)] = True
    return masks
