"""Builds that would give a wrong or empty dataset stop with a clear error (and leave nothing
behind); each has an explicit option to accept it. Segmentation from cells.zarr.zip builds the
same records as from the Parquet boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spatia.errors import ConfigError, InputDataError
from spatia.mist import BuildConfig, build_dataset
from helpers import copy_bundle

CONFIG = BuildConfig.cpu()


@pytest.fixture(scope="module")
def both(bundle_both_segmentations) -> Path:
    """conftest's 600-cell bundle with Parquet and cells.zarr.zip segmentation (copied to damage)."""
    return bundle_both_segmentations


def _relabel_boundaries(bundle: Path, fraction: float) -> None:
    """Give `fraction` of the cells' polygons IDs that the cells table does not know."""
    path = bundle / "cell_boundaries.parquet"
    frame = pd.read_parquet(path)
    ids = frame["cell_id"].unique()
    unknown = set(ids[: int(round(fraction * len(ids)))])
    frame["cell_id"] = [f"unknown_{c}" if c in unknown else c for c in frame["cell_id"]]
    frame.to_parquet(path)


def test_zarr_only_segmentation_builds_the_same_records(both, tmp_path):
    parquet = copy_bundle(both, tmp_path / "parquet" / "bundle", skip=("cells.zarr.zip",))  # same folder name:
    zarr_only = copy_bundle(both, tmp_path / "zarr" / "bundle",  # the same slide ID
                            skip=("cell_boundaries.parquet", "nucleus_boundaries.parquet"))
    a = build_dataset([parquet], tmp_path / "a", CONFIG, seed=0)
    b = build_dataset([zarr_only], tmp_path / "b", CONFIG, seed=0)
    assert a.n_cells == b.n_cells > 500
    for level in ("cell", "niche", "tissue"):  # records byte for byte (images, masks, counts, metadata)
        assert (a.path / f"{level}.lmdb" / "data.mdb").read_bytes() == (b.path / f"{level}.lmdb" / "data.mdb").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a.path / "cell_index.parquet"), pd.read_parquet(b.path / "cell_index.parquet"))


def test_no_segmentation_is_refused_unless_circles_are_asked_for(both, tmp_path):
    bare = copy_bundle(both, tmp_path / "bare", skip=("cells.zarr.zip", "cell_boundaries.parquet", "nucleus_boundaries.parquet"))
    out = tmp_path / "refused"
    with pytest.raises(InputDataError, match="no cell segmentation") as error:
        build_dataset([bare], out, CONFIG, seed=0)
    assert "--segmentation circles --radius-um" in str(error.value)
    assert not out.exists()
    with pytest.raises(ConfigError, match="circle_radius_um"):
        BuildConfig.cpu(segmentation="circles")

    radius = 6.0
    summary = build_dataset([bare], tmp_path / "circles", BuildConfig.cpu(segmentation="circles", circle_radius_um=radius), seed=0)
    assert summary.n_cells > 500
    area = pd.read_parquet(summary.path / "cell_index.parquet")["polygon_area_um2"].to_numpy()
    n = 32  # a regular 32-gon of circumradius r: area = n r^2 sin(2 pi / n) / 2
    np.testing.assert_allclose(area, n * radius**2 * np.sin(2 * np.pi / n) / 2, rtol=1e-6)


def test_disagreeing_pixel_sizes_are_refused_unless_accepted(simulated_bundle, tmp_path):
    bundle = copy_bundle(simulated_bundle, tmp_path / "bundle")
    experiment = json.loads((bundle / "experiment.xenium").read_text())
    experiment["pixel_size"] = 10 * experiment["pixel_size"]
    (bundle / "experiment.xenium").write_text(json.dumps(experiment))
    out = tmp_path / "refused"
    with pytest.raises(InputDataError, match=r"pixel size is 2\.125 um/px but .* OME metadata says 0\.2125") as error:
        build_dataset([bundle], out, CONFIG, seed=0)
    assert "accept-pixel-size-mismatch" in str(error.value)
    assert not out.exists()
    accepted = BuildConfig.cpu(accept_pixel_size_mismatch=True, accept_cell_loss=True)
    summary = build_dataset([bundle], tmp_path / "accepted", accepted, seed=0)
    assert summary.n_cells > 0


def test_losing_most_cells_to_one_cause_is_refused_and_leaves_nothing(simulated_bundle, tmp_path):
    bundle = copy_bundle(simulated_bundle, tmp_path / "bundle")
    _relabel_boundaries(bundle, 0.6)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory stays, empty
    with pytest.raises(InputDataError, match=r"would keep \d+ of 3000 cells: \d+ of 3000 cells are skipped as 'no_polygon'") as error:
        build_dataset([bundle], out, CONFIG, seed=0)
    assert "accept-cell-loss" in str(error.value) and "boundary file" in str(error.value)
    assert out.is_dir() and not any(out.iterdir())

    summary = build_dataset([bundle], out, BuildConfig.cpu(accept_cell_loss=True), seed=0)
    assert 1000 < summary.n_cells < 1300 and summary.skipped["no_polygon"] >= 1800


