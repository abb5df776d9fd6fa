"""Bad input rules and multi-slide builds (different gene panels, split by slide)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely

from spatia.errors import InputDataError
from spatia.io.polygons import CellPolygons
from spatia.io.xenium import read_xenium
from spatia.mist import BuildConfig, build_dataset
from helpers import decoded_records

CONFIG = BuildConfig.cpu()


def in_memory(slide, **changes):
    """A copy of `slide` with some tables replaced and no source files (so the build
    fingerprints its tables instead of the bundle's files)."""
    return dataclasses.replace(slide, files_read=[], path=None, **changes)


@pytest.fixture(scope="module")
def slide(simulated_bundle):
    return read_xenium(simulated_bundle)


def test_bad_cells_are_skipped_or_repaired_and_counted(slide, tmp_path):
    polygons = [slide.cell_boundaries.polygon(i).copy() for i in range(slide.n_cells)]
    cells = slide.cells.copy()
    counts = slide.counts.tolil()
    ids = list(cells.index)
    cx, cy = cells["x_centroid_um"].to_numpy(), cells["y_centroid_um"].to_numpy()
    # pick six cells far from the slide edges
    width_um = slide.image.level_shapes_yx[0][1] * slide.pixel_size_um
    central = np.flatnonzero((cx > 100) & (cx < width_um - 100) & (cy > 100) & (cy < width_um - 100))
    no_poly, flat, bowtie, outside, empty, giant = central[:6]
    polygons[no_poly] = np.zeros((0, 2))
    polygons[flat] = np.array([[cx[flat], cy[flat]], [cx[flat] + 2, cy[flat] + 2], [cx[flat] + 4, cy[flat] + 4]])
    x, y = cx[bowtie], cy[bowtie]
    polygons[bowtie] = np.array([[x - 4, y - 4], [x + 6, y + 6], [x + 6, y - 4], [x - 4, y + 2]])
    cells.iloc[outside, cells.columns.get_loc("x_centroid_um")] = -50.0
    counts[empty, :] = 0
    x, y = cx[giant], cy[giant]
    polygons[giant] = np.array([[x - 3, y - 3], [x + 90, y - 3], [x + 90, y + 90], [x - 3, y + 3]])
    offsets = np.r_[0, np.cumsum([len(p) for p in polygons])]
    bad = in_memory(
        slide,
        slide_id="bad_slide",
        cells=cells,
        counts=sp.csr_matrix(counts),
        cell_boundaries=CellPolygons(offsets, np.concatenate(polygons)),
    )
    out = tmp_path / "dataset"
    summary = build_dataset([bad], out, CONFIG, seed=0)

    expected = {"outside_image": 1, "no_polygon": 1, "zero_area_polygon": 1, "invalid_polygon": 0, "zero_counts": 1, "low_counts": 0}
    assert summary.skipped == expected
    assert summary.repaired == {"self_intersecting_polygon": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == expected and manifest["slides"][0]["skipped"] == expected
    assert manifest["slides"][0]["source_checksums_sha256"].keys() == {"<tables>"}
    index = pd.read_parquet(out / "cell_index.parquet").set_index("cell_id")
    assert len(index) == slide.n_cells - 4
    for gone in (no_poly, flat, outside, empty):
        assert ids[gone] not in index.index
    assert index.loc[ids[bowtie], "repaired"] and index["repaired"].sum() == 1
    assert index.loc[ids[giant], "clipped"]

    cell_records = decoded_records(out, "cell")
    factor = manifest["slides"][0]["scale"]["factor"]
    size = CONFIG.cell_image_px
    # the repaired cell's mask is the largest valid piece of its bow-tie
    row = index.loc[ids[bowtie]]
    mask = cell_records[row["key"]].mask
    piece = shapely.make_valid(shapely.Polygon(polygons[bowtie] / slide.pixel_size_um))
    largest = max(piece.geoms, key=lambda g: g.area)
    u0, v0 = round(row["crop_x_px"] * factor - size / 2), round(row["crop_y_px"] * factor - size / 2)
    gx, gy = np.meshgrid((u0 + np.arange(size) + 0.5) / factor, (v0 + np.arange(size) + 0.5) / factor)
    inside = shapely.contains_xy(largest, gx, gy)
    assert np.abs(mask.astype(int) - inside).sum() <= 0.02 * inside.sum() + 4
    # the giant cell (read through its own window) is centred on its bounding square, clipped to the crop
    row = index.loc[ids[giant]]
    record = cell_records[row["key"]]
    assert record.mask.shape == (size, size) and record.mask.mean() > 0.5
    bbox = np.array([cx[giant] - 3, cy[giant] - 3, cx[giant] + 90, cy[giant] + 90]) / slide.pixel_size_um
    assert row["crop_x_px"] == pytest.approx((bbox[0] + bbox[2]) / 2, abs=1 / factor)
    assert row["crop_y_px"] == pytest.approx((bbox[1] + bbox[3]) / 2, abs=1 / factor)


def test_non_integer_counts_are_refused(slide, tmp_path):
    counts = slide.counts.astype(np.float32)
    counts.data[0] = 0.5
    with pytest.raises(InputDataError, match="non-integer"):
        build_dataset([in_memory(slide, counts=counts)], tmp_path / "dataset", CONFIG, seed=0)


def test_slides_with_different_gene_panels_share_one_vocabulary(slide, tmp_path):
    genes = list(slide.gene_names)
    # slide B measured a subset of A's panel plus two genes A never measured
    keep = np.arange(40, len(genes))
    extra = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (slide.n_cells, 2)).astype(np.int32))
    counts_b = sp.hstack([slide.counts[:, keep], extra]).tocsr()
    names_b = [genes[i] for i in keep] + ["NOVEL1", "NOVEL2"]
    a = in_memory(slide)
    b = in_memory(slide, counts=counts_b, gene_names=names_b)  # same slide ID: renamed "<id>_2"
    config = BuildConfig.cpu(split_mode="slides", slide_splits={slide.slide_id: "train", f"{slide.slide_id}_2": "test"})
    out = tmp_path / "dataset"
    build_dataset([a, b], out, config, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    vocabulary = manifest["genes"]
    assert vocabulary == sorted(set(genes) | {"NOVEL1", "NOVEL2"})
    slide_a, slide_b = manifest["slides"]
    assert slide_b["slide_id"] == f"{slide.slide_id}_2" and slide_b["source_slide_id"] == slide.slide_id
    assert slide_a["measured_gene_indices"] == sorted(vocabulary.index(g) for g in genes)
    assert slide_b["measured_gene_indices"] == sorted(vocabulary.index(g) for g in names_b)
    assert slide_a["split"] == "train" and slide_b["split"] == "test"

    index = pd.read_parquet(out / "cell_index.parquet")
    assert set(index.groupby("slide_id")["split"].unique().map(tuple)) == {("train",), ("test",)}
    cell_records = decoded_records(out, "cell")
    position = {g: i for i, g in enumerate(vocabulary)}
    rows = slide.cells.index.get_indexer(index["cell_id"])
    for source, names, counts in ((slide_a, genes, slide.counts), (slide_b, names_b, counts_b)):
        columns = np.array([position[g] for g in names])
        part = index[index["slide_id"] == source["slide_id"]]
        for key, row in list(zip(part["key"], rows[part.index]))[:200]:
            dense = cell_records[key].dense_counts(len(vocabulary), np.int64)
            expected = np.zeros(len(vocabulary), dtype=np.int64)
            expected[columns] = counts[row].toarray().ravel()
            np.testing.assert_array_equal(dense, expected)
            assert not dense[np.setdiff1d(np.arange(len(vocabulary)), columns)].any()
