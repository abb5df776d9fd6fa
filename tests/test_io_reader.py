"""read_xenium on the real section and on rewritten copies of it (integer IDs, CSV tables, H&E)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
import tifffile
from typer.testing import CliRunner

from spatia.cli import app
from spatia.io import CellPolygons, XeniumSlide, read_xenium
from helpers import copy_bundle, write_10x_h5

@pytest.fixture(scope="module")
def slide(real_bundle) -> XeniumSlide:
    return read_xenium(real_bundle)


@pytest.mark.real_data
def test_real_bundle_cells_genes_controls_clusters(slide, real_bundle):
    assert slide.n_cells == 17_865
    assert len(slide.gene_names) == 477 and len(slide.gene_ids) == 477
    assert len(slide.control_names) == 64
    assert sorted(set(slide.control_types)) == [
        "Negative Control Codeword",
        "Negative Control Probe",
        "Unassigned Codeword",
    ]
    assert slide.counts.shape == (17_865, 477) and sp.isspmatrix_csr(slide.counts)
    assert slide.counts.dtype == np.int32
    assert slide.control_counts.shape == (17_865, 64)
    assert slide.cells.index.name == "cell_id"
    assert all(isinstance(c, str) for c in slide.cells.index[:100])
    assert slide.pixel_size_um == 0.2125 and slide.image.pixel_size_source == "experiment.xenium"
    assert slide.slide_id == real_bundle.name
    # rows follow the cells order: per-cell totals agree with the cells table's own counts
    genes_per_cell = np.asarray(slide.counts.sum(axis=1)).ravel()
    assert np.array_equal(genes_per_cell, slide.cells["transcript_counts"].to_numpy())
    controls_per_cell = np.asarray(slide.control_counts.sum(axis=1)).ravel()
    expected = slide.cells["total_counts"] - slide.cells["transcript_counts"]
    assert controls_per_cell.sum() > 0 and np.array_equal(controls_per_cell, expected.to_numpy())
    # clusters: one column per clustering folder, NA where a cell has none
    assert slide.cluster_columns == ["gene_expression_graphclust"]
    clusters = slide.cells["gene_expression_graphclust"]
    assert isinstance(clusters.dtype, pd.CategoricalDtype)
    assert clusters.nunique() == 35 and clusters.notna().sum() == 16_996
    raw = pd.read_csv(real_bundle / "analysis/clustering/gene_expression_graphclust/clusters.csv")
    some = raw.sample(50, random_state=0)
    assert list(clusters.loc[some["Barcode"]].astype(str)) == [str(c) for c in some["Cluster"]]
    # coordinates: px = um / pixel size, nucleus area absent -> NaN
    assert np.allclose(slide.cells["x_centroid_px"], slide.cells["x_centroid_um"] / 0.2125)
    assert slide.cells["nucleus_area_um2"].isna().all()
    assert slide.nucleus_boundaries is None
    assert any("past the image edge" in p for p in slide.problems)


@pytest.mark.real_data
def test_real_centroids_lie_inside_their_polygons(slide):
    polygons = slide.cell_boundaries
    assert isinstance(polygons, CellPolygons) and polygons.n_cells == slide.n_cells
    assert polygons.has_polygon().all()
    first = polygons.vertices_um[polygons.offsets[:-1]]
    last = polygons.vertices_um[polygons.offsets[1:] - 1]
    assert not np.all(first == last, axis=1).any()  # closing vertex dropped
    x = slide.cells["x_centroid_um"].to_numpy()
    y = slide.cells["y_centroid_um"].to_numpy()
    inside = polygons.contains(x, y)
    assert inside.mean() > 0.95
    reference = shapely.contains_xy(polygons.to_shapely(), x, y)  # independent implementation
    assert (inside == reference).mean() > 0.999
    # polygon i belongs to cell i: its bounding box is near that cell's centroid
    bounds = polygons.bounds_um()
    centre_x = (bounds[:, 0] + bounds[:, 2]) / 2
    assert np.median(np.abs(centre_x - x)) < 2.0


@pytest.mark.real_data
def test_real_image_covers_the_cells(slide):
    image = slide.image
    assert image.level_shapes_yx[0] == (4096, 4096)
    width_um, height_um = image.extent_um
    assert slide.cells["x_centroid_um"].between(0, width_um).all()
    # DAPI is brighter at cell centroids than on average
    x_px = slide.cells["x_centroid_px"].to_numpy().astype(int)
    y_px = slide.cells["y_centroid_px"].to_numpy().astype(int)
    dapi = image.read_level(0)
    assert dapi[y_px, x_px].mean() > dapi.mean()


@pytest.mark.real_data
def test_anndata_round_trip_through_h5ad(slide, real_bundle, tmp_path):
    adata = slide.to_anndata()
    assert adata.shape == (17_865, 477)
    assert list(adata.var["gene_ids"]) == slide.gene_ids
    assert adata.obsm["spatial"].shape == (17_865, 2)
    assert np.array_equal(adata.obsm["spatial"][:, 0], slide.cells["x_centroid_um"].to_numpy())
    assert np.array_equal(adata.obs["control_counts_total"], np.asarray(slide.control_counts.sum(1)).ravel())
    assert (adata.obs["gene_counts_total"] == adata.obs["transcript_counts"]).all()
    assert not any(adata.obs[c].dtype == object for c in adata.obs.columns)
    provenance = adata.uns["spatia"]
    files = dict(zip(provenance["files"]["name"], provenance["files"]["sha256"], strict=True))
    assert files["cells.parquet"] == hashlib.sha256((real_bundle / "cells.parquet").read_bytes()).hexdigest()
    assert files["morphology_focus.ome.tif"] == ""  # images: size + mtime only
    assert json.loads(provenance["experiment_xenium_json"])["pixel_size"] == 0.2125

    path = tmp_path / "slide.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0 and back.X.dtype == adata.X.dtype
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.var, adata.var)
    assert np.array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert (back.obsm["control_counts"] != adata.obsm["control_counts"]).nnz == 0
    assert list(back.uns["spatia"]["problems"]) == slide.problems
    assert back.uns["spatia"]["pixel_size_um"] == 0.2125


@pytest.mark.real_data
def test_cli_info_json_and_table(real_bundle):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(real_bundle), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_cells"] == 17_865 and summary["n_genes"] == 477 and summary["n_controls"] == 64
    assert summary["image"]["levels_yx"] == [[4096, 4096], [2048, 2048], [1024, 1024]]
    assert summary["clusterings"]["gene_expression_graphclust"] == {"n_clusters": 35, "n_cells_assigned": 16_996}
    assert summary["extent_um"]["image_width_um"] == pytest.approx(870.4)
    table = runner.invoke(app, ["info", str(real_bundle), "--quiet"])
    assert table.exit_code == 0
    assert "17,865" in table.stdout and "gene_expression_graphclust" in table.stdout


def _rewrite_with_integer_ids(real: Path, target: Path) -> dict[str, int]:
    """The real bundle with integer cell IDs and CSV tables, as old Xenium versions wrote them."""
    copy_bundle(real, target, skip=("cells.parquet", "cell_boundaries.parquet", "cell_feature_matrix.h5", "analysis"))
    cells = pd.read_parquet(real / "cells.parquet")
    id_map = {cell: i + 1 for i, cell in enumerate(cells["cell_id"])}
    cells["cell_id"] = cells["cell_id"].map(id_map)
    cells["nucleus_area"] = cells["cell_area"] / 3
    cells.to_csv(target / "cells.csv.gz", index=False)
    boundaries = pd.read_parquet(real / "cell_boundaries.parquet")
    boundaries["cell_id"] = boundaries["cell_id"].map(id_map)
    boundaries.to_csv(target / "cell_boundaries.csv.gz", index=False)
    with h5py.File(real / "cell_feature_matrix.h5") as h5:
        m = h5["matrix"]
        counts = sp.csc_matrix(
            (m["data"][:], m["indices"][:], m["indptr"][:]), shape=tuple(m["shape"][:])
        ).T.tocsr()
        barcodes = [str(id_map[b.decode()]) for b in m["barcodes"][:]]
        features = [m["features"][k][:].astype(str) for k in ("id", "name", "feature_type")]
    write_10x_h5(target / "cell_feature_matrix.h5", counts, barcodes, *features)
    clusters = pd.read_csv(real / "analysis/clustering/gene_expression_graphclust/clusters.csv")
    clusters["Barcode"] = clusters["Barcode"].map(id_map)
    (target / "analysis/clustering/graphclust").mkdir(parents=True)
    clusters.to_csv(target / "analysis/clustering/graphclust/clusters.csv", index=False)
    return id_map


@pytest.mark.real_data
def test_integer_ids_csv_tables_and_nucleus_polygons(slide, real_bundle, tmp_path):
    id_map = _rewrite_with_integer_ids(real_bundle, tmp_path / "old")
    # nucleus polygons: each cell polygon shrunk towards its centroid; 30 cells get a second nucleus
    cells = pd.read_csv(tmp_path / "old/cells.csv.gz")
    boundaries = pd.read_csv(tmp_path / "old/cell_boundaries.csv.gz")
    centre = cells.set_index("cell_id").loc[boundaries["cell_id"], ["x_centroid", "y_centroid"]].to_numpy()
    nuclei = boundaries.copy()
    nuclei[["vertex_x", "vertex_y"]] = centre + 0.5 * (boundaries[["vertex_x", "vertex_y"]].to_numpy() - centre)
    nuclei["label_id"] = nuclei["cell_id"]
    extra = nuclei[nuclei["cell_id"] <= 30].copy()
    extra[["vertex_x", "vertex_y"]] += 1.0
    extra["label_id"] += 100_000
    pd.concat([nuclei, extra]).to_parquet(tmp_path / "old/nucleus_boundaries.parquet")

    old = read_xenium(tmp_path / "old")
    assert list(old.cells.index[:3]) == ["1", "2", "3"]
    assert old.cells.index.equals(pd.Index([str(id_map[c]) for c in slide.cells.index]))
    assert (old.counts != slide.counts).nnz == 0
    assert np.allclose(old.cells["x_centroid_um"], slide.cells["x_centroid_um"])
    assert np.allclose(old.cells["nucleus_area_um2"], slide.cells["cell_area_um2"] / 3)
    assert np.array_equal(old.cell_boundaries.offsets, slide.cell_boundaries.offsets)
    assert np.allclose(old.cell_boundaries.vertices_um, slide.cell_boundaries.vertices_um, atol=1e-4)
    assert old.cluster_columns == ["graphclust"]
    assert (old.cells["graphclust"].astype(str).to_numpy() == slide.cells["gene_expression_graphclust"].astype(str).to_numpy()).all()
    # nuclei: the first polygon of each cell is kept, the doubled ones are counted
    nucleus = old.nucleus_boundaries
    assert nucleus is not None and nucleus.has_polygon().all()
    assert np.array_equal(nucleus.offsets, slide.cell_boundaries.offsets)
    assert any("30 cells have several nucleus polygons" in p for p in old.problems)
    inside = nucleus.contains(old.cells["x_centroid_um"].to_numpy(), old.cells["y_centroid_um"].to_numpy())
    assert inside.mean() > 0.95


@pytest.mark.real_data
def test_he_image_read_through_the_slide(real_bundle, tmp_path):
    bundle = copy_bundle(real_bundle, tmp_path / "b", skip=("cell_boundaries.parquet",))
    dapi = tifffile.imread(real_bundle / "morphology_focus.ome.tif", level=2)  # 1024 x 1024
    he = np.stack([255 - (dapi >> 4).clip(0, 255).astype(np.uint8)] * 3, axis=-1)  # a 4x coarser "H&E"
    he_path = tmp_path / "he_image.ome.tif"
    tifffile.imwrite(he_path, he, tile=(256, 256), photometric="rgb", compression="zlib")
    alignment = tmp_path / "he_imagealignment.csv"
    alignment.write_text("4,0,1.5\n0,4,1.5\n0,0,1\n")  # H&E px -> morphology level-0 px (centres aligned)
    slide = read_xenium(bundle, he_image=he_path, he_alignment=alignment)
    assert slide.he is not None and slide.summary()["he_image"] == str(he_path)
    window = slide.he.read_window(100, 200, 64, 48, level=2)  # morphology level 2 == H&E pixels
    assert np.array_equal(window, he[200:248, 100:164])
    fine = slide.he.read_window(400, 800, 16, 16, level=0)  # 4x finer: bilinear between H&E pixels
    assert fine.shape == (16, 16, 3)
    assert fine.min() >= he[199:205, 99:105].min() and fine.max() <= he[199:205, 99:105].max()
    assert slide.to_anndata().uns["spatia"]["he"]["alignment_path"] == str(alignment)


@pytest.mark.parametrize(("layout", "z_planes"), [("v1", 0), ("v2", 3)])
def test_simulated_bundle(tmp_path, layout, z_planes):
    simulate = pytest.importorskip("spatia.sim")
    config = simulate.SimulationConfig(n_cells=300, n_genes=140, layout=layout, z_planes=z_planes)
    result = simulate.simulate_bundle(tmp_path / "sim", config, seed=3)
    slide = read_xenium(result.path)
    truth = pd.read_parquet(result.path / simulate.GROUND_TRUTH_TABLE)
    assert slide.n_cells == result.n_cells == len(truth)
    assert slide.n_genes == result.n_genes
    assert list(slide.cells.index) == list(truth["cell_id"].astype(str))
    assert np.allclose(slide.cells["x_centroid_um"], truth["x_um"], atol=1.0)
    assert slide.image.level_shapes_yx[0] == (result.height_px, result.width_px)
    assert slide.pixel_size_um == result.pixel_size_um
    assert slide.cluster_columns and slide.cells[slide.cluster_columns[0]].notna().mean() > 0.5
    x, y = slide.cells["x_centroid_um"].to_numpy(), slide.cells["y_centroid_um"].to_numpy()
    assert slide.cell_boundaries.contains(x, y).mean() > 0.95
    assert slide.nucleus_boundaries is None or slide.nucleus_boundaries.contains(x, y).mean() > 0.9
    # nuclei are rendered at the centroids: DAPI is brighter there than on average
    dapi = slide.image.read_level(0, channel="DAPI")
    rows = np.clip(slide.cells["y_centroid_px"].to_numpy().astype(int), 0, dapi.shape[0] - 1)
    cols = np.clip(slide.cells["x_centroid_px"].to_numpy().astype(int), 0, dapi.shape[1] - 1)
    assert dapi[rows, cols].mean() > 1.5 * dapi.mean()
    if layout == "v2":
        assert slide.image.path.name == "morphology_focus" and slide.image.n_channels == 4
        assert slide.image.channel_names[0] == "DAPI" and not slide.image.warnings
    if z_planes:
        stack = read_xenium(result.path, morphology="morphology.ome.tif").image
        assert stack.n_z == z_planes
        planes = tifffile.imread(result.path / "morphology.ome.tif")
        assert planes.shape[0] == z_planes
        assert np.array_equal(stack.read_window(100, 120, 64, 64), planes.max(axis=0)[120:184, 100:164])


@pytest.mark.parametrize("batch_rows", [1 << 20, 3, 1])
@pytest.mark.parametrize("suffix", [".parquet", ".csv.gz"])
def test_read_polygons_rules_on_a_hand_made_file(tmp_path, suffix, batch_rows, monkeypatch):
    """Rows out of cell order, a cell with two label_ids, a closing vertex, an unknown cell and a
    polygon with a NaN vertex: each rule of `read_polygons` against the answer written by hand,
    read whole or in batches of 3 rows or 1 row (a polygon's rows cut across batches)."""
    from spatia.io import polygons
    from spatia.io.polygons import read_polygons

    monkeypatch.setattr(polygons, "_VERTEX_BATCH_ROWS", batch_rows)

    square = [(0, 0), (2, 0), (2, 2), (0, 2)]
    rows = []
    rows += [("c", x + 10, y, 7) for x, y in square]                  # c first in the file
    rows += [("a", x, y, 1) for x, y in square + [square[0]]]         # closed: last vertex repeats the first
    rows += [("ghost", 0, 0, 9)] * 4                                  # not a kept cell
    rows += [("b", x + 5, y, 3) for x, y in square]                   # b's first polygon
    rows += [("b", x + 50, y, 4) for x, y in square]                  # b's second polygon: dropped, counted
    rows += [("d", 1.0, 1.0, 5), ("d", np.nan, 2.0, 5), ("d", 3.0, 3.0, 5)]  # NaN vertex: dropped
    frame = pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y", "label_id"])
    path = tmp_path / f"cell_boundaries{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    problems: list[str] = []
    polygons = read_polygons(path, pd.Index(["a", "b", "c", "d", "e"]), problems, what="cell")
    assert polygons.offsets.tolist() == [0, 4, 8, 12, 12, 12]  # a, b, c; d dropped; e has none
    np.testing.assert_array_equal(polygons.polygon(0), np.array(square, dtype=float))
    np.testing.assert_array_equal(polygons.polygon(1), np.array(square, dtype=float) + [5, 0])
    np.testing.assert_array_equal(polygons.polygon(2), np.array(square, dtype=float) + [10, 0])
    text = " | ".join(problems)
    assert "1 cell polygons belong to cells not in the kept cells" in text
    assert "1 cells have several cell polygons" in text
    assert "1 cell polygons have NaN vertices" in text
