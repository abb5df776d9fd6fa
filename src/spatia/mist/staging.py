"""A slide's counts and cell polygons staged on disk for a build, read back a chunk at a time.

The builder never holds a slide's count matrix or its polygons: `stage_slide` streams them once
into files under the build's work directory (counts in blocks of rows of the feature matrix,
polygons in batches of vertices), and the builder gathers the rows of one chunk, or one block
of cells, from read-only memory maps that are closed again straight after (so their pages do
not stay in the process's memory). What stays in memory is a few numbers per cell.

Files of one slide (`directory`): ``counts_indices.u32`` and ``counts_values.u32`` (CSR
entries in vocabulary columns, ascending, symbols measured twice summed) and
``vertices_um.f64`` (float64 x_um, y_um rows of the kept polygons, in the boundaries file's
order).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from spatia.errors import InputDataError
from spatia.arrays import ragged_index, row_blocks_by_entries
from spatia.io.polygons import PolygonLayout, VertexFile, scan_polygons

COUNT_BLOCK_NONZERO = 1 << 21
"""Stored count entries converted per block while staging (~50 MB of transient memory)."""


@dataclass
class StagedCounts:
    """A slide's raw counts on disk, rows in vocabulary columns.

    Attributes:
        directory: where ``counts_indices.u32`` and ``counts_values.u32`` are.
        indptr: int64 (n_source_rows + 1,): row pointers of the stored rows (feature-matrix order).
        row_of_cell: int64 (n_cells,): the stored row of each cell of the slide's cells table.
        total: int64 (n_cells,): total gene counts of each cell.
        n_detected: int32 (n_cells,): genes with a non-zero count in each cell.
    """

    directory: Path
    indptr: np.ndarray
    row_of_cell: np.ndarray
    total: np.ndarray
    n_detected: np.ndarray

    def rows(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR rows of the cells `cells` (positions in the cells table, in that order): indptr
        int64, indices uint32 (ascending per row), values uint32."""
        source = self.row_of_cell[np.asarray(cells, dtype=np.int64)]
        indptr, index = ragged_index(self.indptr[source], self.indptr[source + 1] - self.indptr[source])
        if len(index) == 0:
            return indptr, np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint32)
        n = int(self.indptr[-1])
        indices = np.memmap(self.directory / "counts_indices.u32", dtype=np.uint32, mode="r", shape=(n,))
        values = np.memmap(self.directory / "counts_values.u32", dtype=np.uint32, mode="r", shape=(n,))
        out = np.array(indices[index]), np.array(values[index])
        del indices, values  # unmapped: the pages read do not stay in this process
        return indptr, *out


