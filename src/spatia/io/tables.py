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


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet or (gzipped) CSV table; any parse failure becomes `BundleError`."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            schema_names = pq.read_schema(path).names
            use = [c for c in columns if c in schema_names] if columns is not None else None
            table = pq.read_table(path, columns=use)
            return table.to_pandas()
        if name.endswith((".csv", ".csv.gz")):
            header = pd.read_csv(path, nrows=0).columns
            use = [c for c in columns if c in header] if columns is not None else None
            return pd.read_csv(path, usecols=use)
    except (OSError, ValueError, EOFError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BundleError(
            f"cannot read the table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=_REPLACE_FIX
        ) from None
    except Exception as exc:  # pyarrow raises its own error classes (ArrowInvalid, ...)
        if type(exc).__module__.startswith("pyarrow"):
            raise BundleError(
                f"cannot read the Parquet table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=_REPLACE_FIX
            ) from None
        raise
    raise BundleError("unsupported table format", path=path, fix="use .parquet, .csv or .csv.gz")


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
    ids = ids_to_str(df["cell_id"].to_numpy(), path=path)
    df = df.drop(columns=["cell_id"]).rename(columns=_CELL_RENAMES)
    df.index = pd.Index(ids, name="cell_id", dtype=object)
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
        counts = self.n_vertices()[index]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        gather = np.repeat(self.offsets[:-1][index] - offsets[:-1], counts) + np.arange(offsets[-1])
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


@dataclass
class _VertexTable:
    """The columns of a boundaries file that polygons are built from, one row per vertex.

    Attributes:
        cell_row: int32 (n_vertices,) row of each vertex's cell in the kept cells, -1 if the
            cell is not among them.
        xy: float64 (n_vertices, 2) vertex_x, vertex_y in um.
        label: (n_vertices,) ``label_id`` values (None if the file has no such column).
        n_unknown_ids: distinct cell IDs of the file that are not among the kept cells.
    """

    cell_row: np.ndarray
    xy: np.ndarray
    label: np.ndarray | None
    n_unknown_ids: int


_VERTEX_BATCH_ROWS = 1 << 20
"""Vertices converted per Parquet batch (bounds the reader's transient memory on big sections)."""


def _read_vertex_table(path: Path, cell_ids: pd.Index) -> _VertexTable:
    """Read a boundaries file, IDs mapped to rows of `cell_ids`, without a Python string per vertex.

    Parquet is read in batches of `_VERTEX_BATCH_ROWS` vertices and IDs are mapped once per
    distinct ID of a batch (a section of 1M cells has ~25M vertices: per-vertex Python strings
    alone would take over 1 GB). CSV goes through pandas in one piece.
    """
    required = ["cell_id", "vertex_x", "vertex_y"]
    unknown: set[str] = set()

    def rows_of(raw_ids: np.ndarray) -> np.ndarray:
        codes, uniques = pd.factorize(raw_ids, sort=False)
        unique_ids = ids_to_str(np.asarray(uniques), path=path)
        row_of_unique = cell_ids.get_indexer(pd.Index(unique_ids, dtype=object))
        unknown.update(unique_ids[row_of_unique < 0].tolist())
        rows = row_of_unique[codes]
        rows[codes < 0] = -1  # missing IDs
        return rows.astype(np.int32)

    if not path.name.lower().endswith(".parquet"):
        df = read_table(path, columns=[*required, "label_id"])
        _require_columns(df, required, path)
        xy = np.column_stack([df["vertex_x"].to_numpy(np.float64), df["vertex_y"].to_numpy(np.float64)])
        label = df["label_id"].to_numpy() if "label_id" in df.columns else None
        return _VertexTable(rows_of(df["cell_id"].to_numpy()), xy, label, len(unknown))

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise BundleError(f"missing column(s) {missing}; found {names}", path=path,
                              fix=f"a Xenium {path.name} has columns {required} (and more)")
        with_label = "label_id" in names
        n = handle.metadata.num_rows
        cell_row = np.empty(n, dtype=np.int32)
        xy = np.empty((n, 2), dtype=np.float64)
        label = None
        start = 0
        for batch in handle.iter_batches(batch_size=_VERTEX_BATCH_ROWS, columns=[*required, *(["label_id"] if with_label else [])]):
            stop = start + batch.num_rows
            ids = batch.column("cell_id").dictionary_encode()
            dictionary_rows = rows_of(ids.dictionary.to_numpy(zero_copy_only=False))
            indices = ids.indices.to_numpy(zero_copy_only=False)
            cell_row[start:stop] = np.where(np.isnan(indices), -1, dictionary_rows[np.nan_to_num(indices).astype(np.int64)]) \
                if indices.dtype.kind == "f" else dictionary_rows[indices]
            xy[start:stop, 0] = batch.column("vertex_x").to_numpy(zero_copy_only=False)
            xy[start:stop, 1] = batch.column("vertex_y").to_numpy(zero_copy_only=False)
            if with_label:
                values = batch.column("label_id").to_numpy(zero_copy_only=False)
                if label is None:
                    label = np.empty(n, dtype=values.dtype if values.dtype.kind in "iuf" else object)
                label[start:stop] = values
            start = stop
    except (OSError, pa.ArrowException) as exc:
        raise BundleError(
            f"cannot read the Parquet table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=_REPLACE_FIX
        ) from None
    if label is None and with_label:
        label = np.zeros(0, dtype=np.int64)
    return _VertexTable(cell_row[:start], xy[:start], None if label is None else label[:start], len(unknown))


def read_polygons(path: Path, cell_ids: pd.Index, problems: list[str], *, what: str) -> CellPolygons:
    """Read ``cell_boundaries`` / ``nucleus_boundaries`` (.parquet or .csv.gz) aligned to `cell_ids`.

    Vertices of IDs absent from `cell_ids` are dropped (counted). A cell with several polygons
    (several ``label_id`` values, or several separate runs of rows) keeps its first one (counted).
    Polygons with NaN vertices are dropped (counted). The closing vertex is removed.
    """
    vertices = _read_vertex_table(path, cell_ids)
    n_cells = len(cell_ids)
    if len(vertices.xy) == 0:
        note(problems, f"{path.name}: the file holds no vertices; no {what} polygons")
        return CellPolygons(np.zeros(n_cells + 1, dtype=np.int64), np.zeros((0, 2)))
    code, xy = vertices.cell_row, vertices.xy
    if vertices.n_unknown_ids:
        note(problems, f"{path.name}: {vertices.n_unknown_ids} {what} polygons belong to cells not in the kept cells; skipped")
    # one polygon per cell: the first label_id, or else the first contiguous run of rows
    if vertices.label is not None:
        part = pd.factorize(vertices.label)[0].astype(np.int32)
    else:
        part = np.zeros(len(code), dtype=np.int32)
        part[1:] = np.cumsum(code[1:] != code[:-1])
    # runs of vertices with the same (cell, part): about one per polygon, so the per-cell
    # bookkeeping below works on runs, not on vertices
    run_start = np.flatnonzero(np.r_[True, (code[1:] != code[:-1]) | (part[1:] != part[:-1])])
    run_cell, run_part = code[run_start], part[run_start]
    known = run_cell >= 0
    first_run_of_cell = np.full(n_cells, -1, dtype=np.int64)
    cells_seen, first = np.unique(run_cell[known], return_index=True)
    first_run_of_cell[cells_seen] = np.flatnonzero(known)[first]
    first_part = np.full(n_cells, -1, dtype=np.int32)
    first_part[cells_seen] = run_part[first_run_of_cell[cells_seen]]
    pairs = np.unique(np.stack([run_cell[known], run_part[known]], axis=1), axis=0)
    n_multi = int((np.bincount(pairs[:, 0], minlength=n_cells) > 1).sum())
    if n_multi:
        note(problems, f"{path.name}: {n_multi} cells have several {what} polygons; kept the first of each")
    run_kept = known & (run_part == first_part[np.maximum(run_cell, 0)])
    keep = np.repeat(run_kept, np.diff(np.r_[run_start, len(code)]))
    del part
    code, xy = code[keep], xy[keep]
    if len(code) and np.any(code[1:] < code[:-1]):  # not grouped by cell in cell order: sort
        order = np.argsort(code, kind="stable")
        code, xy = code[order], xy[order]
    counts = np.bincount(code, minlength=n_cells)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # drop the closing vertex (Xenium repeats the first vertex at the end)
    starts, ends = offsets[:-1], offsets[1:] - 1
    closed = (counts >= 2) & np.all(xy[np.minimum(starts, len(xy) - 1)] == xy[np.maximum(ends, 0)], axis=1)
    drop = np.zeros(len(xy), dtype=bool)
    drop[ends[closed]] = True
    # drop polygons with NaN vertices
    bad_vertex = ~np.all(np.isfinite(xy), axis=1)
    if bad_vertex.any():
        bad_cells = np.unique(code[bad_vertex])
        note(problems, f"{path.name}: {len(bad_cells)} {what} polygons have NaN vertices; dropped")
        drop |= np.isin(code, bad_cells)
    code, xy = code[~drop], xy[~drop]
    counts = np.bincount(code, minlength=n_cells)
    degenerate = int(((counts > 0) & (counts < 3)).sum())
    if degenerate:
        note(problems, f"{path.name}: {degenerate} {what} polygons have fewer than 3 vertices")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return CellPolygons(offsets=offsets, vertices_um=xy)


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


def read_feature_matrix(path: Path) -> FeatureMatrix:
    """Read ``cell_feature_matrix.h5`` (10x HDF5) or a ``cell_feature_matrix/`` MEX folder."""
    if path.is_dir():
        return _read_mex(path)
    import h5py

    fix = "use the cell_feature_matrix.h5 written by Xenium Onboard Analysis (10x HDF5 format)"
    try:
        with h5py.File(path, "r") as h5:
            if "matrix" not in h5:
                raise BundleError("not a 10x feature matrix: no 'matrix' group", path=path, fix=fix)
            group = h5["matrix"]
            needed = ["barcodes", "data", "indices", "indptr", "shape", "features/id", "features/name", "features/feature_type"]
            missing = [k for k in needed if k not in group]
            if missing:
                raise BundleError(f"not a 10x feature matrix: missing matrix/{missing}", path=path, fix=fix)
            n_features, n_cells = (int(v) for v in group["shape"][:2])
            data = _counts_dtype(group["data"][:])
            # int32 indices where they fit (as scipy would convert them anyway): half the memory
            index_dtype = np.int32 if max(n_features, len(data)) < np.iinfo(np.int32).max else np.int64
            indices = group["indices"][:].astype(index_dtype, copy=False)
            indptr = group["indptr"][:].astype(index_dtype, copy=False)
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
        and len(data) == len(indices) == (indptr[-1] if len(indptr) else 0)
        and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n_features))
        and np.all(np.diff(indptr) >= 0)
    ):
        raise BundleError(
            "the feature matrix arrays are inconsistent (shape, barcodes, features, indptr, indices disagree)",
            path=path,
            fix=_REPLACE_FIX,
        )
    # stored CSC (features x cells) == CSR (cells x features) with the same arrays
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_features))
    counts.sort_indices()
    return FeatureMatrix(counts, barcodes, feature_ids, names, types, genomes)


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
