"""Xenium tables: cells, cell/nucleus boundaries, the 10x feature matrix, clusterings.

Every reader returns plain numpy/pandas/scipy objects with cell IDs as ``str``, and appends a
human-readable line to a ``problems`` list (and logs a warning) for anything it skips or
repairs. Missing or malformed *required* content raises `BundleError`.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.errors import BundleError

log = logging.getLogger(__name__)

GENE_FEATURE_TYPE = "Gene Expression"
"""The 10x feature type of real genes; every other feature type is a control (kept for QC)."""

_REPLACE_FIX = "the file is damaged or not a Xenium output file: copy it again from the Xenium output folder"


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


def note(problems: list[str], message: str) -> None:
    """Record a counted skip/repair: append to `problems` and log a warning."""
    problems.append(message)
    log.warning(message)


# ---------------------------------------------------------------------------------------------
# Cell IDs
# ---------------------------------------------------------------------------------------------


def ids_to_str(values: np.ndarray | pd.Series | list, *, path: Path | None = None) -> np.ndarray:
    """Cell IDs as an object array of ``str``: integers (old bundles) print without ``.0``,
    bytes are decoded as UTF-8."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64).astype(str).astype(object)
    if array.dtype.kind == "f":
        if np.isnan(array).any() or not np.all(np.mod(array, 1) == 0):
            raise BundleError(
                "cell IDs are non-integer numbers or missing",
                path=path,
                fix="cell_id must be a string or integer column without gaps",
            )
        return array.astype(np.int64).astype(str).astype(object)
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8").astype(object)
    if array.dtype.kind == "U":
        return array.astype(object)
    values = np.asarray(pd.Series(array, dtype=object).to_numpy(), dtype=object)
    if pd.isna(values).any():
        raise BundleError(
            f"{int(pd.isna(values).sum())} cell IDs are missing (empty)", path=path, fix="every cell needs a cell_id"
        )
    kind = pd.api.types.infer_dtype(values, skipna=False)
    if kind == "string":
        return values
    if kind == "bytes":
        return pd.Series(values).str.decode("utf-8").to_numpy(dtype=object)
    if kind == "integer":
        return values.astype(np.int64).astype(str).astype(object)
    return pd.Series(values).astype(str).to_numpy(dtype=object)


# ---------------------------------------------------------------------------------------------
# Generic table reading
# ---------------------------------------------------------------------------------------------


PARQUET_BATCH_ROWS = 65_536
"""Rows per batch when a Parquet table is read in pieces."""


