"""Vectorised geometry for the MIST builder: polygon statistics, repair, masks, crops, resizing.

Frames: the slide frame is full-resolution pixels, x = column, y = row, origin at the top-left
corner of pixel (0, 0); pixel (r, c) covers [c, c+1) x [r, r+1), so its centre is at
(c + 0.5, r + 0.5). A polygon in micrometres maps to this frame by dividing by `pixel_size_um`.

The slide's scaled grid: with the slide's global scale factor f (output px per slide px),
scaled-grid pixel (v, u) has its centre at slide point ((u + 0.5) / f, (v + 0.5) / f). A cell
crop is the S x S block of the scaled grid whose top-left pixel is `crop_starts(centre, f, S)`
(the centre of the cell's bounding square, to the nearest grid pixel); its pixel (i, j) centre
is at slide point ((u0 + j + 0.5) / f, (v0 + i + 0.5) / f). That is the paper's "crop the
minimal square, resize by the global factor, pad to S" done as one resampling of each chunk.

Ragged polygons are stored as `offsets` (n+1,) int64 into `vertices` (V, 2) float64 (x, y);
polygon i is `vertices[offsets[i]:offsets[i+1]]`, closed or not (the closing edge is implied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import shapely

ZERO_AREA_PX2 = 1e-6


def vertex_owner(offsets: np.ndarray) -> np.ndarray:
    """Polygon index of every vertex: int64 (V,)."""
    counts = np.diff(offsets)
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def next_vertex_index(offsets: np.ndarray) -> np.ndarray:
    """For every vertex, the index of the next vertex of its polygon (wrapping): int64 (V,)."""
    n_vertices = int(offsets[-1])
    nxt = np.arange(1, n_vertices + 1, dtype=np.int64)
    counts = np.diff(offsets)
    nonempty = counts > 0
    last = offsets[1:][nonempty] - 1
    nxt[last] = offsets[:-1][nonempty]
    return nxt


@dataclass(frozen=True)
class PolygonStats:
    """Per-polygon statistics, all (n,) arrays; NaN where a polygon has no vertices.

    `bbox_px` (n, 4) float64 is (x_min, y_min, x_max, y_max); `area_px2` is the shoelace area;
    `n_distinct` counts vertices excluding a repeated closing vertex.
    """

    bbox_px: np.ndarray
    area_px2: np.ndarray
    n_distinct: np.ndarray

    @property
    def side_px(self) -> np.ndarray:
        """Side of the minimal axis-aligned square containing each polygon."""
        return np.maximum(self.bbox_px[:, 2] - self.bbox_px[:, 0], self.bbox_px[:, 3] - self.bbox_px[:, 1])

    @property
    def center_px(self) -> np.ndarray:
        """Centre of each bounding box: float64 (n, 2) x, y."""
        return np.stack(
            [(self.bbox_px[:, 0] + self.bbox_px[:, 2]) / 2, (self.bbox_px[:, 1] + self.bbox_px[:, 3]) / 2], axis=1
        )


def polygon_stats(offsets: np.ndarray, vertices: np.ndarray) -> PolygonStats:
    """Bounding boxes, areas and distinct-vertex counts of ragged polygons (vectorised)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    vertices = np.asarray(vertices, dtype=np.float64)
    n = len(offsets) - 1
    counts = np.diff(offsets)
    nonempty = counts > 0
    bbox = np.full((n, 4), np.nan)
    area = np.full(n, np.nan)
    n_distinct = counts.copy()
    if nonempty.any():
        starts = offsets[:-1][nonempty]
        bbox[nonempty, 0] = np.minimum.reduceat(vertices[:, 0], starts)
        bbox[nonempty, 1] = np.minimum.reduceat(vertices[:, 1], starts)
        bbox[nonempty, 2] = np.maximum.reduceat(vertices[:, 0], starts)
        bbox[nonempty, 3] = np.maximum.reduceat(vertices[:, 1], starts)
        nxt = next_vertex_index(offsets)
        x, y = vertices[:, 0], vertices[:, 1]
        cross = x * y[nxt] - x[nxt] * y
        area = np.abs(np.bincount(vertex_owner(offsets), weights=cross, minlength=n)) / 2
        area[~nonempty] = np.nan
        last = offsets[1:][nonempty] - 1
        closed = np.all(vertices[starts] == vertices[last], axis=1) & (counts[nonempty] > 1)
        n_distinct[nonempty] -= closed.astype(np.int64)
    return PolygonStats(bbox_px=bbox, area_px2=area, n_distinct=n_distinct)


