"""Turn one spatial chunk (a tissue region) into encoded MIST records.

This is the CPU-heavy part of a build and the only part that runs in worker processes: it
receives plain arrays (the raw image window, crop centres, polygons, counts) and returns
encoded records. It never touches files, so a chunk renders to the same bytes wherever and
whenever it runs (BLAS is held to one thread while rendering for that reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from spatia.mist.geometry import cut_crops, rasterize_polygons, resample_grid
from spatia.mist.store import encode_records


@dataclass
class ChunkJob:
    """Everything needed to render one tissue region of one slide.

    Frames are full-resolution slide pixels unless stated. Shapes: n cells, k niches.

    window: raw image (Hw, Ww) of the slide's dtype, top-left at `window_origin_xy`.
    norm_low, norm_high: intensities mapped to 0 and 255.
    scale: cell crop scale factor (output px per slide px).
    cell_keys: n LMDB keys; crop_starts int64 (n, 2): top-left (x, y) of every crop on the
        slide's scaled grid (see `spatia.mist.geometry`).
    poly_offsets int64 (n+1,), poly_vertices_px float64 (V, 2): cell polygons.
    counts_indptr int64 (n+1,), counts_indices uint32 (nnz,), counts_values uint32 (nnz,):
        CSR rows of raw counts in gene-vocabulary order (indices ascending within a row).
    outlier_rows: int64 (m,) cells whose crop reads source pixels outside `window`;
        outlier_windows: m raw windows holding those pixels, top-left at `outlier_origins_xy`.
    cell_niche: int64 (n,) local niche index of every cell.
    niche_keys: k keys; niche_rc int64 (k, 2) global niche grid (row, col); niche_meta: k dicts.
    region_origin_xy: top-left of the tissue region (slide px); tissue_key, tissue_meta.
    """

    chunk_key: str
    window: np.ndarray
    window_origin_xy: tuple[int, int]
    norm_low: float
    norm_high: float
    scale: float
    cell_image_px: int
    niche_px: int
    niche_image_px: int
    tissue_niches: int
    tissue_image_px: int
    codec: str
    n_genes: int
    cell_keys: list[str]
    crop_starts: np.ndarray
    poly_offsets: np.ndarray
    poly_vertices_px: np.ndarray
    counts_indptr: np.ndarray
    counts_indices: np.ndarray
    counts_values: np.ndarray
    outlier_rows: np.ndarray
    outlier_windows: list[np.ndarray]
    outlier_origins_xy: np.ndarray
    cell_niche: np.ndarray
    niche_keys: list[str]
    niche_rc: np.ndarray
    niche_meta: list[dict]
    region_origin_xy: tuple[int, int]
    tissue_key: str
    tissue_meta: dict


@dataclass
class ChunkResult:
    """Encoded records of one chunk: lists of (key, value) per level."""

    chunk_key: str
    cells: list[tuple[bytes, bytes]]
    niches: list[tuple[bytes, bytes]]
    tissues: list[tuple[bytes, bytes]]


def normalise(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map intensities linearly so that `low` -> 0 and `high` -> 255, clipped: float32."""
    out = raw.astype(np.float32)
    out -= np.float32(low)
    out *= np.float32(255.0 / (high - low))
    np.clip(out, 0.0, 255.0, out=out)
    return out


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round float intensities in [0, 255] to uint8 (in place on `values`). Inputs are convex
    combinations of clipped intensities, so only rounding noise can leave the range."""
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def crop_masks(job: ChunkJob) -> np.ndarray:
    """Polygon masks in the crop frame: bool (n, S, S)."""
    owner = np.repeat(np.arange(len(job.cell_keys)), np.diff(job.poly_offsets))
    local = job.poly_vertices_px * job.scale - job.crop_starts[owner]
    return rasterize_polygons(job.poly_offsets, local, job.cell_image_px)


def crop_images(job: ChunkJob, window: np.ndarray) -> np.ndarray:
    """Cell crops cut from the chunk window resampled onto the slide's scaled grid (outlier
    cells from their own windows): float32 (n, S, S)."""
    size, n = job.cell_image_px, len(job.cell_keys)
    inside = np.ones(n, dtype=bool)
    inside[job.outlier_rows] = False
    starts = job.crop_starts[inside]
    if len(starts):
        u0, v0 = starts.min(axis=0)
        u1, v1 = starts.max(axis=0) + size
        grid = resample_grid(window, job.window_origin_xy, job.scale, (int(u0), int(v0)), (int(v1 - v0), int(u1 - u0)))
        cut = cut_crops(grid, starts - np.array([u0, v0]), size)
    else:
        cut = np.zeros((0, size, size), dtype=np.float32)
    if len(job.outlier_rows) == 0:
        return cut
    crops = np.empty((n, size, size), dtype=np.float32)
    crops[inside] = cut
    for row, raw, origin in zip(job.outlier_rows, job.outlier_windows, job.outlier_origins_xy):
        start = job.crop_starts[row]
        own = normalise(raw, job.norm_low, job.norm_high)
        crops[row] = resample_grid(own, (int(origin[0]), int(origin[1])), job.scale, (int(start[0]), int(start[1])), (size, size))
    return crops


def render_chunk(job: ChunkJob) -> ChunkResult:
    """Render and encode every cell, niche and the tissue record of one chunk."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _render(job)


