"""`build_dataset`: Xenium bundles -> one MIST dataset directory (cells, niches, tissue regions).

How a build runs (see docs/mist.md for the rules in full):

1. Every source is read once to collect its gene symbols; the vocabulary is their sorted union.
   The resolved config, seed, vocabulary and the SHA-256 of every source file go to
   `.build/state.json` (a resumed build must match it exactly).
2. Each slide is planned from its tables alone: polygon checks and repairs, skipped cells by
   reason, crop centres, the global crop scale factor (a robust percentile of cell sizes), the
   intensity range for uint8 normalisation (percentiles of a coarse pyramid level), niche and
   tissue-region grid positions, and the spatial split.
3. The slide is cut into chunks, one per occupied 1024 x 1024 px tissue region. The main process
   reads each chunk's image window once (plus a margin for the crops of its border cells);
   worker processes (`workers`) render the records; the main process writes them to the three
   LMDB stores in groups and only then marks those chunks done in `.build/progress.lmdb`. Keys
   are deterministic, so a chunk interrupted half-way is rewritten with the same bytes on
   resume.
4. When every chunk of a slide is done its index tables go to `.build/index/`; when every slide
   is done the index tables are concatenated, `spatia_run.json` is written and, last,
   `manifest.json` with `"complete": true`. Readers refuse a directory without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from spatia.console import progress
from spatia.errors import DatasetError, InputDataError, OutputExistsError
from spatia.io.tables import release_unused_memory
from spatia.mist.config import BuildConfig
from spatia.mist.geometry import (
    ZERO_AREA_PX2,
    PolygonStats,
    crop_starts,
    invalid_polygons,
    kernel_radius,
    polygon_stats,
    repair_polygon,
    source_range,
)
from spatia.mist.render import ChunkJob, ChunkResult, render_chunk
from spatia.mist.staging import StagedSlide, StagedTruth, stage_ground_truth, stage_slide
from spatia.mist.splits import (
    BUFFER,
    SPLIT_NAMES,
    TRAIN,
    assign_units,
    block_split_grid,
    buffer_cells,
    slide_rng,
)
from spatia.mist.store import (
    BUILD_DIR_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    LEVELS,
    MANIFEST_NAME,
    index_path,
    open_writer,
    store_path,
    write_records,
)
from spatia.outputs import write_json, write_run_record

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "outside_image",
    "no_polygon",
    "zero_area_polygon",
    "invalid_polygon",
    "zero_counts",
    "low_counts",
)
"""Why a cell is left out, in the order the rules are applied (a cell counts once, under the
first rule it fails): centroid outside the image; no boundary polygon; fewer than 3 distinct
vertices or zero area; self-intersecting polygon whose repair leaves no area; zero total counts;
fewer than `min_counts` counts."""

GROUND_TRUTH_FILE = "ground_truth.parquet"
_PLAN_BLOCK_CELLS = 100_000
"""Cells whose polygons are read and checked at a time while a slide is planned."""
_SHA_BLOCK = 4 * 2**20


# ---------------------------------------------------------------------------------------------
# Public results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkDone:
    """Passed to `on_chunk_done` after a chunk is committed."""

    slide_id: str
    chunk_key: str
    chunks_done: int
    chunks_total: int


@dataclass
class BuildSummary:
    """What a build wrote (also in `manifest.json`)."""

    path: Path
    n_slides: int
    n_genes: int
    n_cells: int
    n_niches: int
    n_tissues: int
    skipped: dict[str, int]
    repaired: dict[str, int]
    n_clipped: int
    chunks_rendered: int
    chunks_resumed: int
    seconds: float
    splits: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _load(source: Any):
    """A `XeniumSlide` (or any object with the same attributes) from a path or an object."""
    if isinstance(source, (str, Path)):
        from spatia.io.xenium import read_xenium

        return read_xenium(source, read_nucleus_boundaries=False, in_memory=False)
    return source


def _source_label(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"<in-memory {type(source).__name__} {getattr(source, 'slide_id', '?')}>"


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_SHA_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()


def _source_files(slide: Any) -> list[Path]:
    """The files a slide was read from (plus the simulator's ground truth), sorted, unique."""
    files = [Path(p) for p in getattr(slide, "files_read", []) or []]
    root = getattr(slide, "path", None)
    if root is not None and (Path(root) / GROUND_TRUTH_FILE).is_file():
        files.append(Path(root) / GROUND_TRUTH_FILE)
    return sorted({p.resolve() for p in files if p.is_file()})


def _checksums(files: list[Path], root: Path | None) -> dict[str, str]:
    out = {}
    for path in files:
        try:
            name = str(path.relative_to(Path(root).resolve())) if root is not None else str(path)
        except ValueError:
            name = str(path)
        out[name] = _sha256_file(path)
    return out


def _content_fingerprint(slide: Any) -> str:
    """For slides given as objects (no files): a digest of the tables the build uses."""
    sha = hashlib.sha256()
    sha.update(str(slide.slide_id).encode())
    sha.update(np.asarray(slide.cells.index.astype(str)).astype("U").tobytes())
    sha.update(np.ascontiguousarray(slide.cells[["x_centroid_um", "y_centroid_um"]].to_numpy()).tobytes())
    counts = sp.csr_matrix(slide.counts)
    for array in (counts.indptr, counts.indices, counts.data):
        sha.update(np.ascontiguousarray(array).tobytes())
    sha.update("\n".join(slide.gene_names).encode())
    polygons = slide.cell_boundaries
    if polygons is not None:
        sha.update(np.ascontiguousarray(polygons.offsets).tobytes())
        sha.update(np.ascontiguousarray(polygons.vertices_um).tobytes())
    sha.update(repr(tuple(slide.image.level_shapes_yx)).encode())
    sha.update(repr(float(slide.pixel_size_um)).encode())
    return sha.hexdigest()


def _fingerprint(slide: Any) -> dict[str, str]:
    files = _source_files(slide)
    if files:
        return _checksums(files, getattr(slide, "path", None))
    return {"<tables>": _content_fingerprint(slide)}


# ---------------------------------------------------------------------------------------------
# Intensity normalisation
# ---------------------------------------------------------------------------------------------


def estimate_intensity_range(image: Any, config: BuildConfig) -> dict[str, Any]:
    """Robust intensity range of a slide: the `config.norm_percentiles` of its non-zero pixels.

    Reads the finest pyramid level with at most 4 x `norm_max_samples` pixels (the coarsest one
    if none is that small) in bands of rows, keeping every `stride`-th pixel so that at most
    `norm_max_samples` are kept; memory stays bounded whatever the slide size. Zeros are
    excluded (Xenium pads outside the scanned area with 0).
    """
    shapes = [tuple(int(v) for v in s) for s in image.level_shapes_yx]
    budget = 4 * config.norm_max_samples
    level = next((k for k, (h, w) in enumerate(shapes) if h * w <= budget), len(shapes) - 1)
    h, w = shapes[level]
    stride = max(1, math.ceil(math.sqrt(h * w / config.norm_max_samples)))
    band = stride * max(1, 512 // stride)  # rows per read: bounded memory on any image width
    samples = []
    for y in range(0, h, band):
        rows = image.read_window(0, y, w, min(band, h - y), level=level, channel=config.image_channel)
        sub = np.asarray(rows)[::stride, ::stride]
        samples.append(sub[sub > 0].astype(np.float64, copy=False))
    values = np.concatenate(samples) if samples else np.zeros(0)
    lo_p, hi_p = config.norm_percentiles
    if values.size == 0:
        low, high = 0.0, 1.0
        log.warning("the morphology image has no non-zero pixel at level %d; using the range [0, 1]", level)
    else:
        low, high = (float(v) for v in np.percentile(values, [lo_p, hi_p]))
        if not high > low:
            high = low + 1.0
    return {
        "low": low,
        "high": high,
        "percentiles": [lo_p, hi_p],
        "level": level,
        "level_shape_yx": list(shapes[level]),
        "stride": stride,
        "n_samples": int(values.size),
        "channel": config.image_channel,
    }


# ---------------------------------------------------------------------------------------------
# Planning one slide
# ---------------------------------------------------------------------------------------------


@dataclass
class SlidePlan:
    """Everything decided about one slide before any pixel is rendered (arrays are (n_cells,)
    in the slide's cells order unless stated)."""

    slide_index: int
    slide_id: str
    pixel_size_um: float
    image_shape_yx: tuple[int, int]
    reason: np.ndarray  # int8: 0 kept, k > 0 -> SKIP_REASONS[k - 1]
    repaired: np.ndarray  # bool: self-intersecting polygon repaired
    repaired_vertices_px: dict[int, np.ndarray]
    stats: PolygonStats  # in slide pixels (repaired polygons included)
    centroid_px: np.ndarray  # float64 (n, 2)
    crop_start: np.ndarray  # int64 (n, 2) top-left (x, y) of each crop on the scaled grid
    scale: dict[str, Any]
    clipped: np.ndarray  # bool
    normalisation: dict[str, Any]
    niche_rc: np.ndarray  # int64 (n, 2) global niche grid row, col
    tissue_rc: np.ndarray  # int64 (n, 2)
    cell_split: np.ndarray  # int8 codes (SPLIT_NAMES)
    block_grid: np.ndarray  # int8 (rows, cols) split per block (blocks mode) or empty
    slide_split: int | None  # slides mode
    gene_columns: np.ndarray  # int64 (n_slide_genes,) vocabulary index of each slide gene
    total_counts: np.ndarray  # int64
    genes_detected: np.ndarray  # int32: genes with a non-zero count
    chunks: list[tuple[int, int]]  # occupied tissue regions, row-major
    chunk_cells: dict[tuple[int, int], np.ndarray]  # cell positions per chunk, in cells order

    @property
    def kept(self) -> np.ndarray:
        return self.reason == 0

    def split_of_tissue(self, tr: int, tc: int, block_tissues: int) -> int:
        if self.slide_split is not None:
            return self.slide_split
        return int(self.block_grid[tr // block_tissues, tc // block_tissues])


def plan_slide(
    slide: Any,
    staged: StagedSlide,
    slide_index: int,
    slide_id: str,
    vocabulary: dict[str, int],
    config: BuildConfig,
    seed: int,
    slide_split: int | None,
) -> SlidePlan:
    """Decide which cells are kept (and why not), crop geometry, scale, grid and split.

    Polygons are read from the staged slide a block of `_PLAN_BLOCK_CELLS` cells at a time."""
    cells = slide.cells
    n = len(cells)
    pixel_size = float(slide.pixel_size_um)
    h, w = (int(v) for v in slide.image.level_shapes_yx[0])
    centroid = cells[["x_centroid_um", "y_centroid_um"]].to_numpy(dtype=np.float64) / pixel_size
    reason = np.zeros(n, dtype=np.int8)

    def skip(mask: np.ndarray, name: str, rows: np.ndarray | slice = slice(None)) -> None:
        part = reason[rows]
        part[(part == 0) & mask] = SKIP_REASONS.index(name) + 1
        reason[rows] = part

    inside = np.isfinite(centroid).all(axis=1)
    inside[inside] = (
        (centroid[inside, 0] >= 0) & (centroid[inside, 0] < w) & (centroid[inside, 1] >= 0) & (centroid[inside, 1] < h)
    )
    skip(~inside, "outside_image")

    # polygons, a block of cells at a time: statistics, then validity and repair
    repaired = np.zeros(n, dtype=bool)
    repaired_vertices: dict[int, np.ndarray] = {}
    bbox = np.full((n, 4), np.nan)
    area = np.full(n, np.nan)
    n_distinct = np.zeros(n, dtype=np.int64)
    for first in range(0, n, _PLAN_BLOCK_CELLS):
        rows = np.arange(first, min(n, first + _PLAN_BLOCK_CELLS))
        if staged.polygons is None:
            offsets, vertices_px = np.zeros(len(rows) + 1, dtype=np.int64), np.zeros((0, 2))
        else:
            offsets, vertices_um = staged.polygons.rows(rows)
            vertices_px = vertices_um / pixel_size
        block = polygon_stats(offsets, vertices_px)
        bbox[rows], area[rows], n_distinct[rows] = block.bbox_px, block.area_px2, block.n_distinct
        skip(np.diff(offsets) == 0, "no_polygon", rows)
        skip((block.n_distinct < 3) | ~(np.nan_to_num(block.area_px2) > ZERO_AREA_PX2), "zero_area_polygon", rows)
        candidates = np.flatnonzero(reason[rows] == 0)
        for j in candidates[invalid_polygons(offsets, vertices_px, candidates)]:
            i = int(rows[j])
            fixed = repair_polygon(vertices_px[offsets[j] : offsets[j + 1]])
            if fixed is None:
                reason[i] = SKIP_REASONS.index("invalid_polygon") + 1
                continue
            repaired[i] = True
            repaired_vertices[i] = fixed
    stats = PolygonStats(bbox_px=bbox, area_px2=area, n_distinct=n_distinct)
    if repaired_vertices:
        rows = np.fromiter(repaired_vertices, dtype=np.int64)
        lengths = np.array([len(repaired_vertices[int(i)]) for i in rows])
        sub = polygon_stats(np.r_[0, np.cumsum(lengths)], np.concatenate([repaired_vertices[int(i)] for i in rows]))
        stats.bbox_px[rows] = sub.bbox_px
        stats.area_px2[rows] = sub.area_px2
        stats.n_distinct[rows] = sub.n_distinct

    total = staged.counts.total
    if config.min_counts > 0:
        skip(total == 0, "zero_counts")
        skip(total < config.min_counts, "low_counts")
    kept = reason == 0

    # crop geometry and the global scale factor
    side = stats.side_px
    if kept.any():
        at_percentile = float(np.percentile(side[kept], config.scale_percentile))
        at_percentile = max(at_percentile, 1.0)
        factor = config.cell_image_px / at_percentile
        clipped = kept & (side * factor > config.cell_image_px + 1e-9)
        max_side = float(side[kept].max())
    else:
        at_percentile, factor, max_side = float("nan"), float("nan"), float("nan")
        clipped = np.zeros(n, dtype=bool)
    scale = {
        "factor": factor,
        "percentile": config.scale_percentile,
        "side_px_at_percentile": at_percentile,
        "max_side_px": max_side,
        "cell_image_px": config.cell_image_px,
        "n_clipped": int(clipped.sum()),
    }
    start = np.zeros((n, 2), dtype=np.int64)
    if kept.any():
        start[kept] = crop_starts(stats.center_px[kept], factor, config.cell_image_px)

    # grids
    niche_rc = np.zeros((n, 2), dtype=np.int64)
    niche_rc[inside] = np.floor(centroid[inside][:, ::-1] / config.niche_px).astype(np.int64)
    tissue_rc = niche_rc // config.tissue_niches

    # splits
    cell_split = np.full(n, TRAIN, dtype=np.int8)
    block_grid = np.zeros((0, 0), dtype=np.int8)
    if slide_split is not None:
        cell_split[:] = slide_split
    elif kept.any():
        block_rc = tissue_rc // config.split_block_tissues
        block_grid = block_split_grid(block_rc[kept], config.split_fractions, slide_rng(seed, slide_id))
        cell_split[kept] = block_grid[block_rc[kept, 0], block_rc[kept, 1]]
        block_px = float(config.tissue_px * config.split_block_tissues)
        buffer = buffer_cells(
            centroid[kept, 0], centroid[kept, 1], block_rc[kept], block_grid, block_px, config.split_buffer_um / pixel_size
        )
        kept_rows = np.flatnonzero(kept)
        cell_split[kept_rows[buffer]] = BUFFER

    # genes
    gene_columns = np.array([vocabulary[str(g)] for g in slide.gene_names], dtype=np.int64)

    # chunks: occupied tissue regions in row-major order, cells in cells order within each
    kept_rows = np.flatnonzero(kept)
    chunk_cells: dict[tuple[int, int], np.ndarray] = {}
    chunks: list[tuple[int, int]] = []
    if len(kept_rows):
        keys = tissue_rc[kept_rows]
        order = np.lexsort((kept_rows, keys[:, 1], keys[:, 0]))
        sorted_rows, sorted_keys = kept_rows[order], keys[order]
        boundaries = np.flatnonzero(np.any(np.diff(sorted_keys, axis=0) != 0, axis=1)) + 1
        for part_rows, part_keys in zip(np.split(sorted_rows, boundaries), np.split(sorted_keys, boundaries)):
            key = (int(part_keys[0, 0]), int(part_keys[0, 1]))
            chunks.append(key)
            chunk_cells[key] = part_rows

    return SlidePlan(
        slide_index=slide_index,
        slide_id=slide_id,
        pixel_size_um=pixel_size,
        image_shape_yx=(h, w),
        reason=reason,
        repaired=repaired,
        repaired_vertices_px=repaired_vertices,
        stats=stats,
        centroid_px=centroid,
        crop_start=start,
        scale=scale,
        clipped=clipped,
        normalisation={},
        niche_rc=niche_rc,
        tissue_rc=tissue_rc,
        cell_split=cell_split,
        block_grid=block_grid,
        slide_split=slide_split,
        gene_columns=gene_columns,
        total_counts=total,
        genes_detected=staged.counts.n_detected,
        chunks=chunks,
        chunk_cells=chunk_cells,
    )


# ---------------------------------------------------------------------------------------------
# IDs
# ---------------------------------------------------------------------------------------------


def cell_key(slide_id: str, cell_id: str) -> str:
    """LMDB key of a cell record."""
    return f"{slide_id}/cell/{cell_id}"


def niche_id(slide_id: str, row: int, col: int) -> str:
    """ID (and LMDB key) of the niche at global grid position (row, col) of a slide."""
    return f"{slide_id}/niche/r{row}_c{col}"


def tissue_id(slide_id: str, row: int, col: int) -> str:
    """ID (and LMDB key) of the tissue region at grid position (row, col) of a slide."""
    return f"{slide_id}/tissue/r{row}_c{col}"


def chunk_key(slide_index: int, tr: int, tc: int) -> str:
    return f"s{slide_index}/t{tr}_{tc}"


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


def _chunk_niches(plan: SlidePlan, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Occupied niches of a chunk in row-major order (int64 (k, 2)) and each cell's local index."""
    niches, local = np.unique(plan.niche_rc[rows], axis=0, return_inverse=True)
    return niches, local.reshape(-1)


def make_job(
    plan: SlidePlan,
    slide: Any,
    staged: StagedSlide,
    cell_ids: np.ndarray,
    tr: int,
    tc: int,
    config: BuildConfig,
    n_genes: int,
    normalisation: dict[str, Any],
) -> ChunkJob:
    """Read the chunk's image window and gather its cells, niches and tissue record inputs."""
    rows = plan.chunk_cells[(tr, tc)]
    factor = plan.scale["factor"]
    size = config.cell_image_px
    side = config.tissue_px
    rx, ry = tc * side, tr * side
    # the region plus the source reach of a crop centred on its border
    reach = max(
        size / (2.0 * factor) + kernel_radius(factor),
        kernel_radius(config.niche_image_px / config.niche_px),
        kernel_radius(config.tissue_image_px / side),
    )
    margin = int(math.ceil(reach)) + 2
    ox, oy = rx - margin, ry - margin
    wsize = side + 2 * margin
    channel = config.image_channel
    window = np.asarray(slide.image.read_window(ox, oy, wsize, wsize, level=0, channel=channel))

    starts = plan.crop_start[rows]
    lo, hi = source_range(starts, starts + size, factor)
    outside = (lo[:, 0] < ox) | (lo[:, 1] < oy) | (hi[:, 0] > ox + wsize) | (hi[:, 1] > oy + wsize)
    outlier_rows = np.flatnonzero(outside)
    outlier_origins = lo[outlier_rows]
    outlier_windows = [
        np.asarray(slide.image.read_window(x0, y0, x1 - x0, y1 - y0, level=0, channel=channel))
        for (x0, y0), (x1, y1) in zip(lo[outlier_rows].tolist(), hi[outlier_rows].tolist())
    ]

    # polygons of the chunk in slide pixels, repaired ones substituted
    assert staged.polygons is not None  # a slide without polygons keeps no cell: it has no chunks
    poly_offsets, poly_vertices_um = staged.polygons.rows(rows)
    poly_vertices = poly_vertices_um / plan.pixel_size_um
    repaired = [j for j, row in enumerate(rows.tolist()) if row in plan.repaired_vertices_px]
    if repaired:
        parts = [poly_vertices[poly_offsets[j] : poly_offsets[j + 1]] for j in range(len(rows))]
        for j in repaired:
            parts[j] = plan.repaired_vertices_px[int(rows[j])]
        poly_offsets = np.r_[0, np.cumsum([len(p) for p in parts])].astype(np.int64)
        poly_vertices = np.concatenate(parts)

    indptr, indices, values = staged.counts.rows(rows)

    niches, cell_niche = _chunk_niches(plan, rows)
    sid = plan.slide_id
    niche_keys = [niche_id(sid, int(r), int(c)) for r, c in niches]
    tn = config.tissue_niches
    members: list[list[str]] = [[] for _ in range(len(niches))]
    for cell, j in zip(cell_ids[rows], cell_niche):
        members[j].append(str(cell))
    niche_meta = [
        {"cell_ids": members[j], "grid_rc": [int(r), int(c)], "tissue_grid_rc": [int(r) % tn, int(c) % tn]}
        for j, (r, c) in enumerate(niches)
    ]
    slots = [""] * (tn * tn)
    for key, (r, c) in zip(niche_keys, niches):
        slots[(int(r) % tn) * tn + int(c) % tn] = key
    return ChunkJob(
        chunk_key=chunk_key(plan.slide_index, tr, tc),
        window=window,
        window_origin_xy=(ox, oy),
        norm_low=normalisation["low"],
        norm_high=normalisation["high"],
        scale=factor,
        cell_image_px=config.cell_image_px,
        niche_px=config.niche_px,
        niche_image_px=config.niche_image_px,
        tissue_niches=tn,
        tissue_image_px=config.tissue_image_px,
        codec=config.record_codec,
        n_genes=n_genes,
        cell_keys=[cell_key(sid, str(c)) for c in cell_ids[rows]],
        crop_starts=starts,
        poly_offsets=poly_offsets,
        poly_vertices_px=poly_vertices,
        counts_indptr=indptr,
        counts_indices=indices,
        counts_values=values,
        outlier_rows=outlier_rows,
        outlier_windows=outlier_windows,
        outlier_origins_xy=outlier_origins,
        cell_niche=cell_niche,
        niche_keys=niche_keys,
        niche_rc=niches,
        niche_meta=niche_meta,
        region_origin_xy=(rx, ry),
        tissue_key=tissue_id(sid, tr, tc),
        tissue_meta={"niche_ids": slots, "grid_rc": [tr, tc]},
    )


# ---------------------------------------------------------------------------------------------
# Index tables
# ---------------------------------------------------------------------------------------------


INDEX_BATCH_CELLS = 50_000
"""Cells per row group of the cell index while it is written: bounds the builder's memory for
the index whatever the slide size."""


def write_cell_index(plan: SlidePlan, slide: Any, config: BuildConfig, path: Path, work_dir: Path) -> dict[str, int]:
    """Write one slide's cell index rows (record order, chunk by chunk) to `path` in row groups
    of about `INDEX_BATCH_CELLS` cells, through a temporary file; returns cells per split. The
    simulator's ground truth, where the bundle has one, is staged in `work_dir` first."""
    truth = None
    truth_file = _ground_truth_file(slide)
    if truth_file is not None:
        truth = stage_ground_truth(truth_file, slide.cells.index, work_dir)
    truth_as_float = False
    if truth is not None and plan.chunks:
        kept_rows = np.concatenate([plan.chunk_cells[c] for c in plan.chunks])
        # cells without ground truth get NaN: make every numeric or boolean column float in all
        # row groups, not only in those that happen to hold such a cell
        truth_as_float = bool((~truth.has_row[kept_rows]).any())
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for c in plan.chunks:
        rows = plan.chunk_cells[c]
        if size and size + len(rows) > INDEX_BATCH_CELLS:
            groups.append([])
            size = 0
        groups[-1].append(rows)
        size += len(rows)
    splits: dict[str, int] = {}
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for group in groups:
            rows = np.concatenate(group) if group else np.zeros(0, dtype=np.int64)
            frame = cell_index_rows(plan, slide, config, rows, truth, truth_as_float)
            for name, n in frame["split"].value_counts().items():
                splits[str(name)] = splits.get(str(name), 0) + int(n)
            if writer is None:
                schema = _arrow_schema(frame)
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
            del frame
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)
    return splits


def _arrow_schema(frame: pd.DataFrame) -> pa.Schema:
    """The Arrow schema of an index frame with text (object) columns typed as strings, so that
    every row group of a file has the same schema even where a batch holds only missing text."""
    fields = []
    for name in frame.columns:
        dtype = frame[name].dtype
        # object (pandas 2) or StringDtype (pandas 3) text columns -> Arrow strings
        text = dtype == object or pd.api.types.is_string_dtype(dtype)
        fields.append(pa.field(name, pa.string() if text else pa.from_numpy_dtype(dtype)))
    return pa.schema(fields)


def cell_index_rows(plan: SlidePlan, slide: Any, config: BuildConfig, rows: np.ndarray,
                    truth: StagedTruth | None, truth_as_float: bool = False) -> pd.DataFrame:
    """The cell index rows of the slide's cells `rows` (in that order)."""
    sid, ps = plan.slide_id, plan.pixel_size_um
    cells_df = slide.cells
    cell_ids = np.asarray(cells_df.index[rows].astype(str))
    nrc, trc = plan.niche_rc[rows], plan.tissue_rc[rows]
    columns: dict[str, Any] = {
        "key": [cell_key(sid, c) for c in cell_ids],
        "slide_id": sid,
        "slide_index": np.full(len(rows), plan.slide_index, dtype=np.int32),
        "cell_id": cell_ids,
        "niche_id": [niche_id(sid, r, c) for r, c in nrc.tolist()],
        "tissue_id": [tissue_id(sid, r, c) for r, c in trc.tolist()],
        "split": np.asarray(SPLIT_NAMES, dtype=object)[plan.cell_split[rows]],
        "x_centroid_um": plan.centroid_px[rows, 0] * ps,
        "y_centroid_um": plan.centroid_px[rows, 1] * ps,
        "x_centroid_px": plan.centroid_px[rows, 0],
        "y_centroid_px": plan.centroid_px[rows, 1],
        "crop_x_px": (plan.crop_start[rows, 0] + config.cell_image_px / 2.0) / plan.scale["factor"],
        "crop_y_px": (plan.crop_start[rows, 1] + config.cell_image_px / 2.0) / plan.scale["factor"],
        "bbox_side_px": plan.stats.side_px[rows],
        "polygon_area_um2": plan.stats.area_px2[rows] * ps * ps,
        "clipped": plan.clipped[rows],
        "repaired": plan.repaired[rows],
        "niche_row": nrc[:, 0].astype(np.int32),
        "niche_col": nrc[:, 1].astype(np.int32),
        "tissue_row": trc[:, 0].astype(np.int32),
        "tissue_col": trc[:, 1].astype(np.int32),
        "total_counts": plan.total_counts[rows],
        "n_genes_detected": plan.genes_detected[rows],
    }
    skip_cols = {"x_centroid_um", "y_centroid_um", "x_centroid_px", "y_centroid_px", *slide.cluster_columns}
    for column in cells_df.columns:
        if column in skip_cols:
            continue
        values = cells_df[column].take(rows).to_numpy()  # take first: no whole-column copy per group
        if pd.api.types.is_numeric_dtype(cells_df[column]) or pd.api.types.is_bool_dtype(cells_df[column]):
            columns[f"qc_{column}"] = values.astype(np.float64)
        else:
            columns[f"qc_{column}"] = _as_text(values)
    for column in slide.cluster_columns:
        columns[f"label_{column}"] = _as_text(cells_df[column].take(rows).to_numpy())
    if truth is not None:
        for column, values in truth.rows(rows, as_float=truth_as_float).items():
            columns[f"truth_{column}"] = values
    return pd.DataFrame(columns)


def region_index_tables(plan: SlidePlan, config: BuildConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The niche and tissue index rows of one slide, in record order (chunk by chunk)."""
    sid, ps, tn = plan.slide_id, plan.pixel_size_um, config.tissue_niches
    # niches and tissue regions, chunk by chunk (record order)
    niche_rc, niche_tissue, niche_cells, niche_totals, niche_split = [], [], [], [], []
    tissue_rows = []
    for tr, tc in plan.chunks:
        chunk_rows = plan.chunk_cells[(tr, tc)]
        niches, local = _chunk_niches(plan, chunk_rows)
        split = SPLIT_NAMES[plan.split_of_tissue(tr, tc, config.split_block_tissues)]
        niche_rc.append(niches)
        niche_tissue += [tissue_id(sid, tr, tc)] * len(niches)
        niche_split += [split] * len(niches)
        niche_cells.append(np.bincount(local, minlength=len(niches)))
        niche_totals.append(np.bincount(local, weights=plan.total_counts[chunk_rows], minlength=len(niches)))
        tissue_rows.append(
            {
                "key": tissue_id(sid, tr, tc),
                "slide_id": sid,
                "slide_index": plan.slide_index,
                "tissue_id": tissue_id(sid, tr, tc),
                "split": split,
                "tissue_row": tr,
                "tissue_col": tc,
                "x0_px": tc * config.tissue_px,
                "y0_px": tr * config.tissue_px,
                "x_center_um": (tc + 0.5) * config.tissue_px * ps,
                "y_center_um": (tr + 0.5) * config.tissue_px * ps,
                "n_niches": len(niches),
                "n_cells": len(chunk_rows),
                "total_counts": int(plan.total_counts[chunk_rows].sum()),
            }
        )
    if niche_rc:
        rc = np.concatenate(niche_rc).astype(np.int64)
        ids = [niche_id(sid, r, c) for r, c in rc.tolist()]
        niches_df = pd.DataFrame(
            {
                "key": ids,
                "slide_id": sid,
                "slide_index": np.full(len(rc), plan.slide_index, dtype=np.int32),
                "niche_id": ids,
                "tissue_id": niche_tissue,
                "split": niche_split,
                "niche_row": rc[:, 0].astype(np.int32),
                "niche_col": rc[:, 1].astype(np.int32),
                "grid_row": (rc[:, 0] % tn).astype(np.int32),
                "grid_col": (rc[:, 1] % tn).astype(np.int32),
                "x0_px": rc[:, 1] * config.niche_px,
                "y0_px": rc[:, 0] * config.niche_px,
                "x_center_um": (rc[:, 1] + 0.5) * config.niche_px * ps,
                "y_center_um": (rc[:, 0] + 0.5) * config.niche_px * ps,
                "n_cells": np.concatenate(niche_cells).astype(np.int32),
                "total_counts": np.rint(np.concatenate(niche_totals)).astype(np.int64),
            }
        )
    else:
        niches_df = _empty_niches()
    tissues_df = pd.DataFrame(tissue_rows) if tissue_rows else _empty_tissues()
    tissues_df = tissues_df.astype(
        {"slide_index": np.int32, "tissue_row": np.int32, "tissue_col": np.int32, "n_niches": np.int32, "n_cells": np.int32}
    )
    tissues_df = tissues_df.astype({"x0_px": np.int64, "y0_px": np.int64, "total_counts": np.int64})
    return niches_df, tissues_df


def _as_text(values: np.ndarray) -> np.ndarray:
    """Labels as str (object array), None where missing."""
    values = np.asarray(values, dtype=object)
    missing = pd.isna(values)
    out = values.astype(str).astype(object)
    out[missing] = None
    return out


def _empty_niches() -> pd.DataFrame:
    columns = {
        "key": object, "slide_id": object, "slide_index": np.int32, "niche_id": object, "tissue_id": object,
        "split": object, "niche_row": np.int32, "niche_col": np.int32, "grid_row": np.int32, "grid_col": np.int32,
        "x0_px": np.int64, "y0_px": np.int64, "x_center_um": np.float64, "y_center_um": np.float64,
        "n_cells": np.int32, "total_counts": np.int64,
    }  # fmt: skip
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def _empty_tissues() -> pd.DataFrame:
    columns = {
        "key": object, "slide_id": object, "slide_index": np.int32, "tissue_id": object, "split": object,
        "tissue_row": np.int32, "tissue_col": np.int32, "x0_px": np.int64, "y0_px": np.int64,
        "x_center_um": np.float64, "y_center_um": np.float64, "n_niches": np.int32, "n_cells": np.int32,
        "total_counts": np.int64,
    }  # fmt: skip
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def _ground_truth_file(slide: Any) -> Path | None:
    """The simulator's ground_truth.parquet of a slide read from a bundle that has one."""
    root = getattr(slide, "path", None)
    if root is None or not (Path(root) / GROUND_TRUTH_FILE).is_file():
        return None
    return Path(root) / GROUND_TRUTH_FILE


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------


class _Stores:
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


def _state(config: BuildConfig, seed: int, sources: list[dict[str, Any]], genes: list[str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "seed": int(seed),
        "sources": sources,
        "genes": genes,
    }


def _check_output(out_dir: Path) -> bool:
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


def _prepare_output(out_dir: Path, state: dict[str, Any], interrupted: bool) -> None:
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


def _unique_slide_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for sid in ids:
        if sid in seen:
            seen[sid] += 1
            new = f"{sid}_{seen[sid]}"
            log.warning("two slides are named %r; the later one is renamed %r", sid, new)
            out.append(new)
        else:
            seen[sid] = 1
            out.append(sid)
    return out


def _slide_splits(slide_ids: list[str], config: BuildConfig, seed: int) -> list[int | None]:
    if config.split_mode != "slides":
        return [None] * len(slide_ids)
    fixed = {sid: SPLIT_NAMES.index(split) for sid, split in config.slide_splits.items()}
    unknown = sorted(set(fixed) - set(slide_ids))
    if unknown:
        log.warning("slide_splits names slides that are not being built: %s", unknown)
    free = [sid for sid in slide_ids if sid not in fixed]
    codes = assign_units(len(free), config.split_fractions, np.random.default_rng(int(seed)))
    assigned = {**dict(zip(free, (int(c) for c in codes))), **fixed}
    return [assigned[sid] for sid in slide_ids]


def build_dataset(
    sources: Sequence[str | Path | Any],
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    seed: int = 0,
    workers: int = 0,
    on_chunk_done: Callable[[ChunkDone], None] | None = None,
) -> BuildSummary:
    """Build (or resume) a MIST dataset from Xenium bundles.

    Args:
        sources: Xenium output folders (or `XeniumSlide`-like objects), one per slide.
        out_dir: the dataset directory to write; it must not exist, be empty, or hold an
            interrupted build of the same sources, config and seed (which is then resumed).
        config: `BuildConfig` (default: the `cpu` preset).
        seed: seeds the spatial split; same inputs, config and seed give identical records.
        workers: worker processes rendering chunks (0: render in this process). They are
            started with "spawn", so a script calling this needs the usual
            `if __name__ == "__main__":` guard.
        on_chunk_done: called after every committed chunk (progress hooks, tests).

    Returns:
        `BuildSummary`. Raises `SpatiaError` subclasses for bad inputs or output directories.
    """
    started = time.perf_counter()
    config = config or BuildConfig.cpu()
    out_dir = Path(out_dir)
    if not sources:
        raise InputDataError("no Xenium bundle given", fix="pass at least one bundle folder")
    interrupted = _check_output(out_dir)

    # pass 1: slide IDs, genes and source fingerprints
    first_slide = None
    infos = []
    genes: set[str] = set()
    for k, source in enumerate(sources):
        slide = _load(source)
        genes.update(str(g) for g in slide.gene_names)
        infos.append({"source": _source_label(source), "slide_id": str(slide.slide_id), "files": _fingerprint(slide)})
        if len(sources) == 1:
            first_slide = slide  # reused below instead of read twice (one slide held at a time)
        del slide
    vocabulary_list = sorted(genes)
    vocabulary = {g: i for i, g in enumerate(vocabulary_list)}
    slide_ids = _unique_slide_ids([info["slide_id"] for info in infos])
    state = _state(config, seed, infos, vocabulary_list)
    _prepare_output(out_dir, state, interrupted)
    if interrupted:
        log.info("resuming the interrupted build in %s", out_dir)
    splits = _slide_splits(slide_ids, config, seed)

    stores = _Stores(out_dir, config)
    pool = None
    if workers > 0:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    rendered = resumed = 0
    slide_entries = []
    try:
        with progress() as bar:
            task = bar.add_task("building MIST", total=None)
            totals = {"done": 0, "total": 0}
            for k, source in enumerate(sources):
                done_entry = stores.get(f"slide/{k}")
                if done_entry is not None:
                    entry = json.loads(done_entry)
                    slide_entries.append(entry)
                    totals["done"] += entry["n_chunks"]
                    totals["total"] += entry["n_chunks"]
                    resumed += entry["n_chunks"]
                    bar.update(task, total=totals["total"], completed=totals["done"])
                    continue
                slide = first_slide if k == 0 and first_slide is not None else _load(source)
                first_slide = None
                entry, n_rendered, n_resumed = _build_slide(
                    slide, k, slide_ids[k], infos[k], vocabulary, config, seed, splits[k], stores, out_dir, pool,
                    workers, bar, task, totals, on_chunk_done,
                )  # fmt: skip
                rendered += n_rendered
                resumed += n_resumed
                slide_entries.append(entry)
                stores.put(f"slide/{k}", json.dumps(entry).encode())
                del slide
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        stores.close()

    manifest = _finalise(out_dir, config, seed, vocabulary_list, slide_entries)
    shutil.rmtree(out_dir / BUILD_DIR_NAME, ignore_errors=True)
    summary = BuildSummary(
        path=out_dir,
        n_slides=len(slide_entries),
        n_genes=len(vocabulary_list),
        n_cells=manifest["levels"]["cell"]["n_records"],
        n_niches=manifest["levels"]["niche"]["n_records"],
        n_tissues=manifest["levels"]["tissue"]["n_records"],
        skipped=manifest["skipped"],
        repaired=manifest["repaired"],
        n_clipped=manifest["n_clipped"],
        chunks_rendered=rendered,
        chunks_resumed=resumed,
        seconds=time.perf_counter() - started,
        splits=manifest["splits"],
    )
    log.info(
        "built %s: %d cells, %d niches, %d tissue regions; skipped %s",
        out_dir, summary.n_cells, summary.n_niches, summary.n_tissues, summary.skipped,
    )  # fmt: skip
    return summary


def _build_slide(
    slide, k, slide_id, info, vocabulary, config, seed, split, stores, out_dir, pool, workers, bar, task, totals, on_chunk_done
):
    """Plan, render and commit every chunk of one slide; write its index parts. Returns the
    slide's manifest entry and the numbers of chunks rendered and found already done."""
    staged = stage_slide(slide, vocabulary, out_dir / BUILD_DIR_NAME / "stage" / f"{k:05d}")
    plan = plan_slide(slide, staged, k, slide_id, vocabulary, config, seed, split)
    if not plan.chunks:
        log.warning("slide %s: no cell was kept (see the skipped counts)", slide_id)
    normalisation = estimate_intensity_range(slide.image, config) if plan.chunks else {}
    plan.normalisation = normalisation
    cell_ids = np.asarray(slide.cells.index.astype(str))
    n_genes = len(vocabulary)
    todo = [c for c in plan.chunks if not stores.is_done(f"chunk/{chunk_key(k, *c)}")]
    n_resumed = len(plan.chunks) - len(todo)
    totals["total"] += len(plan.chunks)
    totals["done"] += n_resumed
    bar.update(task, total=totals["total"], completed=totals["done"], description=f"building MIST: {slide_id}")

    def report(keys: list[str]) -> None:
        if not keys:
            return
        write_json(
            out_dir / BUILD_DIR_NAME / "progress.json", {"done": totals["done"] + len(keys), "total": totals["total"]}, overwrite=True
        )
        for key in keys:
            totals["done"] += 1
            bar.update(task, completed=totals["done"])
            if on_chunk_done is not None:
                on_chunk_done(ChunkDone(slide_id, key, totals["done"], totals["total"]))

    def committed(result: ChunkResult) -> None:
        report(stores.add(result))

    def job(c: tuple[int, int]) -> ChunkJob:
        return make_job(plan, slide, staged, cell_ids, c[0], c[1], config, n_genes, normalisation)

    if pool is None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            for c in todo:
                committed(render_chunk(job(c)))
    else:
        pending = set()
        queue = iter(todo)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:
                c = next(queue, None)
                if c is None:
                    exhausted = True
                    break
                pending.add(pool.submit(render_chunk, job(c)))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                committed(future.result())
    report(stores.flush())

    index_dir = out_dir / BUILD_DIR_NAME / "index"
    cell_splits = write_cell_index(plan, slide, config, index_dir / f"{k:05d}_cell.parquet", staged.directory)
    shutil.rmtree(staged.directory, ignore_errors=True)  # the slide's staged tables are no longer needed
    niches_df, tissues_df = region_index_tables(plan, config)
    for level, frame in (("niche", niches_df), ("tissue", tissues_df)):
        part = index_dir / f"{k:05d}_{level}.parquet"
        tmp = part.with_name(part.name + ".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, part)
    release_unused_memory()

    kept = plan.kept
    skipped = {name: int((plan.reason == i + 1).sum()) for i, name in enumerate(SKIP_REASONS)}
    measured = np.unique(plan.gene_columns)
    entry = {
        "slide_id": slide_id,
        "slide_index": k,
        "source": info["source"],
        "source_slide_id": str(slide.slide_id),
        "pixel_size_um": plan.pixel_size_um,
        "image_shape_yx": list(plan.image_shape_yx),
        "image_dtype": str(np.dtype(slide.image.dtype)),
        "n_cells_input": int(len(plan.reason)),
        "n_cells": int(kept.sum()),
        "n_niches": int(len(niches_df)),
        "n_tissues": int(len(tissues_df)),
        "n_chunks": len(plan.chunks),
        "skipped": skipped,
        "repaired": {"self_intersecting_polygon": int(plan.repaired.sum())},
        "scale": plan.scale,
        "normalisation": normalisation,
        "n_genes_measured": int(len(measured)),
        "measured_gene_indices": measured.tolist(),
        "duplicate_gene_symbols": int(len(plan.gene_columns) - len(measured)),
        "cluster_columns": list(slide.cluster_columns),
        "split": None if split is None else SPLIT_NAMES[split],
        "splits": {
            "cell": {name: cell_splits[name] for name in SPLIT_NAMES if name in cell_splits},
            "niche": niches_df["split"].value_counts().to_dict(),
            "tissue": tissues_df["split"].value_counts().to_dict(),
        },
        "source_checksums_sha256": info["files"],
        "reader_problems": [*(getattr(slide, "problems", []) or []), *staged.problems],
    }
    log.info(
        "slide %s: %d of %d cells kept, %d niches, %d tissue regions, scale %.4f (%d clipped)",
        slide_id, entry["n_cells"], entry["n_cells_input"], entry["n_niches"], entry["n_tissues"],
        plan.scale["factor"], plan.scale["n_clipped"],
    )  # fmt: skip
    return entry, len(todo), n_resumed


def _concat_parts(out_dir: Path, level: str, n_slides: int) -> int:
    """Concatenate the per-slide index parts into `<level>_index.parquet` (streamed, one slide
    at a time; columns missing from a slide are null). Returns the number of rows."""
    parts = [out_dir / BUILD_DIR_NAME / "index" / f"{k:05d}_{level}.parquet" for k in range(n_slides)]
    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    target = index_path(out_dir, level)
    tmp = target.with_name(target.name + ".tmp")
    n_rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=INDEX_BATCH_CELLS):
                table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table), type=schema.field(name).type))
                table = table.select(schema.names).cast(schema)
                writer.write_table(table)
                n_rows += len(table)
    os.replace(tmp, target)
    return n_rows


def _finalise(out_dir: Path, config: BuildConfig, seed: int, genes: list[str], slides: list[dict]) -> dict[str, Any]:
    counts = {level: _concat_parts(out_dir, level, len(slides)) for level in LEVELS}
    skipped = {name: sum(s["skipped"][name] for s in slides) for name in SKIP_REASONS}
    repaired = {"self_intersecting_polygon": sum(s["repaired"]["self_intersecting_polygon"] for s in slides)}
    splits: dict[str, dict[str, int]] = {}
    for level in LEVELS:
        merged: dict[str, int] = {}
        for s in slides:
            for name, n in s["splits"][level].items():
                merged[name] = merged.get(name, 0) + int(n)
        splits[level] = {name: merged[name] for name in SPLIT_NAMES if name in merged}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builder_config": config.to_dict(),
        "seed": int(seed),
        "genes": genes,
        "levels": {
            "cell": {"n_records": counts["cell"], "image_px": config.cell_image_px, "has_mask": True},
            "niche": {"n_records": counts["niche"], "image_px": config.niche_image_px, "tile_px": config.niche_px},
            "tissue": {
                "n_records": counts["tissue"],
                "image_px": config.tissue_image_px,
                "tile_px": config.tissue_px,
                "grid": config.tissue_niches,
            },
        },
        "skipped": skipped,
        "repaired": repaired,
        "n_clipped": sum(s["scale"]["n_clipped"] for s in slides),
        "splits": splits,
        "slides": slides,
    }
    write_run_record(out_dir, "build", config, seed)
    write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
