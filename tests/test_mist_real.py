"""`spatia build` / `spatia dataset-info` on the real Xenium section (bone marrow, 17,865 cells),
with every stored crop and sum checked against independent references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from typer.testing import CliRunner

from spatia.cli import app
from spatia.io.xenium import read_xenium
from helpers import decoded_records

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def built(real_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("mist_real") / "dataset"
    result = CliRunner().invoke(app, ["build", str(real_bundle), "-o", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def slide(real_bundle):
    return read_xenium(real_bundle)


def test_cli_build_summary_and_dataset_info(built, real_bundle):
    root, output = built
    assert "16,996 cells" in output and "zero_counts: 869" in output
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["skipped"]["zero_counts"] == 869
    assert manifest["repaired"]["self_intersecting_polygon"] > 0
    run = json.loads((root / "spatia_run.json").read_text())
    assert run["command"] == "build" and run["seed"] == 0 and run["config"]["cell_image_px"] == 64
    result = CliRunner().invoke(app, ["dataset-info", str(root), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["levels"]["cell"]["n_records"] == info["levels"]["cell"]["n_store_records"] == 16996
    assert info["levels"]["niche"]["n_records"] == info["levels"]["niche"]["n_store_records"]
    assert info["slides"][0]["skipped"] == {"zero_counts": 869}
    assert CliRunner().invoke(app, ["dataset-info", str(root)]).exit_code == 0
    again = CliRunner().invoke(app, ["build", str(real_bundle), "-o", str(root)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_crops_masks_and_sums_match_references(built, slide):
    root, _ = built
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["slides"][0]
    factor, low, high = entry["scale"]["factor"], entry["normalisation"]["low"], entry["normalisation"]["high"]
    raw = slide.image.read_level(0, channel=0).astype(np.float32)
    norm = np.clip((raw - low) * (255.0 / (high - low)), 0, 255).astype(np.float32)
    grid = torch.nn.functional.interpolate(
        torch.from_numpy(norm)[None, None], scale_factor=factor, mode="bilinear", antialias=True,
        align_corners=False, recompute_scale_factor=False,
    )[0, 0].numpy()  # fmt: skip
    index = pd.read_parquet(root / "cell_index.parquet")
    cell_records = decoded_records(root, "cell")
    size = 64
    h, w = raw.shape
    radius = max(1.0, 1 / factor)
    rows = slide.cells.index.get_indexer(index["cell_id"])
    sample = set(np.random.default_rng(0).choice(len(index), 300, replace=False).tolist())
    compared = 0
    for i, (key, cx, cy, repaired) in enumerate(zip(index["key"], index["crop_x_px"], index["crop_y_px"], index["repaired"])):
        record = cell_records[key]
        u0, v0 = int(round(cx * factor - size / 2)), int(round(cy * factor - size / 2))
        assert not record.image[~record.mask].any()
        if u0 / factor - radius < 0 or v0 / factor - radius < 0 or (u0 + size) / factor + radius > w or (v0 + size) / factor + radius > h:
            continue
        expected = np.rint(grid[v0 : v0 + size, u0 : u0 + size])
        assert np.abs(record.image.astype(np.float32) - expected)[record.mask].max(initial=0) <= 1, key
        compared += 1
        if i in sample and not repaired:
            poly = shapely.Polygon(slide.cell_boundaries.polygon(rows[i]) / slide.pixel_size_um)
            gx, gy = np.meshgrid((u0 + np.arange(size) + 0.5) / factor, (v0 + np.arange(size) + 0.5) / factor)
            inside = shapely.contains_xy(poly, gx, gy)
            boundary = shapely.distance(poly.exterior, shapely.points(gx, gy)) < 1e-6
            assert np.array_equal(record.mask[~boundary], inside[~boundary]), key
    assert compared > 0.95 * len(index)
    # a cell's crop holds its polygon's bright (nuclear) signal: the brightest masked pixel of
    # the crop is close to the brightest full-resolution pixel inside the polygon
    brightest_ok = 0
    for i in sorted(sample):
        poly = slide.cell_boundaries.polygon(rows[i]) / slide.pixel_size_um
        x0, y0 = np.floor(poly.min(axis=0)).astype(int)
        x1, y1 = np.ceil(poly.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        gx, gy = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        inside = shapely.contains_xy(shapely.Polygon(poly), gx, gy)
        if not inside.any():
            continue
        peak = norm[y0:y1, x0:x1][inside].max()
        crop_peak = cell_records[index["key"].iat[i]].image.max()
        brightest_ok += crop_peak >= 0.75 * peak - 2
    assert brightest_ok >= 0.97 * len(sample)

    # niche sums, tissue grids
    n_genes = len(manifest["genes"])
    niches = pd.read_parquet(root / "niche_index.parquet")
    niche_records = decoded_records(root, "niche")
    by_niche = index.groupby("niche_id")["key"].apply(list)
    for niche in niches.itertuples():
        expected = sum(cell_records[k].dense_counts(n_genes, np.int64) for k in by_niche[niche.niche_id])
        np.testing.assert_array_equal(niche_records[niche.key].dense_counts(n_genes, np.int64), expected)
    tissues = pd.read_parquet(root / "tissue_index.parquet")
    tissue_records = decoded_records(root, "tissue")
    for tissue in tissues.itertuples():
        slots = tissue_records[tissue.key].meta["niche_ids"]
        inside = niches[niches["tissue_id"] == tissue.tissue_id]
        assert sorted(s for s in slots if s) == sorted(inside["niche_id"])
        for n in inside.itertuples():
            assert slots[n.grid_row * 4 + n.grid_col] == n.niche_id
            assert (n.niche_row // 4, n.niche_col // 4) == (tissue.tissue_row, tissue.tissue_col)


def test_the_measures_weight_on_the_two_real_sections(built, real_bundle, tmp_path):
    """Known answers of `fusion.morphometry_weight` from the data: region1's 8-bit-derived DAPI
    explains little of its expression (R2 about 0.014: a weight (R2 / 0.1) ** 2 about 0.02, above 0), the breast
    section's real DAPI enough for full weight (R2 about 0.15; docs/model.md)."""
    from spatia.mist import build_dataset
    from spatia.train.data import MORPHOMETRY_FULL_WEIGHT_R2, dataset_statistics

    marrow = dataset_statistics(built[0])
    assert 0.0 < marrow.morphometry_r2 < 0.3 * MORPHOMETRY_FULL_WEIGHT_R2
    assert 0.0 < marrow.morphometry_weight() < 0.3 ** 2
    breast_bundle = real_bundle.parent / "xenium_breast_cancer_left"
    if not (breast_bundle / "cells.parquet").exists():
        pytest.skip(f"breast bundle not found at {breast_bundle}")
    build_dataset([breast_bundle], tmp_path / "breast", seed=0)
    breast = dataset_statistics(tmp_path / "breast")
    assert breast.morphometry_r2 > MORPHOMETRY_FULL_WEIGHT_R2 and breast.morphometry_weight() == 1.0
