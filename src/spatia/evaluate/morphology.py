"""CellProfiler-style morphology features of cell crops: size, shape, intensity, texture.

`morphology_features(images, masks)` measures every cell of a batch of square crops at once
(numpy over the whole batch, in chunks of `batch_size` cells); only the convex hull used for
solidity is computed per cell (scipy's Qhull on the corners of the mask's boundary pixels).

Definitions follow scikit-image's `regionprops` / `perimeter` / `graycoprops` so that a
feature can be checked against the reference implementation:

- shape (from the mask, in pixels of the crop): ``area_px``, ``perimeter_px`` (skimage's
  4-connectivity weighted perimeter), ``major_axis_px`` / ``minor_axis_px`` (4 sqrt of the
  eigenvalues of the pixel-coordinate covariance), ``eccentricity``, ``extent`` (area /
  bounding-box area), ``solidity`` (area / area of the convex hull of the mask's pixel
  squares; skimage counts the pixel centres inside its hull instead, which reads up to a few
  hundredths higher on small cells), ``form_factor`` (4 pi area / perimeter^2), ``equivalent_diameter_px``.
- intensity (per channel, pixels inside the mask, raw uint8 values): ``mean``, ``std``,
  ``min``, ``max``, ``q10``, ``q25``, ``median``, ``q75``, ``q90`` (linear interpolation as
  `numpy.quantile`), ``integrated`` (sum), ``edge_mean`` (mean over the mask's boundary
  pixels), ``mass_displacement_px`` (distance between the intensity-weighted and the plain
  centroid).
- texture (per channel): Haralick-style statistics of the symmetric, normalised grey-level
  co-occurrence matrix of the pixels inside the mask (intensity quantised to `levels` grey
  levels as ``value * levels // 256``; a pair counts only if both pixels are in the mask),
  for each distance in `distances`, averaged over the angles 0, 45, 90 and 135 degrees
  (skimage's `graycomatrix` offsets, so the diagonal step is round(d / sqrt 2) pixels):
  ``contrast``, ``dissimilarity``, ``homogeneity``, ``energy``, ``correlation``, ``entropy``
  (natural log).

A cell with an empty mask gets NaN in every feature; a cell too small for any co-occurring
pair at a distance gets NaN in that distance's texture features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from spatia.errors import InputDataError

SHAPE_FEATURES = (
    "area_px", "perimeter_px", "major_axis_px", "minor_axis_px", "eccentricity", "extent",
    "solidity", "form_factor", "equivalent_diameter_px",
)
INTENSITY_FEATURES = (
    "mean", "std", "min", "max", "q10", "q25", "median", "q75", "q90", "integrated", "edge_mean",
    "mass_displacement_px",
)
TEXTURE_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")
_QUANTILES = {"q10": 0.10, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.90}
_STREL_4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_PERIMETER_KERNEL = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], dtype=np.int32)
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0


def morphology_features(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    channel_names: Sequence[str] | None = None,
    levels: int = 32,
    distances: Sequence[int] = (1, 3),
    batch_size: int = 512,
    index: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Morphology features of N cell crops.

    Args:
        images: uint8 (N, S, S) single-channel crops, or (N, C, S, S) channel-first crops.
        masks: bool (N, S, S), True on the cell's pixels (e.g. its rasterised polygon).
        channel_names: names of the C channels (default ``ch0``, ``ch1``, ...); single-channel
            crops get unprefixed intensity/texture names.
        levels: grey levels of the co-occurrence matrix (2..256).
        distances: pixel distances of the co-occurrence matrix.
        batch_size: cells measured together (memory grows as batch_size * S * S * 8 bytes).
        index: optional row labels (cell IDs).

    Returns:
        DataFrame (N, F) of float64 features; columns are SHAPE_FEATURES, then per channel the
        INTENSITY_FEATURES and ``glcm_<prop>_d<distance>`` texture features.
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim == 3:
        images4 = images[:, None]
        prefixes = [""]
    elif images.ndim == 4:
        images4 = images
        names = list(channel_names) if channel_names is not None else [f"ch{c}" for c in range(images.shape[1])]
        if len(names) != images.shape[1]:
            raise InputDataError(f"{len(names)} channel names for {images.shape[1]} image channels",
                                 fix="give one name per channel")
        prefixes = [f"{name}_" for name in names]
    else:
        raise InputDataError(f"crop images must have shape (N, S, S) or (N, C, S, S); got {images.shape}",
                             fix="pass square uint8 crops, one per cell")
    if images.dtype != np.uint8:
        raise InputDataError(f"crop images must be uint8; got {images.dtype}",
                             fix="rescale the crops to uint8 (0-255) as the MIST builder writes them")
    if masks.shape != (images4.shape[0], images4.shape[2], images4.shape[3]):
        raise InputDataError(f"masks shape {masks.shape} does not match the images {images.shape}",
                             fix="pass one (S, S) boolean mask per crop")
    if not 2 <= levels <= 256:
        raise InputDataError(f"levels must be in 2..256; got {levels}", fix="use e.g. levels=32")
    masks = masks.astype(bool, copy=False)

    columns = list(SHAPE_FEATURES)
    for prefix in prefixes:
        columns += [prefix + name for name in INTENSITY_FEATURES]
        columns += [f"{prefix}glcm_{prop}_d{d}" for d in distances for prop in TEXTURE_PROPS]
    n = images4.shape[0]
    out = np.full((n, len(columns)), np.nan, dtype=np.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        m = masks[start:stop]
        blocks = [_shape_block(m)]
        border = _border(m)
        for c in range(images4.shape[1]):
            img = images4[start:stop, c]
            blocks.append(_intensity_block(img, m, border))
            blocks.append(_texture_block(img, m, levels, distances))
        out[start:stop] = np.concatenate(blocks, axis=1)
    empty = masks.reshape(n, -1).sum(axis=1) == 0
    out[empty] = np.nan
    return pd.DataFrame(out, columns=columns, index=None if index is None else pd.Index(index, dtype=str))


def _border(m: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (skimage's perimeter border)."""
    eroded = ndi.binary_erosion(m, structure=_STREL_4[None], border_value=0)
    return m & ~eroded


