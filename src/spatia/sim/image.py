"""Image rendering of the simulator: DAPI nuclei, boundary/interior stains, noise, z-stacks.

Pixel convention: image column j covers x in [j, j + 1) px, so its centre is at x_px = j + 0.5,
and x_px = x_um / pixel_size_um (same for rows and y). Canvases are (height, width) arrays.

Nuclei are rendered in batches of small square stamps, vectorised over the batch (a nucleus's
boundary radius comes from a 128-angle table of `nucleus_radius`, linearly interpolated, so the
drawn shape never leaves its bounding circle); each stamp
is written into the canvas by fancy-index assignment of the pixels inside the nucleus's
bounding circle (v1) or inside the cell polygon (v2 cell channels). Bounding circles and cell
polygons of different cells never overlap, so the assignment is exact and order-free, and no
full-canvas operation is done per cell. Blur, background and noise are applied once to the
whole canvas afterwards (noise in row bands).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from spatia.console import track
from spatia.sim.config import SimulationConfig
from spatia.sim.tissue import CellLayout, DomainMap

CHROMATIN_GRAIN_UM = 0.35  # sd of the Gaussian that smooths chromatin texture and spots
SPOT_GAIN = 0.9  # a chromocentre's peak adds this fraction of the nucleus brightness
EDGE_DIMMING = 0.2  # nuclei are this much dimmer at the rim than at the centre
MEMBRANE_WIDTH_UM = 0.5
DEFOCUS_DIMMING = 0.2  # out-of-focus light lost per plane of distance
V2_CHANNELS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")
V2_BACKGROUND = {"DAPI": 1.0, "ATP1A1/CD45/E-Cadherin": 0.7, "18S": 1.3, "AlphaSMA/Vimentin": 0.5}
_STAMP_BATCH = 512
_TABLE_SIZE = 128  # angles of the per-nucleus radius table used for rendering
_TABLE_ANGLES = 2 * np.pi * np.arange(_TABLE_SIZE) / _TABLE_SIZE


@dataclass(frozen=True)
class Canvas:
    """Size of the full-resolution image."""

    height_px: int
    width_px: int
    pixel_size_um: float


@dataclass
class CellStains:
    """Per-cell inputs of the v2 cell channels (n cells).

    angles: (K,) polygon vertex angles; cell_r_um: (n, K) cell boundary radii at those angles.
    membrane, rna, vimentin: per-cell stain levels in image counts.
    """

    angles: np.ndarray
    cell_r_um: np.ndarray
    membrane: np.ndarray
    rna: np.ndarray
    vimentin: np.ndarray


def _polygon_radius(phi: np.ndarray, radii: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Radius of star polygons with vertices at uniform angles 2 pi k / K, along directions `phi`.

    phi: (P,) angles in [0, 2 pi) of pixels belonging to polygon `owner` (P,); radii: (B, K).
    Exact along straight edges: between vertices k and k + 1 (angle step D, t = phi - k D),
    r = r_k r_k+1 sin D / (r_k sin t + r_k+1 sin(D - t)).
    """
    n_vertices = radii.shape[1]
    step = 2 * np.pi / n_vertices
    k = np.minimum((phi / step).astype(np.int64), n_vertices - 1)
    t = phi - k * step
    r0 = radii[owner, k]
    r1 = radii[owner, (k + 1) % n_vertices]
    return r0 * r1 * math.sin(step) / (r0 * np.sin(t) + r1 * np.sin(step - t))


