"""Geometry of the MIST builder: polygon statistics and repair, masks, resampling."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch

from spatia.mist.geometry import (
    crop_starts,
    cut_crops,
    grid_weights,
    invalid_polygons,
    polygon_stats,
    rasterize_polygons,
    repair_polygon,
    resample_grid,
    source_range,
)


def _ragged(polygons: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.r_[0, np.cumsum([len(p) for p in polygons])].astype(np.int64)
    vertices = np.concatenate(polygons) if polygons else np.zeros((0, 2))
    return offsets, vertices


def _random_polygons(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Star-shaped (often concave) polygons, some reaching past the frame."""
    out = []
    for _ in range(n):
        k = rng.integers(3, 16)
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(0.2, 0.6, k) * size
        centre = rng.uniform(0.2, 0.8, 2) * size
        out.append(np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1))
    return out


@pytest.mark.parametrize("size", [16, 64, 100, 130])
def test_rasterize_matches_point_in_polygon_at_pixel_centres(size):
    rng = np.random.default_rng(size)
    polygons = _random_polygons(rng, 40, size)
    polygons.append(np.array([[0.0, 0.0], [size, 0.0], [size, size], [0.0, size]]))  # the whole frame
    polygons.append(np.array([[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]))  # degenerate: empty
    offsets, vertices = _ragged(polygons)
    masks = rasterize_polygons(offsets, vertices, size)
    assert masks.shape == (len(polygons), size, size) and masks.dtype == bool
    cx, cy = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    points = shapely.points(cx, cy)
    for mask, poly in zip(masks[:-1], polygons[:-1]):
        geometry = shapely.Polygon(poly)
        inside = shapely.contains_xy(geometry, cx, cy)
        on_boundary = shapely.distance(geometry.exterior, points) < 1e-9
        assert np.array_equal(mask[~on_boundary], inside[~on_boundary])
    assert masks[-2].all()
    assert not masks[-1].any()


def test_rasterize_even_odd_for_self_intersecting_polygon():
    # a pentagram: the even-odd rule leaves the central pentagon empty
    angles = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.stack([32 + 28 * np.cos(angles), 32 + 28 * np.sin(angles)], axis=1)
    mask = rasterize_polygons(*_ragged([star]), 64)[0]
    assert not mask[32, 32]
    assert mask.sum() > 200


def test_polygon_stats_known_shapes():
    square = np.array([[10.0, 20.0], [14.0, 20.0], [14.0, 30.0], [10.0, 30.0]])
    closed_triangle = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    stats = polygon_stats(*_ragged([square, closed_triangle, np.zeros((0, 2))]))
    np.testing.assert_allclose(stats.area_px2[:2], [40.0, 9.0])
    np.testing.assert_allclose(stats.bbox_px[0], [10, 20, 14, 30])
    np.testing.assert_allclose(stats.side_px[:2], [10.0, 6.0])
    np.testing.assert_allclose(stats.center_px[0], [12.0, 25.0])
    assert list(stats.n_distinct) == [4, 3, 0]
    assert np.isnan(stats.area_px2[2])


def test_invalid_polygons_found_and_repaired_to_largest_piece():
    good = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]])
    bowtie = np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 4.0]])  # crossing edges, unequal lobes
    offsets, vertices = _ragged([good, bowtie])
    assert list(invalid_polygons(offsets, vertices, np.array([0, 1]))) == [False, True]
    fixed = repair_polygon(bowtie)
    assert fixed is not None
    repaired = shapely.Polygon(fixed)
    assert repaired.is_valid
    pieces = shapely.make_valid(shapely.Polygon(bowtie))
    assert repaired.area == pytest.approx(max(g.area for g in pieces.geoms))


@pytest.mark.parametrize("scale", [0.25, 0.5, 0.805, 1.0, 2.8])
def test_resample_grid_matches_torch_antialiased_interpolation(scale):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (96, 80)).astype(np.float32)
    out_h, out_w = int(96 * scale), int(80 * scale)
    ours = resample_grid(image, (0, 0), scale, (0, 0), (out_h, out_w))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None, None],
        scale_factor=scale,
        mode="bilinear",
        antialias=True,
        align_corners=False,
        recompute_scale_factor=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, ref[:out_h, :out_w], atol=2e-3)


@pytest.mark.parametrize("scale", [0.3, 0.805, 2.8])
def test_windowed_resampling_equals_whole_image_resampling(scale):
    """A crop resampled from a window that holds its source range equals the same pixels of the
    whole image resampled at once: chunking cannot change the output."""
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (300, 300)).astype(np.float32)
    full = resample_grid(image, (0, 0), scale, (0, 0), (int(300 * scale), int(300 * scale)))
    size = 16
    starts = crop_starts(np.array([[150.0, 140.0], [120.5, 170.25]]), scale, size)
    lo, hi = source_range(starts, starts + size, scale)
    for start, a, b in zip(starts, lo, hi):
        window = image[a[1] : b[1], a[0] : b[0]]
        crop = resample_grid(window, (int(a[0]), int(a[1])), scale, (int(start[0]), int(start[1])), (size, size))
        np.testing.assert_allclose(crop, full[start[1] : start[1] + size, start[0] : start[0] + size], rtol=1e-5, atol=1e-3)
        # and the window is tight: every tap it holds is used by some output pixel
        weights = grid_weights(size, int(start[0]), scale, int(a[0]), int(b[0] - a[0]))
        used = np.flatnonzero(np.asarray(weights.sum(axis=0)).ravel() > 0)
        assert used.min() == 0 and used.max() == b[0] - a[0] - 1


def test_grid_weights_rows_sum_to_one_and_constant_images_stay_constant():
    weights = grid_weights(50, 3, 0.37, 0, 200)
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
    out = resample_grid(np.full((200, 200), 77.0, dtype=np.float32), (0, 0), 0.37, (3, 3), (50, 50))
    np.testing.assert_allclose(out, 77.0, rtol=1e-6)


def test_cut_crops_copies_the_right_squares():
    grid = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    crops = cut_crops(grid, np.array([[0, 0], [10, 5], [42, 32]]), 8)
    assert crops.shape == (3, 8, 8)
    np.testing.assert_array_equal(crops[1], grid[5:13, 10:18])
    np.testing.assert_array_equal(crops[2], grid[32:40, 42:50])