def open_parquet_stream(path: Path):
    """A `pyarrow.parquet.ParquetFile` that reads page by page: without pre-buffering, a batch
    costs its own size, not its whole row group (Xenium writes tables of millions of rows as
    one row group)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet or (gzipped) CSV table; any parse failure becomes `BundleError`."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            handle = open_parquet_stream(path)
            # a pandas-written file stores a non-default index as a column: not a table column
            index_columns = (handle.schema_arrow.pandas_metadata or {}).get("index_columns", [])
            schema_names = [c for c in handle.schema_arrow.names if c not in index_columns]
            use = [c for c in columns if c in schema_names] if columns is not None else schema_names
            pieces: dict[str, list[pd.Series]] = {name: [] for name in use}
            for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=use, use_threads=False):
                for name in use:
                    pieces[name].append(batch.column(name).to_pandas())
            if not all(pieces.values()):
                return handle.schema_arrow.empty_table().select(use).to_pandas()
            # one column at a time: the frame, plus one column in two copies, at any moment
            frame = pd.DataFrame(index=pd.RangeIndex(handle.metadata.num_rows))
            for name in use:
                parts = pieces.pop(name)
                frame[name] = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
                del parts
            return frame
        if name.endswith((".csv", ".csv.gz")):
            header = pd.read_csv(path, nrows=0).columns
            use = [c for c in columns if c in header] if columns is not None else None
            return pd.read_csv(path, usecols=use)
    except Exception as exc:
        error = _read_error(exc, path)
        if error is None:
            raise
        raise error from None
    raise BundleError("unsupported table format", path=path, fix="use .parquet, .csv or .csv.gz")


_TABLE_READ_ERRORS = (OSError, ValueError, EOFError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError)


def _read_error(exc: Exception, path: Path) -> BundleError | None:
    """The `BundleError` a failed table read becomes; None for an error that is not about the
    file (a bug: re-raise it)."""
    if isinstance(exc, BundleError):
        return exc
    if isinstance(exc, _TABLE_READ_ERRORS):
        return BundleError(f"cannot read the table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=_REPLACE_FIX)
    if type(exc).__module__.startswith("pyarrow"):  # pyarrow raises its own error classes (ArrowInvalid, ...)
        return BundleError(f"cannot read the Parquet table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=_REPLACE_FIX)
    return None


def _require_columns(df: pd.DataFrame, required: list[str], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise BundleError(
            f"missing column(s) {missing}; found {list(df.columns)}",
            path=path,
            fix=f"a Xenium {path.name} has columns {required} (and more)",
        )


# ---------------------------------------------------------------------------------------------
# cells.parquet
# ---------------------------------------------------------------------------------------------

_CELL_RENAMES = {
    "x_centroid": "x_centroid_um",
    "y_centroid": "y_centroid_um",
    "cell_area": "cell_area_um2",
    "nucleus_area": "nucleus_area_um2",
}


def read_cells_table(path: Path) -> pd.DataFrame:
    """Read ``cells.parquet`` / ``cells.csv.gz``.

    Returns:
        DataFrame indexed by ``cell_id`` (str, unique) with ``x_centroid_um``, ``y_centroid_um``
        (float64), ``cell_area_um2``, ``nucleus_area_um2`` (float64, NaN when absent) and every
        other column of the file (count columns unchanged, text columns as str).
    """
    df = read_table(path)
    _require_columns(df, ["cell_id", "x_centroid", "y_centroid"], path)
    ids = ids_to_str(df.pop("cell_id").to_numpy(), path=path)
    df.rename(columns=_CELL_RENAMES, inplace=True)
    df.index = pd.Index(ids, name="cell_id", dtype=object)
    del ids
    duplicated = df.index.duplicated()
    if duplicated.any():
        raise BundleError(
            f"{int(duplicated.sum())} cell IDs appear more than once (first: {df.index[duplicated][0]!r})",
            path=path,
            fix="cell_id must be unique; use the cells table written by Xenium Onboard Analysis",
        )
    for column in ("x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"):
        if column not in df.columns:
            df[column] = np.nan
        try:
            df[column] = pd.to_numeric(df[column], errors="raise").astype(np.float64)
        except (ValueError, TypeError):
            raise BundleError(f"column {column} is not numeric", path=path, fix=_REPLACE_FIX) from None
    for column in df.columns:
        if df[column].dtype == object:
            values = df[column].to_numpy()
            if len(values) and isinstance(values[0], bytes):
                df[column] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    front = ["x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"]
    return df[front + [c for c in df.columns if c not in front]]


# ---------------------------------------------------------------------------------------------
# Polygons
# ---------------------------------------------------------------------------------------------


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


@dataclass
class CellPolygons:
    """Ragged polygons aligned to the cells order, in micrometres.

    Attributes:
        offsets: int64 (n_cells + 1,); cell i's vertices are ``vertices_um[offsets[i]:offsets[i+1]]``.
        vertices_um: float64 (n_vertices, 2), columns x_um, y_um; the closing vertex (a repeat of
            the first) is dropped. A cell without a polygon has no vertices.
    """

    offsets: np.ndarray
    vertices_um: np.ndarray

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.vertices_um = np.asarray(self.vertices_um, dtype=np.float64).reshape(-1, 2)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != len(self.vertices_um):
            raise ValueError("offsets must be non-decreasing and end at the number of vertices")

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.n_cells

    def n_vertices(self) -> np.ndarray:
        """int64 (n_cells,): vertices per polygon."""
        return np.diff(self.offsets)

    def polygon(self, i: int) -> np.ndarray:
        """float64 (n_vertices_i, 2) vertices (x_um, y_um) of cell i (empty when it has none)."""
        return self.vertices_um[self.offsets[i] : self.offsets[i + 1]]

    def has_polygon(self) -> np.ndarray:
        """bool (n_cells,): the cell has a polygon (at least 3 vertices)."""
        return self.n_vertices() >= 3

    def cell_of_vertex(self) -> np.ndarray:
        """int64 (n_vertices,): the cell each vertex belongs to."""
        return np.repeat(np.arange(self.n_cells, dtype=np.int64), self.n_vertices())

    def bounds_um(self) -> np.ndarray:
        """float64 (n_cells, 4): x_min, y_min, x_max, y_max per polygon (NaN without polygon)."""
        out = np.full((self.n_cells, 4), np.nan)
        counts = self.n_vertices()
        nonempty = counts > 0
        if not nonempty.any():
            return out
        starts = self.offsets[:-1][nonempty]
        out[nonempty, 0] = np.minimum.reduceat(self.vertices_um[:, 0], starts)
        out[nonempty, 1] = np.minimum.reduceat(self.vertices_um[:, 1], starts)
        out[nonempty, 2] = np.maximum.reduceat(self.vertices_um[:, 0], starts)
        out[nonempty, 3] = np.maximum.reduceat(self.vertices_um[:, 1], starts)
        return out

    def subset(self, index: np.ndarray) -> CellPolygons:
        """Polygons of the cells `index` (int positions or a bool mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        offsets, gather = ragged_index(self.offsets[:-1][index], self.n_vertices()[index])
        return CellPolygons(offsets=offsets, vertices_um=self.vertices_um[gather])

    def contains(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """bool (n_cells,): point i lies inside polygon i (even-odd rule, vectorised).

        Cells without a polygon, and NaN points, give False.
        """
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        if x.shape != (self.n_cells,) or y.shape != (self.n_cells,):
            raise ValueError(f"need one point per cell ({self.n_cells}), got {x.shape} and {y.shape}")
        if len(self.vertices_um) == 0:
            return np.zeros(self.n_cells, dtype=bool)
        cell = self.cell_of_vertex()
        nxt = np.arange(1, len(self.vertices_um) + 1)
        counts = self.n_vertices()
        last = self.offsets[1:][counts > 0] - 1
        nxt[last] = self.offsets[:-1][counts > 0]
        x1, y1 = self.vertices_um[:, 0], self.vertices_um[:, 1]
        x2, y2 = x1[nxt], y1[nxt]
        px, py = x[cell], y[cell]
        straddles = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        crossings = straddles & (px < x_cross)
        odd = np.bincount(cell, weights=crossings, minlength=self.n_cells) % 2 == 1
        return odd & self.has_polygon()

    def to_shapely(self) -> np.ndarray:
        """object (n_cells,): shapely Polygons (None where a cell has no polygon)."""
        import shapely

        out = np.full(self.n_cells, None, dtype=object)
        has = self.has_polygon()
        if has.any():
            sub = self.subset(has)
            counts = sub.n_vertices()
            # close every ring for shapely: append each polygon's first vertex
            closed_counts = counts + 1
            closed_offsets = np.concatenate([[0], np.cumsum(closed_counts)])
            coords = np.empty((closed_offsets[-1], 2))
            positions = np.arange(closed_offsets[-1]) - np.repeat(closed_offsets[:-1], closed_counts)
            source = np.repeat(sub.offsets[:-1], closed_counts) + np.where(
                positions == np.repeat(counts, closed_counts), 0, positions
            )
            coords[:] = sub.vertices_um[source]
            ring_offsets = closed_offsets
            polygon_offsets = np.arange(len(counts) + 1)
            out[has] = shapely.from_ragged_array(
                shapely.GeometryType.POLYGON, coords, (ring_offsets, polygon_offsets)
            )
        return out


_VERTEX_BATCH_ROWS = 1 << 20
"""Vertices read per batch of a boundaries file: bounds the reader's memory whatever the section
size (a section of 1M cells has ~25M vertices)."""


@dataclass
class PolygonLayout:
    """Where each cell's polygon lies in the vertex array `scan_polygons` wrote (file order).

    Attributes:
        start: int64 (n_cells,): index of the polygon's first vertex in the written array.
        n_vertices: int64 (n_cells,): its vertices, closing vertex excluded; 0 = no polygon.
        n_written: vertices written (rows of the written array).
    """

    start: np.ndarray
    n_vertices: np.ndarray
    n_written: int

    def gather_index(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the cells `rows` (in that order): offsets int64 (len(rows) + 1,) of their
        polygons and the indices int64 of their vertices in the written array."""
        return ragged_index(self.start[rows], self.n_vertices[rows])


class VertexFile:
    """A sink for `scan_polygons` writing float64 (x_um, y_um) rows to a raw file (read it back
    as a memory map of shape (`PolygonLayout.n_written`, 2))."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "wb")

    def append(self, xy: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(xy, dtype=np.float64).tobytes())

    def close(self) -> None:
        self._handle.close()


class _VertexList:
    """The in-memory sink of `read_polygons`."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def append(self, xy: np.ndarray) -> None:
        self.parts.append(np.array(xy, dtype=np.float64))

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, 2))


def _vertex_batches(path: Path):
    """(cell_id, vertex_x, vertex_y, label_id or None) arrays of a boundaries file, in batches of
    at most `_VERTEX_BATCH_ROWS` rows; read errors become `BundleError`."""
    required = ["cell_id", "vertex_x", "vertex_y"]
    try:
        if path.name.lower().endswith(".parquet"):
            handle = open_parquet_stream(path)
            names = handle.schema_arrow.names
            missing = [c for c in required if c not in names]
            if missing:
                raise BundleError(f"missing column(s) {missing}; found {names}", path=path,
                                  fix=f"a Xenium {path.name} has columns {required} (and more)")
            columns = [*required, *(["label_id"] if "label_id" in names else [])]
            for batch in handle.iter_batches(batch_size=_VERTEX_BATCH_ROWS, columns=columns, use_threads=False):
                ids = batch.column("cell_id").dictionary_encode()  # one Python string per distinct ID
                yield (
                    (ids.dictionary.to_numpy(zero_copy_only=False), ids.indices.to_numpy(zero_copy_only=False)),
                    batch.column("vertex_x").to_numpy(zero_copy_only=False),
                    batch.column("vertex_y").to_numpy(zero_copy_only=False),
                    batch.column("label_id").to_numpy(zero_copy_only=False) if "label_id" in names else None,
                )
            return
        if not path.name.lower().endswith((".csv", ".csv.gz")):
            raise BundleError("unsupported table format", path=path, fix="use .parquet, .csv or .csv.gz")
        header = pd.read_csv(path, nrows=0).columns
        missing = [c for c in required if c not in header]
        if missing:
            raise BundleError(f"missing column(s) {missing}; found {list(header)}", path=path,
                              fix=f"a Xenium {path.name} has columns {required} (and more)")
        usecols = [*required, *(["label_id"] if "label_id" in header else [])]
        for df in pd.read_csv(path, usecols=usecols, chunksize=_VERTEX_BATCH_ROWS):
            codes, uniques = pd.factorize(df["cell_id"].to_numpy(), sort=False)
            yield (
                (np.asarray(uniques), np.where(codes < 0, np.nan, codes) if (codes < 0).any() else codes),
                df["vertex_x"].to_numpy(np.float64),
                df["vertex_y"].to_numpy(np.float64),
                df["label_id"].to_numpy() if "label_id" in df.columns else None,
            )
    except Exception as exc:
        error = _read_error(exc, path)
        if error is None:
            raise
        raise error from None


def _same_label(a, b) -> bool:
    return bool(a == b) or (pd.isna(a) and pd.isna(b))


def scan_polygons(path: Path, cell_ids: pd.Index, problems: list[str], sink, *, what: str) -> PolygonLayout:
    """Read a boundaries file (``cell_boundaries`` / ``nucleus_boundaries``, .parquet or .csv.gz)
    once, in batches, writing the vertices of the polygons it keeps to `sink` (an object with
    ``append(xy)``, e.g. `VertexFile`) in file order; returns where each cell's polygon lies.

    The rules: a polygon is a run of consecutive rows with the same ``cell_id`` (and the same
    ``label_id`` where the file has one). A cell keeps its first polygon; later ones are dropped
    (cells with several are counted). Rows of IDs absent from `cell_ids` are dropped (counted).
    A polygon with a NaN vertex is dropped (counted). The closing vertex (Xenium repeats the
    first vertex at the end) is not counted in `n_vertices`. Memory: one batch plus ~56 bytes
    per cell, whatever the file size.
    """
    n_cells = len(cell_ids)
    start = np.zeros(n_cells, dtype=np.int64)
    n_vertices = np.zeros(n_cells, dtype=np.int64)
    first_xy = np.full((n_cells, 2), np.nan)
    last_xy = np.full((n_cells, 2), np.nan)
    seen = np.zeros(n_cells, dtype=bool)
    several = np.zeros(n_cells, dtype=bool)
    bad = np.zeros(n_cells, dtype=bool)
    unknown: set[str] = set()
    carry: tuple[int, object, bool] | None = None  # (cell row, label, kept) of the previous batch's last run
    written = 0
    n_rows = 0
    for (dictionary, indices), x, y, label in _vertex_batches(path):
        if len(x) == 0:
            continue
        n_rows += len(x)
        # cell row of every vertex (-1: unknown or missing ID), mapped once per distinct ID
        unique_ids = ids_to_str(dictionary, path=path)
        row_of_unique = cell_ids.get_indexer(pd.Index(unique_ids, dtype=object))
        unknown.update(unique_ids[row_of_unique < 0].tolist())
        if indices.dtype.kind == "f":  # missing IDs
            missing = np.isnan(indices)
            rows = np.where(missing, -1, row_of_unique[np.nan_to_num(indices).astype(np.int64)])
        else:
            rows = row_of_unique[indices.astype(np.int64)]
        rows = rows.astype(np.int64)
        xy = np.column_stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
        change = np.ones(len(rows), dtype=bool)
        change[1:] = rows[1:] != rows[:-1]
        if label is not None:
            label_code = pd.factorize(label)[0]
            change[1:] |= label_code[1:] != label_code[:-1]
        continues = carry is not None and rows[0] == carry[0] and (label is None or _same_label(label[0], carry[1]))
        change[0] = not continues
        seg_start = np.flatnonzero(change)
        if continues:
            seg_start = np.r_[0, seg_start]
        seg_end = np.r_[seg_start[1:], len(rows)]
        seg_cell = rows[seg_start]
        seg_kept = np.zeros(len(seg_start), dtype=bool)
        new = np.ones(len(seg_start), dtype=bool)
        if continues:
            new[0] = False
            seg_kept[0] = carry[2]
        new_known = np.flatnonzero(new & (seg_cell >= 0))
        if len(new_known):
            cells_here, first = np.unique(seg_cell[new_known], return_index=True)
            first_segments = new_known[first]
            is_first = ~seen[cells_here]
            seg_kept[first_segments[is_first]] = True
            dropped = np.setdiff1d(new_known, first_segments[is_first], assume_unique=True)
            several[seg_cell[dropped]] = True
            seen[cells_here] = True
        kept_segments = np.flatnonzero(seg_kept)
        if len(kept_segments):
            lengths = seg_end[kept_segments] - seg_start[kept_segments]
            keep = np.repeat(seg_kept, seg_end - seg_start)
            kept_xy = xy[keep]
            cells = seg_cell[kept_segments]
            position = written + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            opening = new[kept_segments]
            start[cells[opening]] = position[opening]
            first_xy[cells[opening]] = xy[seg_start[kept_segments[opening]]]
            n_vertices[cells] += lengths
            last_xy[cells] = xy[seg_end[kept_segments] - 1]
            finite = np.all(np.isfinite(kept_xy), axis=1)
            if not finite.all():
                bad[np.unique(rows[keep][~finite])] = True
            sink.append(kept_xy)
            written += len(kept_xy)
        carry = (int(rows[-1]), None if label is None else label[-1], bool(seg_kept[-1]))
    if n_rows == 0:
        note(problems, f"{path.name}: the file holds no vertices; no {what} polygons")
    if unknown:
        note(problems, f"{path.name}: {len(unknown)} {what} polygons belong to cells not in the kept cells; skipped")
    if several.any():
        note(problems, f"{path.name}: {int(several.sum())} cells have several {what} polygons; kept the first of each")
    closed = (n_vertices >= 2) & np.all(first_xy == last_xy, axis=1)
    n_vertices[closed] -= 1
    if bad.any():
        note(problems, f"{path.name}: {int(bad.sum())} {what} polygons have NaN vertices; dropped")
        n_vertices[bad] = 0
    degenerate = int(((n_vertices > 0) & (n_vertices < 3)).sum())
    if degenerate:
        note(problems, f"{path.name}: {degenerate} {what} polygons have fewer than 3 vertices")
    start[n_vertices == 0] = 0
    return PolygonLayout(start=start, n_vertices=n_vertices, n_written=written)


def read_polygons(path: Path, cell_ids: pd.Index, problems: list[str], *, what: str) -> CellPolygons:
    """Read ``cell_boundaries`` / ``nucleus_boundaries`` (.parquet or .csv.gz) into memory,
    aligned to `cell_ids` (the rules of `scan_polygons`)."""
    vertices = _VertexList()
    layout = scan_polygons(path, cell_ids, problems, vertices, what=what)
    offsets, index = layout.gather_index(np.arange(len(cell_ids)))
    written = vertices.array()
    del vertices
    return CellPolygons(offsets=offsets, vertices_um=written[index])


# ---------------------------------------------------------------------------------------------
# Feature matrix
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureMatrix:
    """The 10x cell-feature matrix, cells as rows.

    Attributes:
        counts: CSR (n_barcodes, n_features), int32 or float32 raw counts.
        barcodes: object (n_barcodes,) of str cell IDs.
        feature_ids, feature_names, feature_types, genomes: object (n_features,) of str.
    """

    counts: sp.csr_matrix
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray
    genomes: np.ndarray

    @property
    def is_gene(self) -> np.ndarray:
        return self.feature_types == GENE_FEATURE_TYPE


def _counts_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind in "iu":
        if data.size and (data.max() > np.iinfo(np.int32).max or data.min() < 0):
            return data.astype(np.float32)
        return data.astype(np.int32, copy=False)
    return data.astype(np.float32, copy=False)


_MATRIX_FIX = "use the cell_feature_matrix.h5 written by Xenium Onboard Analysis (10x HDF5 format)"


@dataclass
class FeatureMatrixFile:
    """A 10x cell-feature matrix opened without reading its counts: barcodes, features and the
    row pointers, with `row_blocks` to stream the counts a block of cells at a time.

    Attributes:
        path: ``cell_feature_matrix.h5`` or a MEX folder.
        barcodes, feature_ids, feature_names, feature_types, genomes: as in `FeatureMatrix`.
        indptr: int64 (n_barcodes + 1,): row pointers (HDF5; None for MEX, see `mex`).
        n_nonzero: stored entries.
    """

    path: Path
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray
    genomes: np.ndarray
    indptr: np.ndarray | None
    n_nonzero: int
    mex: FeatureMatrix | None = None
    """A MEX folder's matrix, read whole once (MEX has no row pointers to stream by)."""

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.barcodes), len(self.feature_ids)

    @property
    def is_gene(self) -> np.ndarray:
        return self.feature_types == GENE_FEATURE_TYPE

    def row_blocks(self, max_nonzero: int = 1 << 22):
        """Yield (first_row, CSR (rows, n_features) with sorted indices) for consecutive blocks
        of rows holding about `max_nonzero` stored entries each (a MEX folder is read whole)."""
        if self.mex is not None:
            yield 0, self.mex.counts
            return
        import h5py

        n_features = self.shape[1]
        try:
            with h5py.File(self.path, "r") as h5:
                data, indices = h5["matrix/data"], h5["matrix/indices"]
                for row, stop in row_blocks_by_entries(self.indptr, max_nonzero):
                    lo, hi = int(self.indptr[row]), int(self.indptr[stop])
                    block_indices = indices[lo:hi].astype(np.int64)
                    if len(block_indices) and (block_indices.min() < 0 or block_indices.max() >= n_features):
                        raise BundleError("the feature matrix has feature indices out of range", path=self.path, fix=_REPLACE_FIX)
                    block = sp.csr_matrix(
                        (_counts_dtype(data[lo:hi]), block_indices, self.indptr[row : stop + 1] - lo),
                        shape=(stop - row, n_features),
                    )
                    block.sort_indices()
                    yield row, block
        except BundleError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"cannot read the HDF5 feature matrix ({exc})", path=self.path, fix=_REPLACE_FIX) from None

    def read(self) -> FeatureMatrix:
        """The whole matrix in memory."""
        if self.mex is not None:
            return self.mex
        blocks = [block for _, block in self.row_blocks()]
        counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(self.shape, dtype=np.int32)
        if counts.data.dtype.kind == "f":  # a block held values beyond int32: all float32
            counts.data = counts.data.astype(np.float32)
        index_dtype = np.int32 if max(self.shape[1], counts.nnz) < np.iinfo(np.int32).max else np.int64
        counts.indices = counts.indices.astype(index_dtype)
        counts.indptr = counts.indptr.astype(index_dtype)
        return FeatureMatrix(counts, self.barcodes, self.feature_ids, self.feature_names, self.feature_types, self.genomes)


def open_feature_matrix(path: Path) -> FeatureMatrixFile:
    """Open ``cell_feature_matrix.h5`` (10x HDF5) or a ``cell_feature_matrix/`` MEX folder:
    barcodes, features and row pointers are read and checked; the counts are not."""
    if path.is_dir():
        mex = _read_mex(path)
        return FeatureMatrixFile(path, mex.barcodes, mex.feature_ids, mex.feature_names, mex.feature_types, mex.genomes,
                                 None, int(mex.counts.nnz), mex)  # fmt: skip
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "matrix" not in h5:
                raise BundleError("not a 10x feature matrix: no 'matrix' group", path=path, fix=_MATRIX_FIX)
            group = h5["matrix"]
            needed = ["barcodes", "data", "indices", "indptr", "shape", "features/id", "features/name", "features/feature_type"]
            missing = [k for k in needed if k not in group]
            if missing:
                raise BundleError(f"not a 10x feature matrix: missing matrix/{missing}", path=path, fix=_MATRIX_FIX)
            n_features, n_cells = (int(v) for v in group["shape"][:2])
            n_data, n_indices = group["data"].shape[0], group["indices"].shape[0]
            indptr = group["indptr"][:].astype(np.int64)
            barcodes = ids_to_str(group["barcodes"][:], path=path)
            feature_ids = ids_to_str(group["features/id"][:], path=path)
            names = ids_to_str(group["features/name"][:], path=path)
            types = ids_to_str(group["features/feature_type"][:], path=path)
            genomes = (
                ids_to_str(group["features/genome"][:], path=path)
                if "features/genome" in group
                else np.array([""] * n_features, dtype=object)
            )
    except BundleError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"cannot read the HDF5 feature matrix ({exc})", path=path, fix=_REPLACE_FIX) from None
    if not (
        len(indptr) == n_cells + 1
        and len(barcodes) == n_cells
        and len(feature_ids) == len(names) == len(types) == n_features
        and n_data == n_indices == (indptr[-1] if len(indptr) else 0)
        and (len(indptr) == 0 or indptr[0] == 0)
        and np.all(np.diff(indptr) >= 0)
    ):
        raise BundleError(
            "the feature matrix arrays are inconsistent (shape, barcodes, features, indptr, indices disagree)",
            path=path,
            fix=_REPLACE_FIX,
        )
    # stored CSC (features x cells) == CSR (cells x features) with the same arrays
    return FeatureMatrixFile(path, barcodes, feature_ids, names, types, genomes, indptr, int(n_data))


