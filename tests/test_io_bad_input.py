"""Damaged, incomplete and inconsistent bundles: a clear BundleError, or a counted skip in `problems`.

Every case copies the small files of the real section under tmp_path and damages the copy.
"""

from __future__ import annotations

import logging

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import BundleError, SpatiaError
from spatia.io import read_xenium
from helpers import copy_bundle

pytestmark = pytest.mark.real_data

NO_POLYGONS = ("cell_boundaries.parquet",)  # skip the largest table where a case does not need it


@pytest.fixture
def bundle(real_bundle, tmp_path) -> Path:
    return copy_bundle(real_bundle, tmp_path / "bundle", skip=NO_POLYGONS)


def genes_match_cells(slide) -> bool:
    totals = np.asarray(slide.counts.sum(axis=1)).ravel()
    return bool(np.array_equal(totals, slide.cells["transcript_counts"].to_numpy()))


# -- missing files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        ("cells.parquet", "cells.parquet"),
        ("cell_feature_matrix.h5", "cell_feature_matrix.h5"),
        ("morphology_focus.ome.tif", "morphology image"),
    ],
)
def test_missing_required_file(bundle, removed, named):
    (bundle / removed).unlink()
    with pytest.raises(BundleError) as info:
        read_xenium(bundle)
    message = str(info.value)
    assert named in message and "missing" in message
    assert str(bundle) in message and "Fix:" in message and "Xenium" in message


def test_all_missing_files_named_at_once(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError) as info:
        read_xenium(tmp_path / "empty")
    message = str(info.value)
    assert "cells.parquet" in message and "cell_feature_matrix.h5" in message and "morphology" in message