def _render(job: ChunkJob) -> ChunkResult:
    window = normalise(job.window, job.norm_low, job.norm_high)
    n = len(job.cell_keys)

    # cells: masked crops + masks + counts
    images = to_uint8(crop_images(job, window))
    masks = crop_masks(job)
    images[~masks] = 0
    indptr = job.counts_indptr
    values = encode_records("cell", images, masks, indptr, job.counts_indices, job.counts_values, codec=job.codec)
    cells = [(key.encode(), value) for key, value in zip(job.cell_keys, values)]

    # niches: the region resampled once at niche_image_px / niche_px, cut into niche blocks
    k = len(job.niche_keys)
    counts = sp.csr_matrix((job.counts_values.astype(np.int64), job.counts_indices, indptr), shape=(n, job.n_genes))
    membership = sp.csr_matrix((np.ones(n, dtype=np.int64), (job.cell_niche, np.arange(n))), shape=(k, n))
    niche_sums = sp.csr_matrix(membership @ counts)
    niche_indptr, niche_indices, niche_values = _canonical(niche_sums)
    rx, ry = job.region_origin_xy
    npx, tn, sn = job.niche_px, job.tissue_niches, job.niche_image_px
    row0, col0 = ry // npx, rx // npx
    grid = resample_grid(window, job.window_origin_xy, sn / npx, (col0 * sn, row0 * sn), (tn * sn, tn * sn))
    local = job.niche_rc - np.array([row0, col0])
    niche_images = to_uint8(cut_crops(grid, local[:, ::-1] * sn, sn))
    values = encode_records(
        "niche", niche_images, None, niche_indptr, niche_indices, niche_values, job.niche_meta, codec=job.codec
    )
    niches = [(key.encode(), value) for key, value in zip(job.niche_keys, values)]

    # tissue region: the region resampled at tissue_image_px / (tissue_niches * niche_px)
    st = job.tissue_image_px
    side = npx * tn
    tissue_image = to_uint8(resample_grid(window, job.window_origin_xy, st / side, (rx // side * st, ry // side * st), (st, st)))
    tissue_indptr, tissue_indices, tissue_values = _canonical(sp.csr_matrix(niche_sums.sum(axis=0)))
    values = encode_records(
        "tissue", tissue_image[None], None, tissue_indptr, tissue_indices, tissue_values, [job.tissue_meta], codec=job.codec
    )
    return ChunkResult(job.chunk_key, cells, niches, [(job.tissue_key.encode(), values[0])])


def _canonical(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed counts as canonical CSR arrays: indptr int64, indices uint32 (ascending within
    each row, explicit zeros dropped) and values uint32."""
    matrix = sp.csr_matrix(matrix, copy=True)
    matrix.eliminate_zeros()
    matrix.sort_indices()
    if matrix.nnz and matrix.data.max() > np.iinfo(np.uint32).max:
        raise OverflowError("a summed count exceeds 2**32 - 1")
    return matrix.indptr.astype(np.int64), matrix.indices.astype(np.uint32), matrix.data.astype(np.uint32)