def read_feature_matrix(path: Path) -> FeatureMatrix:
    """Read ``cell_feature_matrix.h5`` (10x HDF5) or a ``cell_feature_matrix/`` MEX folder."""
    return open_feature_matrix(path).read()


def _read_mex(folder: Path) -> FeatureMatrix:
    import scipy.io

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise BundleError(f"the MEX feature matrix folder lacks {stem}(.gz)", path=folder, fix=_REPLACE_FIX)

    try:
        matrix = scipy.io.mmread(find("matrix.mtx"))
        barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None, dtype=str)[0].to_numpy(dtype=object)
        features = pd.read_csv(find("features.tsv"), sep="\t", header=None, dtype=str)
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
        raise BundleError(f"cannot read the MEX feature matrix ({exc})", path=folder, fix=_REPLACE_FIX) from None
    counts = sp.csr_matrix(matrix.T)
    counts.data = _counts_dtype(counts.data)
    n_features = features.shape[0]
    if counts.shape != (len(barcodes), n_features) or features.shape[1] < 3:
        raise BundleError("the MEX matrix, barcodes and features disagree", path=folder, fix=_REPLACE_FIX)
    genomes = features[3].to_numpy(dtype=object) if features.shape[1] > 3 else np.array([""] * n_features, dtype=object)
    return FeatureMatrix(
        counts,
        barcodes,
        features[0].to_numpy(dtype=object),
        features[1].to_numpy(dtype=object),
        features[2].to_numpy(dtype=object),
        genomes,
    )