def test_path_that_is_not_a_folder(real_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_xenium(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="got a file"):
        read_xenium(real_bundle / "cells.parquet")


# -- cell IDs that disagree --------------------------------------------------------------------


def test_cells_table_missing_some_cells_keeps_the_intersection(bundle):
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells.iloc[::10].to_parquet(bundle / "cells.parquet")  # keep 10 %: too small an overlap
    with pytest.raises(BundleError, match="share only 1787 cell IDs"):
        read_xenium(bundle)
    cells.drop(index=cells.index[:1000]).to_parquet(bundle / "cells.parquet")
    slide = read_xenium(bundle)
    assert slide.n_cells == 17_865 - 1000
    assert slide.cells.index.equals(pd.Index(cells["cell_id"].iloc[1000:]))
    assert any("0 cells of cells.parquet have no counts and 1000 barcodes" in p for p in slide.problems)
    assert genes_match_cells(slide)


def test_matrix_missing_some_cells_and_reordered(bundle):
    path = bundle / "cell_feature_matrix.h5"
    with h5py.File(path, "r+") as h5:
        matrix = h5["matrix"]
        barcodes = matrix["barcodes"][:]
        rng = np.random.default_rng(0)
        # shuffle the barcodes' columns together with the barcodes, then drop 500 of them
        order = rng.permutation(len(barcodes))[:-500]
        indptr, indices, data = matrix["indptr"][:], matrix["indices"][:], matrix["data"][:]
        pieces = [(indices[indptr[i] : indptr[i + 1]], data[indptr[i] : indptr[i + 1]]) for i in order]
        new_indptr = np.concatenate([[0], np.cumsum([len(p[0]) for p in pieces])])
        for name in ("barcodes", "indptr", "indices", "data", "shape"):
            del matrix[name]
        matrix["barcodes"] = barcodes[order]
        matrix["indptr"] = new_indptr.astype(np.int64)
        matrix["indices"] = np.concatenate([p[0] for p in pieces]).astype(np.int64)
        matrix["data"] = np.concatenate([p[1] for p in pieces]).astype(np.int32)
        matrix["shape"] = np.array([541, len(order)], dtype=np.int32)
    slide = read_xenium(bundle)
    assert slide.n_cells == 17_865 - 500
    assert any("500 cells of cells.parquet have no counts" in p for p in slide.problems)
    assert genes_match_cells(slide)  # rows follow the cells table, not the matrix order


def test_duplicated_cell_ids(bundle):
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells.loc[5, "cell_id"] = cells.loc[4, "cell_id"]
    cells.to_parquet(bundle / "cells.parquet")
    with pytest.raises(BundleError, match="appear more than once"):
        read_xenium(bundle)


# -- cells: NaN centroids, empty, bad columns --------------------------------------------------


def test_nan_centroids_are_dropped_and_counted(bundle):
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells.loc[[3, 50, 51, 700, 9000, 12000, 17000], "x_centroid"] = np.nan
    cells.to_parquet(bundle / "cells.parquet")
    slide = read_xenium(bundle)
    assert slide.n_cells == 17_865 - 7
    assert any("7 cells have NaN/inf centroids; dropped" in p for p in slide.problems)
    assert np.isfinite(slide.cells["x_centroid_um"]).all()
    assert genes_match_cells(slide)


def test_empty_bundle(bundle):
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells.iloc[:0].to_parquet(bundle / "cells.parquet")
    with pytest.raises(BundleError, match="holds no cells"):
        read_xenium(bundle)


def test_all_centroids_nan(bundle):
    cells = pd.read_parquet(bundle / "cells.parquet")
    cells["y_centroid"] = np.nan
    cells.to_parquet(bundle / "cells.parquet")
    with pytest.raises(BundleError, match="no cells left"):
        read_xenium(bundle)


def test_cells_table_without_centroid_column(bundle):
    pd.read_parquet(bundle / "cells.parquet").drop(columns=["y_centroid"]).to_parquet(bundle / "cells.parquet")
    with pytest.raises(BundleError, match=r"missing column\(s\) \['y_centroid'\]"):
        read_xenium(bundle)


def test_corrupt_parquet(bundle):
    data = (bundle / "cells.parquet").read_bytes()
    (bundle / "cells.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cannot read the table .*Parquet"):
        read_xenium(bundle)


# -- polygons ----------------------------------------------------------------------------------


def test_polygons_past_the_image_edge_are_counted_and_kept(real_bundle, tmp_path):
    bundle = copy_bundle(real_bundle, tmp_path / "b", skip=())
    boundaries = pd.read_parquet(bundle / "cell_boundaries.parquet")
    cells = pd.read_parquet(bundle / "cells.parquet")
    interior = cells[cells["x_centroid"].between(300, 500) & cells["y_centroid"].between(300, 500)]["cell_id"][:10]
    moved = boundaries["cell_id"].isin(interior)
    boundaries.loc[moved, "vertex_x"] += 1000.0  # the image is 870.4 um wide
    boundaries.to_parquet(bundle / "cell_boundaries.parquet")
    slide = read_xenium(bundle)
    assert slide.n_cells == 17_865 and slide.cell_boundaries.has_polygon().all()
    assert any("135 cell polygons extend past the image edge; kept" in p for p in slide.problems)


def test_polygons_of_unknown_cells_and_nan_vertices(real_bundle, tmp_path):
    bundle = copy_bundle(real_bundle, tmp_path / "b", skip=())
    boundaries = pd.read_parquet(bundle / "cell_boundaries.parquet")
    first_cell = boundaries["cell_id"].iloc[0]
    boundaries.loc[boundaries["cell_id"] == first_cell, "cell_id"] = "stranger-1"
    second = boundaries["cell_id"].unique()[1]
    boundaries.loc[boundaries.index[boundaries["cell_id"] == second][2], "vertex_y"] = np.nan
    boundaries.to_parquet(bundle / "cell_boundaries.parquet")
    slide = read_xenium(bundle)
    assert any("1 cell polygons belong to cells not in the kept cells" in p for p in slide.problems)
    assert any("1 cell polygons have NaN vertices" in p for p in slide.problems)
    assert any("2 cells have no cell polygon" in p for p in slide.problems)
    has = slide.cell_boundaries.has_polygon()
    assert not has[slide.cells.index.get_loc(first_cell)] and not has[slide.cells.index.get_loc(second)]
    assert has.sum() == 17_865 - 2


# -- images ------------------------------------------------------------------------------------


def test_image_that_is_not_a_tiff(bundle):
    (bundle / "morphology_focus.ome.tif").write_bytes(b"this is not a TIFF file" * 100)
    with pytest.raises(BundleError, match="cannot read the image as a TIFF file") as info:
        read_xenium(bundle)
    assert "morphology_focus.ome.tif" in str(info.value) and "Fix:" in str(info.value)


def test_truncated_image(bundle):
    path = bundle / "morphology_focus.ome.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="morphology_focus.ome.tif"):
        slide = read_xenium(bundle)  # the directory may still parse ...
        slide.image.read_level(0)  # ... but the missing tiles cannot be read


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_truncated_image_is_refused_when_opened_without_tifffile_noise(bundle):
    """An interrupted copy (the last tenth missing, the directory intact): refused at once, with
    spatia's message only (tifffile's own log lines never reach the handlers that print)."""
    path = bundle / "morphology_focus.ome.tif"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    printed = _Records()
    root = logging.getLogger()
    root.addHandler(printed)
    try:
        with pytest.raises(BundleError, match=r"the image file is truncated: \d+ of its \d+ tiles lie past its end"):
            read_xenium(bundle)
    finally:
        root.removeHandler(printed)
    assert not [r for r in printed.records if r.name.startswith("tifffile")]
    result = CliRunner().invoke(app, ["info", str(bundle)])
    assert result.exit_code == 2 and "truncated" in result.output and "tifffile" not in result.output


def test_damaged_tile_fails_on_read_not_open(bundle):
    path = bundle / "morphology_focus.ome.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[17], page.databytecounts[17]  # tile row 1, column 1
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8).tobytes())
    slide = read_xenium(bundle)
    assert slide.image.read_window(0, 0, 256, 256).shape == (256, 256)  # other tiles are fine
    with pytest.raises(BundleError, match="tile 17 of the image cannot be decoded"):
        slide.image.read_window(300, 300, 10, 10)


