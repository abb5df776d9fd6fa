"""Generic array helpers shared by the readers (`spatia.io`) and the builder (`spatia.mist`).

Nothing here knows about Xenium or MIST: ragged-row gathers, CSR row blocking and handing freed
memory back to the system.
"""

from __future__ import annotations

import numpy as np


def release_unused_memory() -> None:
    """Hand memory freed after a big read back to the system: Arrow's allocator and glibc's
    malloc both keep freed pages for reuse, which otherwise stay in the process's RSS."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def ragged_index(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gather ragged rows: for rows starting at `starts` with `lengths` items in a flat array,
    their new offsets int64 (len + 1,) and the flat indices int64 of their items, in order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return offsets, index


def row_blocks_by_entries(indptr: np.ndarray, max_entries: int):
    """(first_row, stop_row) of consecutive blocks of CSR rows holding about `max_entries`
    stored entries each (a longer row forms its own block)."""
    n_rows = len(indptr) - 1
    row = 0
    while row < n_rows:
        stop = int(np.searchsorted(indptr, indptr[row] + max_entries, side="right")) - 1
        stop = min(max(stop, row + 1), n_rows)
        yield row, stop
        row = stop