def _shape_block(m: np.ndarray) -> np.ndarray:
    b, s, _ = m.shape
    mf = m.astype(np.float64)
    area = mf.sum(axis=(1, 2))
    safe = np.maximum(area, 1.0)
    rr = np.arange(s, dtype=np.float64)
    r_mean = (mf.sum(axis=2) @ rr) / safe
    c_mean = (mf.sum(axis=1) @ rr) / safe
    dr = rr[None, :, None] - r_mean[:, None, None]
    dc = rr[None, None, :] - c_mean[:, None, None]
    mu20 = (mf * dr * dr).sum(axis=(1, 2)) / safe
    mu02 = (mf * dc * dc).sum(axis=(1, 2)) / safe
    mu11 = (mf * dr * dc).sum(axis=(1, 2)) / safe
    half_trace = (mu20 + mu02) / 2.0
    root = np.sqrt(np.maximum(((mu20 - mu02) / 2.0) ** 2 + mu11**2, 0.0))
    l1 = half_trace + root
    l2 = np.maximum(half_trace - root, 0.0)
    major = 4.0 * np.sqrt(l1)
    minor = 4.0 * np.sqrt(l2)
    eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / np.where(l1 > 0, l1, 1.0), 0.0, 1.0)), 0.0)

    rows_any, cols_any = m.any(axis=2), m.any(axis=1)
    height = np.where(rows_any.any(axis=1), s - np.argmax(rows_any[:, ::-1], axis=1) - np.argmax(rows_any, axis=1), 0)
    width = np.where(cols_any.any(axis=1), s - np.argmax(cols_any[:, ::-1], axis=1) - np.argmax(cols_any, axis=1), 0)
    extent = area / np.maximum(height * width, 1)

    border = _border(m).astype(np.int32)
    codes = ndi.convolve(border, _PERIMETER_KERNEL[None], mode="constant", cval=0)
    perimeter = _PERIMETER_WEIGHTS[codes].sum(axis=(1, 2))
    form_factor = np.where(perimeter > 0, 4.0 * np.pi * area / np.maximum(perimeter, 1e-12) ** 2, np.nan)
    solidity = area / _convex_areas(m, border.astype(bool))
    diameter = np.sqrt(4.0 * area / np.pi)
    return np.stack([area, perimeter, major, minor, eccentricity, extent, solidity, form_factor, diameter], axis=1)