def invalid_polygons(offsets: np.ndarray, vertices: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Which of `candidates` (indices of polygons with >= 3 distinct vertices) are not valid
    simple polygons (self-intersections, spikes) according to GEOS: bool (len(candidates),)."""
    if len(candidates) == 0:
        return np.zeros(0, dtype=bool)
    starts, ends = offsets[candidates], offsets[candidates + 1]
    lengths = ends - starts
    idx = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(int(lengths.sum()))
    owner = np.repeat(np.arange(len(candidates)), lengths)
    rings = shapely.linearrings(vertices[idx], indices=owner)
    return ~shapely.is_valid(shapely.polygons(rings))


def repair_polygon(vertices: np.ndarray) -> np.ndarray | None:
    """Repair one invalid polygon: `shapely.make_valid`, keep the largest polygonal piece, drop
    holes. Returns its exterior ring (k, 2) float64 (closed), or None when nothing of positive
    area remains."""
    geometry = shapely.make_valid(shapely.Polygon(vertices))
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, shapely.Polygon)]
    parts += [
        p
        for g in getattr(geometry, "geoms", [])
        if isinstance(g, shapely.MultiPolygon)
        for p in g.geoms
    ]
    parts = [p for p in parts if p.area > ZERO_AREA_PX2]
    if not parts:
        return None
    largest = max(parts, key=lambda p: p.area)
    return np.asarray(largest.exterior.coords, dtype=np.float64)


def rasterize_polygons(offsets: np.ndarray, vertices: np.ndarray, size: int) -> np.ndarray:
    """Even-odd fill of ragged polygons, each in its own `size x size` frame: bool (n, size, size).

    `vertices` are in output-pixel coordinates (pixel (i, j) centre at (j + 0.5, i + 0.5)); a
    pixel is inside when its centre is. Vectorised scanline: every edge is expanded over the
    pixel rows whose centre line it crosses; a crossing left of pixel j's centre flips the
    parity of pixels j, j+1, ... of that row. Rows are held as bit words, so each crossing is one
    XOR of a suffix bit mask, and the words are unpacked to booleans at the end.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    n_words = (size + 63) // 64
    if n == 0:
        return np.zeros((0, size, size), dtype=bool)
    vertices = np.asarray(vertices, dtype=np.float64)
    nxt = next_vertex_index(offsets)
    owner = vertex_owner(offsets)
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = x0[nxt], y0[nxt]
    y_lo, y_hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows i whose centre line y = i + 0.5 satisfies y_lo <= y < y_hi (half-open: each vertex once)
    row_start = np.clip(np.ceil(y_lo - 0.5), 0, size).astype(np.int64)
    row_end = np.clip(np.ceil(y_hi - 0.5), 0, size).astype(np.int64)
    n_rows = np.maximum(row_end - row_start, 0)
    words = np.zeros((n * size, n_words), dtype="<u8")
    edge = np.repeat(np.arange(len(x0)), n_rows)
    if len(edge):
        row = row_start[edge] + (np.arange(len(edge)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows))
        t = (row + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
        x_cross = x0[edge] + t * (x1[edge] - x0[edge])
        # first pixel whose centre lies right of the crossing
        col = np.clip(np.floor(x_cross - 0.5).astype(np.int64) + 1, 0, size)
        keep = col < size
        flat = np.sort((owner[edge][keep] * size + row[keep]) * size + col[keep])
        if len(flat):
            # crossings landing on the same pixel cancel in pairs: keep odd multiplicities
            run_start = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
            run_length = np.diff(np.r_[run_start, len(flat)])
            flat = flat[run_start[run_length % 2 == 1]]
        if len(flat):
            line, col = flat // size, flat % size
            group = np.r_[0, np.flatnonzero(line[1:] != line[:-1]) + 1]
            word_of_col, bit = col // 64, (col % 64).astype(np.uint64)
            full = np.uint64(0xFFFFFFFFFFFFFFFF)
            for w in range(n_words):
                # XOR of the suffix masks of every crossing of the row = its parity bits
                value = np.where(word_of_col == w, full << bit, np.where(word_of_col < w, full, np.uint64(0)))
                words[line[group], w] = np.bitwise_xor.reduceat(value, group)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(n, size, n_words * 64)
    return np.ascontiguousarray(bits[:, :, :size]).view(bool)


def kernel_radius(scale: float) -> float:
    """Radius (source px) of the triangle kernel used to resample at `scale` output px per
    source px: 1 when upsampling (bilinear), 1/scale when downsampling (area-like)."""
    return max(1.0, 1.0 / scale)


def grid_weights(n_out: int, out_start: int, scale: float, in_start: int, n_in: int) -> sp.csr_matrix:
    """Sparse resampling weights from source pixels to a scaled pixel grid: CSR float32
    (n_out, n_in).

    Output pixel u (rows hold u = out_start .. out_start + n_out - 1) has its centre at source
    coordinate (u + 0.5) / scale; source pixel q (columns hold q = in_start .. in_start + n_in -
    1) has its centre at q + 0.5. Weights are a triangle kernel of radius `kernel_radius(scale)`,
    normalised to sum to 1 over the taps inside the columns: bilinear interpolation when
    upsampling, anti-aliased (area-like) averaging when downsampling. This is the rule of PIL and
    of torch's `interpolate(..., antialias=True)`.
    """
    radius = kernel_radius(scale)
    centres = (out_start + np.arange(n_out, dtype=np.float64) + 0.5) / scale
    first = np.ceil(centres - radius - 0.5).astype(np.int64)
    n_taps = int(np.floor(2 * radius)) + 2
    cols = first[:, None] + np.arange(n_taps)[None, :]
    weights = np.clip(1.0 - np.abs(cols + 0.5 - centres[:, None]) / radius, 0.0, None)
    local = cols - in_start
    weights[(local < 0) | (local >= n_in)] = 0.0
    sums = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, sums, out=np.zeros_like(weights), where=sums > 0)
    keep = weights > 0
    rows = np.broadcast_to(np.arange(n_out)[:, None], cols.shape)
    return sp.csr_matrix(
        (weights[keep].astype(np.float32), (rows[keep], local[keep])), shape=(n_out, n_in), dtype=np.float32
    )


def source_range(out_start, out_stop, scale: float):
    """Source pixels [lo, hi) that scaled-grid pixels [out_start, out_stop) read (ints or
    int64 arrays, element-wise)."""
    radius = kernel_radius(scale)
    lo = np.ceil((np.asarray(out_start) + 0.5) / scale - radius - 0.5).astype(np.int64)
    hi = np.floor((np.asarray(out_stop) - 0.5) / scale + radius - 0.5).astype(np.int64) + 1
    if lo.ndim == 0:
        return int(lo), int(hi)
    return lo, hi


def resample_grid(
    image: np.ndarray, in_origin_xy: tuple[int, int], scale: float, out_origin_xy: tuple[int, int], out_shape_yx: tuple[int, int]
) -> np.ndarray:
    """Resample a window of the slide onto the slide's scaled grid: float32 `out_shape_yx`.

    `image` (H, W) float holds source pixels starting at `in_origin_xy` (x, y); the result holds
    scaled-grid pixels starting at `out_origin_xy`. Separable: one sparse pass per axis.
    """
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    wy = grid_weights(out_shape_yx[0], out_origin_xy[1], scale, in_origin_xy[1], h)
    wx = grid_weights(out_shape_yx[1], out_origin_xy[0], scale, in_origin_xy[0], w)
    rows = wy @ image  # (out_h, W)
    return np.ascontiguousarray((wx @ rows.T).T, dtype=np.float32)


def crop_starts(centers_xy: np.ndarray, scale: float, size: int) -> np.ndarray:
    """Top-left scaled-grid pixel of the S x S crop centred (to the nearest grid pixel) on each
    source point: int64 (n, 2) (x, y)."""
    return np.floor(np.asarray(centers_xy, dtype=np.float64) * scale - size / 2.0 + 0.5).astype(np.int64)


def cut_crops(grid_image: np.ndarray, starts_local_xy: np.ndarray, size: int) -> np.ndarray:
    """Copy S x S squares out of a resampled window at local top-left `starts_local_xy` (n, 2):
    float32 (n, S, S). Every square must lie inside `grid_image`."""
    starts = np.asarray(starts_local_xy, dtype=np.int64).reshape(-1, 2)
    view = np.lib.stride_tricks.sliding_window_view(grid_image, (size, size))
    return np.ascontiguousarray(view[starts[:, 1], starts[:, 0]], dtype=np.float32)