# ---------------------------------------------------------------------------------------------
# Clusterings
# ---------------------------------------------------------------------------------------------


def read_clusterings(clustering_dir: Path, cell_ids: pd.Index, problems: list[str]) -> tuple[pd.DataFrame, list[Path]]:
    """Read every ``<clustering_dir>/<name>/clusters.csv`` (columns Barcode, Cluster).

    Returns:
        A DataFrame indexed like `cell_ids` with one categorical column per clustering, named by
        its folder; categories are the cluster labels as str, ordered numerically when numeric;
        cells without a cluster are NA. And the files read.
    """
    columns: dict[str, pd.Categorical] = {}
    files: list[Path] = []
    if not clustering_dir.is_dir():
        return pd.DataFrame(index=cell_ids), files
    for folder in sorted(p for p in clustering_dir.iterdir() if p.is_dir()):
        path = folder / "clusters.csv"
        if not path.exists():
            continue
        try:
            df = read_table(path)
            _require_columns(df, ["Barcode", "Cluster"], path)
        except BundleError as error:
            note(problems, f"clustering {folder.name} skipped: {error.problem}")
            continue
        files.append(path)
        barcodes = pd.Index(ids_to_str(df["Barcode"].to_numpy(), path=path), dtype=object)
        labels = df["Cluster"]
        duplicated = barcodes.duplicated()
        if duplicated.any():
            note(problems, f"clustering {folder.name}: {int(duplicated.sum())} duplicated barcodes; kept the first")
            barcodes, labels = barcodes[~duplicated], labels[~duplicated]
        unknown = int((~barcodes.isin(cell_ids)).sum())
        if unknown:
            note(problems, f"clustering {folder.name}: {unknown} barcodes are not kept cells; ignored")
        if pd.api.types.is_numeric_dtype(labels):
            numeric = pd.to_numeric(labels)
            order = np.sort(numeric.dropna().unique())
            text = numeric.map(lambda v: str(int(v)) if float(v).is_integer() else str(v))
            categories = [str(int(v)) if float(v).is_integer() else str(v) for v in order]
        else:
            text = labels.astype(str)
            categories = sorted(text.dropna().unique())
        series = pd.Series(text.to_numpy(), index=barcodes).reindex(cell_ids)
        columns[folder.name] = pd.Categorical(series.to_numpy(), categories=categories)
    return pd.DataFrame(columns, index=cell_ids), files