@dataclass
class StagedPolygons:
    """A slide's cell polygons on disk (see `spatia.io.polygons.scan_polygons`)."""

    path: Path
    layout: PolygonLayout

    def rows(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Polygons of the cells `cells` (in that order): offsets int64 (len + 1,) and
        vertices float64 (V, 2) x_um, y_um."""
        offsets, index = self.layout.gather_index(np.asarray(cells, dtype=np.int64))
        if len(index) == 0:
            return offsets, np.zeros((0, 2))
        vertices = np.memmap(self.path, dtype=np.float64, mode="r", shape=(self.layout.n_written, 2))
        out = np.array(vertices[index])
        del vertices
        return offsets, out


@dataclass
class StagedSlide:
    """What `stage_slide` wrote to `directory`, and the problems it counted while reading."""

    directory: Path
    counts: StagedCounts
    polygons: StagedPolygons | None
    problems: list[str]


def _check_counts(data: np.ndarray, where: Any) -> None:
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.rint(data)) or np.any(data < 0):
            raise InputDataError(
                "the count matrix holds non-integer or negative values",
                path=where,
                fix="MIST stores raw transcript counts: pass the unnormalised cell_feature_matrix",
            )
    elif data.size and data.min() < 0:
        raise InputDataError("the count matrix holds negative values", path=where, fix="pass raw counts")
    if data.size and data.max() > np.iinfo(np.uint32).max:
        raise InputDataError("the count matrix holds counts above 2^32", path=where, fix="pass raw transcript counts")


def _stage_counts(blocks, column_of_feature: np.ndarray, n_genes: int, row_of_cell: np.ndarray, directory: Path,
                  n_source_rows: int, where: Any) -> StagedCounts:  # fmt: skip
    """Write CSR blocks (rows of the source matrix, source columns) in vocabulary columns
    (`column_of_feature`, -1 = not a gene: dropped)."""
    row_nnz = np.zeros(n_source_rows, dtype=np.int64)
    row_total = np.zeros(n_source_rows, dtype=np.int64)
    with open(directory / "counts_indices.u32", "wb") as indices_file, open(directory / "counts_values.u32", "wb") as values_file:
        for first_row, block in blocks:
            block = sp.csr_matrix(block)
            _check_counts(block.data, where)
            columns = column_of_feature[block.indices]
            is_gene = columns >= 0
            owner = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[is_gene]
            genes = sp.csr_matrix(
                (np.rint(block.data[is_gene]).astype(np.int64), (owner, columns[is_gene])), shape=(block.shape[0], n_genes)
            )  # COO -> CSR sums symbols measured twice and sorts the columns
            genes.eliminate_zeros()
            stop = first_row + block.shape[0]
            row_nnz[first_row:stop] = np.diff(genes.indptr)
            row_total[first_row:stop] = np.asarray(genes.sum(axis=1)).ravel()
            indices_file.write(genes.indices.astype(np.uint32).tobytes())
            values_file.write(genes.data.astype(np.uint32).tobytes())
    indptr = np.concatenate([[0], np.cumsum(row_nnz)]).astype(np.int64)
    return StagedCounts(
        directory=directory,
        indptr=indptr,
        row_of_cell=row_of_cell,
        total=row_total[row_of_cell],
        n_detected=row_nnz[row_of_cell].astype(np.int32),
    )


def _memory_blocks(counts: sp.spmatrix, max_nonzero: int):
    """Consecutive row blocks of an in-memory matrix, about `max_nonzero` entries each."""
    counts = sp.csr_matrix(counts if sp.issparse(counts) else np.asarray(counts))
    for row, stop in row_blocks_by_entries(counts.indptr, max_nonzero):
        yield row, counts[row:stop]


CIRCLE_VERTICES = 32
"""Vertices of the circles that stand in for a missing segmentation (`circle_radius_um`)."""


def circle_polygons(x_um: np.ndarray, y_um: np.ndarray, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Circles of `radius_um` centred on each cell (`CIRCLE_VERTICES`-gons): offsets int64
    (n + 1,) and vertices float64 (n * CIRCLE_VERTICES, 2) in micrometres."""
    angles = 2 * np.pi * np.arange(CIRCLE_VERTICES) / CIRCLE_VERTICES
    x = np.asarray(x_um, dtype=np.float64)[:, None] + radius_um * np.cos(angles)[None, :]
    y = np.asarray(y_um, dtype=np.float64)[:, None] + radius_um * np.sin(angles)[None, :]
    offsets = np.arange(len(x) + 1, dtype=np.int64) * CIRCLE_VERTICES
    return offsets, np.column_stack([x.ravel(), y.ravel()])


def stage_slide(slide: Any, vocabulary: dict[str, int], directory: Path, *,
                circle_radius_um: float | None = None) -> StagedSlide:
    """Stream a slide's gene counts and cell polygons into `directory` (emptied first).

    `slide` is a `XeniumSlide` read with ``in_memory=False`` (counts and polygons streamed
    from its files) or any slide-like object holding them in memory (written out as they are).
    With `circle_radius_um`, the cells are circles of that radius around their centroids
    (`circle_polygons`) and the slide's own polygons are not read.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    where = getattr(slide, "path", None)
    n_cells = len(slide.cells)
    problems: list[str] = []
    deferred = getattr(slide, "deferred", None)
    if deferred is not None and getattr(slide, "counts", None) is None:
        matrix = deferred.matrix
        is_gene = matrix.is_gene
        column_of_feature = np.full(len(is_gene), -1, dtype=np.int64)
        column_of_feature[is_gene] = [vocabulary[str(g)] for g in matrix.feature_names[is_gene]]
        counts = _stage_counts(
            matrix.row_blocks(COUNT_BLOCK_NONZERO), column_of_feature, len(vocabulary), deferred.matrix_rows,
            directory, matrix.shape[0], matrix.path,
        )  # fmt: skip
    else:
        matrix = slide.counts
        if matrix.shape[0] != n_cells:
            raise InputDataError(
                f"the count matrix has {matrix.shape[0]} rows for {n_cells} cells",
                path=where,
                fix="counts must be aligned to the cells table",
            )
        column_of_feature = np.array([vocabulary[str(g)] for g in slide.gene_names], dtype=np.int64)
        counts = _stage_counts(
            _memory_blocks(matrix, COUNT_BLOCK_NONZERO), column_of_feature, len(vocabulary), np.arange(n_cells, dtype=np.int64), directory,
            n_cells, where,
        )  # fmt: skip

    polygons = None
    vertices_path = directory / "vertices_um.f64"
    if circle_radius_um is not None:
        offsets, vertices = circle_polygons(slide.cells["x_centroid_um"].to_numpy(), slide.cells["y_centroid_um"].to_numpy(),
                                            circle_radius_um)
        sink = VertexFile(vertices_path)
        try:
            sink.append(vertices)
        finally:
            sink.close()
        polygons = StagedPolygons(vertices_path, PolygonLayout(offsets[:-1].copy(), np.diff(offsets), int(offsets[-1])))
    elif deferred is not None and getattr(slide, "cell_boundaries", None) is None:
        if deferred.cell_boundaries is not None:
            sink = VertexFile(vertices_path)
            try:
                layout = scan_polygons(deferred.cell_boundaries, slide.cells.index, problems, sink, what="cell")
            finally:
                sink.close()
            polygons = StagedPolygons(vertices_path, layout)
    elif slide.cell_boundaries is not None:
        given = slide.cell_boundaries
        if len(given.offsets) != n_cells + 1:
            raise InputDataError(
                f"the slide has {n_cells} cells but {len(given.offsets) - 1} cell polygons",
                path=where,
                fix="cell_boundaries must be aligned to the cells table (read the bundle with spatia.io.read_xenium)",
            )
        sink = VertexFile(vertices_path)
        try:
            sink.append(given.vertices_um)
        finally:
            sink.close()
        offsets = np.asarray(given.offsets, dtype=np.int64)
        polygons = StagedPolygons(vertices_path, PolygonLayout(offsets[:-1].copy(), np.diff(offsets), int(offsets[-1])))
    return StagedSlide(directory=directory, counts=counts, polygons=polygons, problems=problems)


TRUTH_BATCH_ROWS = 65_536
"""Rows of a ground-truth table converted per batch while staging."""


@dataclass
class StagedTruth:
    """The simulator's ground truth of a slide, one file per column aligned to the cells table.

    A gather maps one column at a time and unmaps it straight after, so reading the rows of a
    block of cells costs at most one column's pages, whatever the number of columns.

    Attributes:
        directory: holds ``truth_<k>.npy`` per column.
        columns: column name -> (file, kind): kind "number" (int64, float64 or bool values) or
            "text" (int32 codes into `categories`, -1 missing).
        categories: text column -> its values.
        has_row: bool (n_cells,): the cell has a ground-truth row.
    """

    directory: Path
    columns: dict[str, tuple[Path, str]]
    categories: dict[str, list[str]]
    has_row: np.ndarray

    def rows(self, cells: np.ndarray, *, as_float: bool) -> dict[str, np.ndarray]:
        """Column -> values of the cells `cells`: numeric and boolean columns as they are (as
        float64 with NaN for cells without a row when `as_float`), text as object arrays of
        str with None where missing."""
        cells = np.asarray(cells, dtype=np.int64)
        missing = ~self.has_row[cells]
        out: dict[str, np.ndarray] = {}
        for name, (path, kind) in self.columns.items():
            mapped = np.load(path, mmap_mode="r")
            values = np.array(mapped[cells])
            del mapped  # unmapped: at most one column's pages are held at a time
            if kind == "text":
                text = np.asarray(self.categories[name] + [None], dtype=object)
                values = text[np.where(values < 0, len(text) - 1, values)]
            elif as_float:
                values = values.astype(np.float64)
                values[missing] = np.nan
            out[name] = values
        return out


def stage_ground_truth(path: Path, cell_ids: Any, directory: Path) -> StagedTruth | None:
    """Stream a ground-truth Parquet table (a ``cell_id`` column + any others) into one file
    per column in `directory`, aligned to the cells `cell_ids` (a pandas Index of str; a cell
    listed twice keeps its first row). None (with a warning) without a ``cell_id`` column."""
    import logging

    import pandas as pd
    import pyarrow as pa

    from spatia.io.tables import ids_to_str, open_parquet_stream

    handle = open_parquet_stream(path)
    fields = [f for f in handle.schema_arrow if f.name != "cell_id"]
    if len(fields) == len(handle.schema_arrow):
        logging.getLogger(__name__).warning("%s has no cell_id column; ignored", path)
        return None
    n_cells = len(cell_ids)
    columns: dict[str, tuple[Path, str]] = {}
    code_of: dict[str, dict[str, int]] = {}
    for k, f in enumerate(fields):
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
        dtype = np.bool_ if pa.types.is_boolean(f.type) else np.float64 if pa.types.is_floating(f.type) else np.int64
        file = directory / f"truth_{k}.npy"
        if numeric:
            np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(n_cells,))[:] = 0
        else:
            np.lib.format.open_memmap(file, mode="w+", dtype=np.int32, shape=(n_cells,))[:] = -1
            code_of[f.name] = {}
        columns[f.name] = (file, "number" if numeric else "text")
    has_row = np.zeros(n_cells, dtype=bool)
    for batch in handle.iter_batches(batch_size=TRUTH_BATCH_ROWS, use_threads=False):
        ids = ids_to_str(batch.column("cell_id").to_numpy(zero_copy_only=False), path=path)
        cells = cell_ids.get_indexer(pd.Index(ids, dtype=object))
        known = np.flatnonzero(cells >= 0)
        unique_cells, first = np.unique(cells[known], return_index=True)
        fresh = ~has_row[unique_cells]
        targets, sources = unique_cells[fresh], known[first[fresh]]
        has_row[targets] = True
        for name, (file, kind) in columns.items():
            column = batch.column(name)
            if kind == "text":
                encoded = column.cast(pa.string()).dictionary_encode()
                codes = code_of[name]
                lookup = np.array([codes.setdefault(str(v), len(codes)) for v in encoded.dictionary.to_pylist()] + [-1],
                                  dtype=np.int32)  # fmt: skip
                indices = encoded.indices.to_numpy(zero_copy_only=False)
                local = np.where(np.isnan(indices), -1, np.nan_to_num(indices)).astype(np.int64) \
                    if indices.dtype.kind == "f" else indices.astype(np.int64)
                values = lookup[local[sources]]
            else:
                values = column.to_numpy(zero_copy_only=False)[sources]
            mapped = np.load(file, mmap_mode="r+")
            mapped[targets] = values
            mapped.flush()
            del mapped
    categories = {name: list(codes) for name, codes in code_of.items()}
    return StagedTruth(directory=directory, columns=columns, categories=categories, has_row=has_row)