def _convex_areas(m: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Area of the convex hull of the pixel squares of each mask (corners of boundary pixels)."""
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    cell, r, c = np.nonzero(border)
    starts = np.searchsorted(cell, np.arange(m.shape[0] + 1))
    areas = np.full(m.shape[0], np.nan)
    points_all = np.stack([r, c], axis=1).astype(np.float64)
    for i in range(m.shape[0]):
        pts = points_all[starts[i]:starts[i + 1]]
        if len(pts) == 0:
            continue
        pts = (pts[:, None, :] + corners[None]).reshape(-1, 2)
        try:
            areas[i] = ConvexHull(pts).volume
        except QhullError:  # cannot happen for pixel squares, kept as a guard
            areas[i] = float(m[i].sum())
    return areas


def _intensity_block(img: np.ndarray, m: np.ndarray, border: np.ndarray) -> np.ndarray:
    b, s, _ = img.shape
    v = img.astype(np.float64)
    mf = m.astype(np.float64)
    area = mf.sum(axis=(1, 2))
    safe = np.maximum(area, 1.0)
    integrated = (v * mf).sum(axis=(1, 2))
    mean = integrated / safe
    var = ((v - mean[:, None, None]) ** 2 * mf).sum(axis=(1, 2)) / safe
    flat = np.where(m, v, np.inf).reshape(b, -1)
    flat.sort(axis=1)
    count = area.astype(np.int64)
    flat[count == 0] = 0.0  # empty masks: set to NaN by the caller
    last = np.maximum(count - 1, 0)
    vmin = flat[:, 0]
    vmax = np.take_along_axis(flat, last[:, None], axis=1)[:, 0]
    quantiles = []
    for q in _QUANTILES.values():
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        v_lo = np.take_along_axis(flat, lo[:, None], axis=1)[:, 0]
        v_hi = np.take_along_axis(flat, hi[:, None], axis=1)[:, 0]
        quantiles.append(v_lo + (v_hi - v_lo) * (pos - lo))
    bf = border.astype(np.float64)
    edge_mean = (v * bf).sum(axis=(1, 2)) / np.maximum(bf.sum(axis=(1, 2)), 1.0)
    rr = np.arange(s, dtype=np.float64)
    r_geo = (mf.sum(axis=2) @ rr) / safe
    c_geo = (mf.sum(axis=1) @ rr) / safe
    w = v * mf
    wsum = np.maximum(w.sum(axis=(1, 2)), 1e-12)
    r_int = (w.sum(axis=2) @ rr) / wsum
    c_int = (w.sum(axis=1) @ rr) / wsum
    displacement = np.where(integrated > 0, np.hypot(r_int - r_geo, c_int - c_geo), 0.0)
    return np.stack([mean, np.sqrt(var), vmin, vmax, *quantiles, integrated, edge_mean, displacement], axis=1)


def glcm_batch(quantised: np.ndarray, m: np.ndarray, levels: int, distance: int) -> np.ndarray:
    """Symmetric normalised co-occurrence matrices of masked pixels, one per cell and angle.

    Args:
        quantised: int (B, S, S) grey levels in 0..levels-1.
        m: bool (B, S, S) masks; a pair counts when both pixels are inside.
        levels: number of grey levels L.
        distance: pixel distance d.

    Returns:
        float64 (B, 4, L, L) for the angles 0, 45, 90, 135 degrees, with skimage's
        `graycomatrix` offsets (round(sin(angle) d), round(cos(angle) d)) in (row, column);
        all-zero where a cell has no pair.
    """
    b, s, _ = quantised.shape
    out = np.zeros((b, 4, levels, levels), dtype=np.float64)
    cell = np.arange(b, dtype=np.int64)[:, None, None]
    angles = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    offsets = [(int(round(np.sin(a) * distance)), int(round(np.cos(a) * distance))) for a in angles]
    for k, (dr, dc) in enumerate(offsets):
        r0, r1 = max(0, -dr), s - max(0, dr)
        c0, c1 = max(0, -dc), s - max(0, dc)
        if r1 <= r0 or c1 <= c0:
            continue
        a = quantised[:, r0:r1, c0:c1]
        bq = quantised[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
        valid = m[:, r0:r1, c0:c1] & m[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
        code = (cell * levels + a) * levels + bq
        counts = np.bincount(code[valid].ravel(), minlength=b * levels * levels).reshape(b, levels, levels)
        sym = counts + counts.transpose(0, 2, 1)
        total = sym.sum(axis=(1, 2), keepdims=True)
        out[:, k] = np.where(total > 0, sym / np.maximum(total, 1), 0.0)
    return out


def glcm_props(p: np.ndarray) -> dict[str, np.ndarray]:
    """Haralick-style statistics of normalised GLCMs (..., L, L), as skimage's graycoprops.

    Computed as matrix-vector products over the flattened matrices (fast for many cells).
    """
    levels = p.shape[-1]
    lead = p.shape[:-2]
    flat = p.reshape(-1, levels * levels)
    i, j = np.meshgrid(np.arange(levels, dtype=np.float64), np.arange(levels, dtype=np.float64), indexing="ij")
    i, j = i.ravel(), j.ravel()
    diff = i - j
    mu_i, mu_j = flat @ i, flat @ j
    var_i = np.maximum(flat @ (i * i) - mu_i**2, 0.0)
    var_j = np.maximum(flat @ (j * j) - mu_j**2, 0.0)
    cov = flat @ (i * j) - mu_i * mu_j
    std_i, std_j = np.sqrt(var_i), np.sqrt(var_j)
    constant = (std_i < 1e-12) | (std_j < 1e-12)
    logp = np.log(np.where(flat > 0, flat, 1.0))
    props = {
        "contrast": flat @ (diff**2),
        "dissimilarity": flat @ np.abs(diff),
        "homogeneity": flat @ (1.0 / (1.0 + diff**2)),
        "energy": np.sqrt((flat**2).sum(axis=1)),
        "correlation": np.where(constant, 1.0, cov / np.where(constant, 1.0, std_i * std_j)),
        "entropy": -(flat * logp).sum(axis=1),
    }
    return {k: v.reshape(lead) for k, v in props.items()}


def _texture_block(img: np.ndarray, m: np.ndarray, levels: int, distances: Sequence[int]) -> np.ndarray:
    quantised = (img.astype(np.int64) * levels) // 256
    columns = []
    for d in distances:
        p = glcm_batch(quantised, m, levels, int(d))
        has_pairs = p.sum(axis=(-2, -1)) > 0  # (B, 4)
        props = glcm_props(p)
        n_angles = np.maximum(has_pairs.sum(axis=1), 1)
        for name in TEXTURE_PROPS:
            value = np.where(has_pairs, props[name], 0.0).sum(axis=1) / n_angles
            columns.append(np.where(has_pairs.any(axis=1), value, np.nan))
    return np.stack(columns, axis=1)