def test_a_build_that_keeps_no_cell_is_always_refused(simulated_bundle, tmp_path):
    bundle = copy_bundle(simulated_bundle, tmp_path / "bundle")
    _relabel_boundaries(bundle, 1.0)
    with pytest.raises(InputDataError, match="keeps no cell: 3000 of 3000 cells are skipped as 'no_polygon'"):
        build_dataset([bundle], tmp_path / "a", CONFIG, seed=0)
    with pytest.raises(InputDataError, match="the build keeps no cell"):
        build_dataset([bundle], tmp_path / "b", BuildConfig.cpu(accept_cell_loss=True), seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_blocks_split_without_train_cells_is_built_with_a_warning(simulated_bundle, tmp_path, caplog):
    """Every train cell within the buffer of a held-out block: the dataset is still written (it can
    be embedded with a pretrained model); the build warns, and `spatia pretrain` refuses it
    (tests/test_train_data.py)."""
    with caplog.at_level("WARNING", logger="spatia.mist.build.run"):
        summary = build_dataset([simulated_bundle], tmp_path / "a", BuildConfig.cpu(split_buffer_um=1e6), seed=0)
    assert "leaves no train cell" in caplog.text and "another --seed" in caplog.text
    assert summary.splits["cell"].get("train", 0) == 0 and summary.n_cells > 0


def test_dataset_info_of_a_slide_that_kept_no_cell_formats(simulated_bundle, tmp_path):
    """Two slides, the second keeping no cell (accepted): `spatia dataset-info` prints, JSON too."""
    from typer.testing import CliRunner

    from spatia.cli import app
    from spatia.mist.info import dataset_info

    empty = copy_bundle(simulated_bundle, tmp_path / "empty")
    _relabel_boundaries(empty, 1.0)
    summary = build_dataset([simulated_bundle, empty], tmp_path / "dataset", BuildConfig.cpu(accept_cell_loss=True), seed=0)
    info = dataset_info(summary.path)
    assert [s["n_cells"] for s in info["slides"]] == [summary.n_cells, 0]
    assert all(np.isnan(v) for v in info["slides"][1]["intensity_range"])
    for args in (["dataset-info", str(summary.path)], ["dataset-info", str(summary.path), "--json"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "empty" in result.output


def test_an_output_place_that_cannot_take_the_dataset_is_a_clear_error(simulated_bundle, tmp_path, monkeypatch):
    """A full disk while records are written (LMDB's own error), then a resume once there is
    room; an output path under a file. Both are `OutputWriteError`, never a traceback."""
    import lmdb

    from spatia.errors import OutputWriteError
    from spatia.mist.build import stores

    real_write = stores.write_records
    calls = {"n": 0}

    def full_disk(env, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise lmdb.Error("mdb_txn_commit: No space left on device")
        real_write(env, items)

    monkeypatch.setattr(stores.BuildStores, "FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(stores, "write_records", full_disk)
    out = tmp_path / "dataset"
    with pytest.raises(OutputWriteError, match="no space left on device") as error:
        build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert "rerunning the same command resumes" in str(error.value)
    assert (out / ".build" / "state.json").exists()  # kept: the build resumes
    monkeypatch.setattr(stores, "write_records", real_write)
    assert build_dataset([simulated_bundle], out, CONFIG, seed=0).n_cells > 2900

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputWriteError, match="a parent of the path is a file"):
        build_dataset([simulated_bundle], blocker / "dataset", CONFIG, seed=0)


def _no_gene_features(bundle: Path) -> None:
    from spatia.io.matrix import read_feature_matrix
    from helpers import write_10x_h5

    m = read_feature_matrix(bundle / "cell_feature_matrix.h5")
    write_10x_h5(bundle / "cell_feature_matrix.h5", m.counts, m.barcodes, m.feature_ids, m.feature_names,
                 ["Negative Control Probe"] * len(m.feature_ids))


def _image_a_quarter_wide(bundle: Path) -> None:
    import tifffile

    from spatia.sim.writer import write_ome_tiff

    path = bundle / "morphology_focus.ome.tif"
    image = tifffile.imread(path)
    write_ome_tiff(path, np.ascontiguousarray(image[: image.shape[0] // 4, : image.shape[1] // 4]), pixel_size_um=0.2125)


@pytest.mark.parametrize("damage, reason, hint", [
    (_no_gene_features, "zero_counts", "no 'Gene Expression' feature"),
    (_image_a_quarter_wide, "outside_image", "centroids lie outside the morphology image"),
])
def test_each_cause_of_loss_is_named_with_its_fix(both, tmp_path, damage, reason, hint):
    bundle = copy_bundle(both, tmp_path / "bundle", skip=("cells.zarr.zip",))
    damage(bundle)
    with pytest.raises(InputDataError, match=rf"skipped as '{reason}'") as error:
        build_dataset([bundle], tmp_path / "out", CONFIG, seed=0)
    assert hint in str(error.value) and "accept-cell-loss" in str(error.value)
    assert not (tmp_path / "out").exists()
