"""Cell and nucleus boundary polygons: `CellPolygons` in memory, `scan_polygons` streaming.

Xenium writes one closed polygon per cell (first vertex repeated at the end) as rows of
``cell_id, vertex_x, vertex_y``; the readers align them to the cells order, drop the closing
vertex and record what they skip or repair in a ``problems`` list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spatia.arrays import ragged_index
from spatia.errors import BundleError
from spatia.io.cells_zarr import polygon_batches
from spatia.io.tables import ids_to_str, note, open_parquet_stream, read_error

log = logging.getLogger(__name__)


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


def _vertex_batches(path: Path, what: str):
    """(cell_id, vertex_x, vertex_y, label_id or None) arrays of a boundaries file (or of the
    `what` polygon set of a cells.zarr.zip), in batches of at most about `_VERTEX_BATCH_ROWS`
    rows; read errors become `BundleError`."""
    if path.name.lower().endswith(".zarr.zip"):
        yield from polygon_batches(path, what, _VERTEX_BATCH_ROWS)
        return
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
        error = read_error(exc, path)
        if error is None:
            raise
        raise error from None


def _same_label(a, b) -> bool:
    return bool(a == b) or (pd.isna(a) and pd.isna(b))


def scan_polygons(path: Path, cell_ids: pd.Index, problems: list[str], sink, *, what: str) -> PolygonLayout:
    """Read a boundaries file (``cell_boundaries`` / ``nucleus_boundaries``, .parquet or .csv.gz,
    or the `what` polygon set of a ``cells.zarr.zip``) once, in batches, writing the vertices of the polygons it keeps to `sink` (an object with
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
    for (dictionary, indices), x, y, label in _vertex_batches(path, what):
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
        note(problems, f"{path.name}: the file holds no {what} vertices; no {what} polygons")
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
