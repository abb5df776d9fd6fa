"""Render jobs: one chunk (an occupied tissue region) with its image window, cells, polygons,
counts, niches and tissue record, ready for `spatia.mist.render.render_chunk` in any process."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spatia.mist.build.ids import cell_key, chunk_key, niche_id, tissue_id
from spatia.mist.build.plan import SlidePlan
from spatia.mist.config import BuildConfig
from spatia.mist.geometry import kernel_radius, source_range
from spatia.mist.render import ChunkJob
from spatia.mist.staging import StagedSlide


def chunk_niches(plan: SlidePlan, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

    niches, cell_niche = chunk_niches(plan, rows)
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
