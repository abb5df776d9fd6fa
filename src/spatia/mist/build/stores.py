"""The LMDB stores a build writes (three levels plus its progress store), committed in groups."""

from __future__ import annotations

import time
from pathlib import Path

from spatia.arrays import release_unused_memory
from spatia.keys import LEVELS
from spatia.mist.config import BuildConfig
from spatia.mist.render import ChunkResult
from spatia.mist.store import BUILD_DIR_NAME, open_writer, store_path, write_records


class BuildStores:
    """The three level stores plus the progress store of a build, opened for writing.

    Rendered chunks are buffered and committed in groups (at most `FLUSH_BYTES` of records or
    `FLUSH_SECONDS` old): one transaction per level store, and only then one transaction marking
    the group's chunks done. A build killed at any moment therefore never marks a chunk done
    whose records are not all committed; chunks not marked done are rendered again on resume
    and rewrite the same keys with the same bytes.
    """

    FLUSH_BYTES = 64 * 2**20
    FLUSH_SECONDS = 10.0

    def __init__(self, root: Path, config: BuildConfig):
        self.levels = {level: open_writer(store_path(root, level), config.lmdb_map_size_gb) for level in LEVELS}
        self.progress = open_writer(root / BUILD_DIR_NAME / "progress.lmdb", 1.0)
        self._buffer: list[ChunkResult] = []
        self._bytes = 0
        self._since = time.monotonic()

    def add(self, result: ChunkResult) -> list[str]:
        """Buffer a rendered chunk; returns the chunk keys committed by this call (maybe none)."""
        self._buffer.append(result)
        self._bytes += sum(len(v) for items in (result.cells, result.niches, result.tissues) for _, v in items)
        if self._bytes >= self.FLUSH_BYTES or time.monotonic() - self._since >= self.FLUSH_SECONDS:
            return self.flush()
        return []

    def flush(self) -> list[str]:
        """Commit every buffered chunk; returns their keys."""
        buffered, self._buffer, self._bytes, self._since = self._buffer, [], 0, time.monotonic()
        if not buffered:
            return []
        write_records(self.levels["cell"], [item for r in buffered for item in r.cells])
        write_records(self.levels["niche"], [item for r in buffered for item in r.niches])
        write_records(self.levels["tissue"], [item for r in buffered for item in r.tissues])
        keys = [r.chunk_key for r in buffered]
        write_records(self.progress, [(f"chunk/{key}".encode(), b"1") for key in keys])
        del buffered
        release_unused_memory()  # the freed records would otherwise stay in this process's RSS
        return keys

    def is_done(self, key: str) -> bool:
        with self.progress.begin() as txn:
            return txn.get(key.encode()) is not None

    def get(self, key: str) -> bytes | None:
        with self.progress.begin() as txn:
            return txn.get(key.encode())

    def put(self, key: str, value: bytes) -> None:
        write_records(self.progress, [(key.encode(), value)])

    def close(self) -> None:
        for env in self.levels.values():
            env.close()
        self.progress.close()
