"""Planning one slide before any pixel is rendered: kept cells and why not, polygon repairs,
crop geometry and the global scale, the intensity range, the niche / tissue grids and the split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from spatia.keys import BUFFER, SPLIT_CODES, TRAIN
from spatia.mist.config import BuildConfig
from spatia.mist.geometry import (
    ZERO_AREA_PX2,
    PolygonStats,
    crop_starts,
    invalid_polygons,
    polygon_stats,
    repair_polygon,
)
from spatia.mist.splits import block_split_grid, buffer_cells, slide_rng
from spatia.mist.staging import StagedSlide

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
    cell_split: np.ndarray  # int8 codes (spatia.keys.SPLIT_CODES)
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
    cell_split = np.full(n, SPLIT_CODES[TRAIN], dtype=np.int8)
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
        cell_split[kept_rows[buffer]] = SPLIT_CODES[BUFFER]

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