# -- metadata and matrix -----------------------------------------------------------------------


def test_malformed_experiment_json(bundle):
    path = bundle / "experiment.xenium"
    path.write_text(path.read_text().replace('"pixel_size": 0.2125,', '"pixel_size": 0.2125,,'))
    with pytest.raises(BundleError, match=r"not valid JSON .* line 8, column 24"):
        read_xenium(bundle)
    path.write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="not an object"):
        read_xenium(bundle)
    path.write_text('{"pixel_size": "small"}')
    with pytest.raises(BundleError, match="pixel_size 'small'"):
        read_xenium(bundle)


def test_without_experiment_file_the_pixel_size_comes_from_ome(bundle):
    (bundle / "experiment.xenium").unlink()
    slide = read_xenium(bundle)
    assert slide.pixel_size_um == 0.2125 and slide.image.pixel_size_source == "ome"
    assert slide.metadata == {} and slide.slide_id == "bundle"


def test_feature_matrix_not_hdf5_or_incomplete(bundle):
    path = bundle / "cell_feature_matrix.h5"
    with h5py.File(path, "r+") as h5:
        del h5["matrix/indptr"]
    with pytest.raises(BundleError, match=r"missing matrix/\['indptr'\]"):
        read_xenium(bundle)
    path.write_bytes(b"not hdf5")
    with pytest.raises(BundleError, match="cannot read the HDF5 feature matrix"):
        read_xenium(bundle)


def test_malformed_clusters_file_is_skipped_and_counted(bundle):
    bad = bundle / "analysis/clustering/broken"
    bad.mkdir()
    (bad / "clusters.csv").write_text("cell,label\na,1\n")
    slide = read_xenium(bundle)
    assert slide.cluster_columns == ["gene_expression_graphclust"]
    assert any("clustering broken skipped" in p and "Barcode" in p for p in slide.problems)


# -- the command line ----------------------------------------------------------------------------


def test_cli_reports_a_bad_bundle_without_traceback(bundle):
    (bundle / "cells.parquet").unlink()
    result = CliRunner().invoke(app, ["info", str(bundle)])
    assert result.exit_code != 0
    assert "error:" in result.output and "cells.parquet" in result.output and "Fix:" in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, SpatiaError)  # handled by the CLI, not raised


def test_cli_bad_bundle_exit_code_is_2(bundle):
    (bundle / "cells.parquet").unlink()
    assert CliRunner().invoke(app, ["info", str(bundle)]).exit_code == 2