def render_cells(
    layout: CellLayout,
    canvas: Canvas,
    rng_for_batch: Callable[[int], np.random.Generator],
    stains: CellStains | None = None,
    description: str = "rendering nuclei",
) -> dict[str, np.ndarray]:
    """Noise-free signal canvases (float32, (H, W)): "DAPI", plus the v2 channels if `stains`.

    DAPI: each nucleus's shape (see `nucleus_radius`) filled with its intensity, a slight
    rim dimming, a smoothed chromatin texture of relative amplitude `texture`, and
    `spot_count` bright chromocentres. With `stains`: "ATP1A1/CD45/E-Cadherin" is a membrane
    ring along each cell polygon, "18S" the cell interior (dimmer over the nucleus) scaled by
    the cell's RNA level, "AlphaSMA/Vimentin" the cytoplasm of vimentin-positive states.

    Cells are processed in batches of similar size (sorted by reach), each batch in stamps
    just large enough for its largest cell; per-pixel work is done only inside each cell's
    reach (1-D arrays of those pixels). Batch b draws its random numbers from rng_for_batch(b).
    """
    ps = canvas.pixel_size_um
    names = V2_CHANNELS if stains is not None else ("DAPI",)
    out = {name: np.zeros((canvas.height_px, canvas.width_px), np.float32) for name in names}
    n = len(layout)
    if n == 0:
        return out
    reach_um = layout.bounding_um if stains is None else np.maximum(layout.bounding_um, stains.cell_r_um.max(axis=1))
    order = np.argsort(reach_um, kind="stable")
    grain_px = CHROMATIN_GRAIN_UM / ps
    texture_gain = np.float32(math.sqrt(4 * math.pi) * grain_px)  # unit sd after the Gaussian filter
    n_batches = math.ceil(n / _STAMP_BATCH)
    for b in track(range(n_batches), description):
        index = order[b * _STAMP_BATCH : (b + 1) * _STAMP_BATCH]
        rng = rng_for_batch(b)
        m = len(index)
        half = int(math.ceil(float(reach_um[index].max()) / ps)) + 2
        size = 2 * half
        offsets = np.arange(size, dtype=np.int64) - half
        cx = layout.x_um[index] / ps
        cy = layout.y_um[index] / ps
        cols = np.floor(cx).astype(np.int64)[:, None] + offsets[None, :]  # (m, S)
        rows = np.floor(cy).astype(np.int64)[:, None] + offsets[None, :]
        dx = (cols + 0.5 - cx[:, None]).astype(np.float32)  # (m, S)
        dy = (rows + 0.5 - cy[:, None]).astype(np.float32)
        rho2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2  # (m, S, S)
        in_canvas = (
            ((rows >= 0) & (rows < canvas.height_px))[:, :, None] & ((cols >= 0) & (cols < canvas.width_px))[:, None, :]
        )
        reach_px = (reach_um[index] / ps).astype(np.float32)
        # the pixels within each cell's reach, as flat indices into the (m, S, S) stamps
        flat = np.flatnonzero((rho2 <= (reach_px**2)[:, None, None]) & in_canvas)
        bi = flat // (size * size)
        row_of = bi * size + (flat // size) % size  # flat index into (m, S) row arrays
        col_of = bi * size + flat % size
        pdx, pdy = dx.ravel()[col_of], dy.ravel()[row_of]
        rho = np.sqrt(rho2.ravel()[flat])
        phi = np.mod(np.arctan2(pdy, pdx), np.float32(2 * np.pi))  # pixel direction, [0, 2 pi)
        pixel = rows.ravel()[row_of] * canvas.width_px + cols.ravel()[col_of]  # flat canvas index
        # nucleus radius: linear interpolation in a per-cell table of the exact shape
        table = (layout.subset(index).radius_at(_TABLE_ANGLES) / ps).astype(np.float32).ravel()  # (m * T)
        position = phi * np.float32(_TABLE_SIZE / (2 * np.pi))
        k = np.minimum(position.astype(np.int64), _TABLE_SIZE - 1)
        frac = position - k
        r_nuc = table[bi * _TABLE_SIZE + k] * (1 - frac) + table[bi * _TABLE_SIZE + (k + 1) % _TABLE_SIZE] * frac
        coverage = np.clip(r_nuc - rho + 0.5, 0.0, 1.0)

        # chromatin: smoothed white noise plus impulses (chromocentres), one Gaussian filter
        field = rng.standard_normal((m, size, size), dtype=np.float32)
        field *= (layout.texture[index].astype(np.float32) * texture_gain)[:, None, None]
        n_spots = layout.spot_count[index]
        owner = np.repeat(np.arange(m), n_spots)
        if len(owner):
            angle = rng.uniform(0, 2 * np.pi, len(owner))
            dist = 0.7 * (layout.radius_um[index][owner] / ps) * np.sqrt(rng.random(len(owner)))
            sx = np.clip(np.floor(cx[owner] + dist * np.cos(angle)).astype(np.int64) - cols[owner, 0], 0, size - 1)
            sy = np.clip(np.floor(cy[owner] + dist * np.sin(angle)).astype(np.int64) - rows[owner, 0], 0, size - 1)
            np.add.at(field, (owner, sy, sx), np.float32(SPOT_GAIN * 2 * math.pi * grain_px**2))
        ndimage.gaussian_filter(field, (0, grain_px, grain_px), output=field, mode="constant", truncate=3.0)
        profile = 1.0 - EDGE_DIMMING * np.clip(rho / np.maximum(r_nuc, 1e-3), 0.0, 1.0) ** 2
        dapi = (layout.intensity[index].astype(np.float32)[bi] * coverage * profile
                * np.maximum(1.0 + field.ravel()[flat], 0.0))
        nucleus = (rho <= (layout.bounding_um[index] / ps).astype(np.float32)[bi]) & (coverage > 0)
        out["DAPI"].ravel()[pixel[nucleus]] = dapi[nucleus]

        if stains is not None:
            r_cell = _polygon_radius(phi, (stains.cell_r_um[index] / ps).astype(np.float32), bi)
            in_cell = rho <= r_cell
            cell_pixel = pixel[in_cell]
            owner_px = bi[in_cell]
            membrane = stains.membrane[index].astype(np.float32)[owner_px] * np.exp(
                -(((r_cell[in_cell] - rho[in_cell]) / np.float32(MEMBRANE_WIDTH_UM / ps)) ** 2)
            )
            out["ATP1A1/CD45/E-Cadherin"].ravel()[cell_pixel] = membrane
            speckle = rng.standard_normal((m, size, size), dtype=np.float32)
            ndimage.gaussian_filter(speckle, (0, 1.5, 1.5), output=speckle, mode="constant")
            speckle_px = 1.0 + 0.25 * np.float32(math.sqrt(4 * math.pi) * 1.5) * speckle.ravel()[flat[in_cell]]
            cover = coverage[in_cell]
            cytoplasm = (1.0 - cover) * np.maximum(speckle_px, 0.0)
            out["18S"].ravel()[cell_pixel] = stains.rna[index].astype(np.float32)[owner_px] * (cytoplasm + 0.3 * cover)
            out["AlphaSMA/Vimentin"].ravel()[cell_pixel] = (
                stains.vimentin[index].astype(np.float32)[owner_px] * cytoplasm
            )
    return out


def background_grid(domain_map: DomainMap, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(ny, nx) tissue autofluorescence on the domain grid: per-domain level, smoothed, with a
    gentle +-10% low-frequency illumination variation."""
    grid = levels[domain_map.labels].astype(np.float64)
    grid = ndimage.gaussian_filter(grid, 1.5, mode="nearest")
    shade = ndimage.gaussian_filter(rng.standard_normal(grid.shape), max(grid.shape) / 6, mode="reflect")
    shade = shade / (np.abs(shade).max() + 1e-12)
    return (grid * (1.0 + 0.1 * shade)).astype(np.float32)


def _linear_weights(n_out: int, n_grid: int, grid_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Index of the lower grid cell and weight of the upper one for each output pixel."""
    g = (np.arange(n_out) + 0.5) / grid_px - 0.5
    i0 = np.clip(np.floor(g).astype(np.int64), 0, n_grid - 2)
    w = np.clip(g - i0, 0.0, 1.0).astype(np.float32)
    return i0, w


def finish_channel(
    signal: np.ndarray,
    background: np.ndarray,
    grid_um: float,
    canvas: Canvas,
    config: SimulationConfig,
    rng_for_band: Callable[[int], np.random.Generator],
    band_rows: int = 1024,
) -> np.ndarray:
    """uint16 image = blur(signal) + bilinear(background) + noise, clipped to 0..65535.

    Noise is Gaussian with variance read_noise^2 + shot_noise_gain * (signal + background).
    `signal` is blurred in place. Work is done in bands of `band_rows` rows.
    """
    if config.blur_sigma_px > 0:
        ndimage.gaussian_filter(signal, config.blur_sigma_px, output=signal, mode="nearest")
    grid_px = grid_um / canvas.pixel_size_um
    ny, nx = background.shape
    xi0, xw = _linear_weights(canvas.width_px, nx, grid_px)
    along_x = background[:, xi0] * (1 - xw) + background[:, xi0 + 1] * xw  # (ny, W)
    yi0, yw = _linear_weights(canvas.height_px, ny, grid_px)
    out = np.empty(signal.shape, np.uint16)
    for band, start in enumerate(range(0, canvas.height_px, band_rows)):
        stop = min(start + band_rows, canvas.height_px)
        w = yw[start:stop, None]
        level = signal[start:stop] + along_x[yi0[start:stop]] * (1 - w) + along_x[yi0[start:stop] + 1] * w
        sd = np.sqrt(config.read_noise**2 + config.shot_noise_gain * np.maximum(level, 0.0))
        noise = rng_for_band(band).standard_normal(level.shape, dtype=np.float32)
        out[start:stop] = np.clip(np.rint(level + sd * noise), 0, 65535).astype(np.uint16)
    return out


def focal_plane_map(layout: CellLayout, focal_plane: np.ndarray, canvas: Canvas, step_px: int = 4) -> np.ndarray:
    """(H, W) int16 focal plane of each pixel: that of the nearest nucleus centre (coarse grid)."""
    ny, nx = math.ceil(canvas.height_px / step_px), math.ceil(canvas.width_px / step_px)
    gy, gx = np.meshgrid((np.arange(ny) + 0.5) * step_px, (np.arange(nx) + 0.5) * step_px, indexing="ij")
    tree = cKDTree(np.column_stack([layout.x_um, layout.y_um]) / canvas.pixel_size_um)
    _, nearest = tree.query(np.column_stack([gx.ravel(), gy.ravel()]))
    coarse = focal_plane[nearest].reshape(ny, nx).astype(np.int16)
    full = np.repeat(np.repeat(coarse, step_px, axis=0), step_px, axis=1)
    return full[: canvas.height_px, : canvas.width_px]


def render_zstack(focus: np.ndarray, plane_map: np.ndarray, n_planes: int, defocus_sigma_px: float) -> np.ndarray:
    """(Z, H, W) uint16 z-stack whose maximum projection is exactly `focus`.

    A pixel is in focus (equal to `focus`) in its own plane `plane_map`; d planes away it is
    min(focus, blur_d(focus) * (1 - DEFOCUS_DIMMING * d)), blur_d a Gaussian of sd d * defocus_sigma_px.
    """
    base = focus.astype(np.float32)
    blurred = [None] + [
        np.minimum(base, ndimage.gaussian_filter(base, max(d * defocus_sigma_px, 1e-3), mode="nearest")
                   * max(0.0, 1.0 - DEFOCUS_DIMMING * d))
        for d in range(1, n_planes)
    ]
    stack = np.empty((n_planes,) + focus.shape, np.uint16)
    for k in range(n_planes):
        distance = np.abs(plane_map.astype(np.int64) - k)
        plane = base.copy()
        for d in range(1, n_planes):
            mask = distance == d
            plane[mask] = blurred[d][mask]
        stack[k] = np.clip(np.rint(plane), 0, 65535).astype(np.uint16)
    return stack
