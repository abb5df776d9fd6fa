"""cells.zarr.zip (Xenium Onboard Analysis 2.x-4.x segmentation): written by the simulator, read
by `read_xenium` where the Parquet boundaries are absent, with the same polygons."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from spatia.errors import BundleError
from spatia.io import read_xenium
from spatia.io.cells_zarr import decode_cell_ids, open_cells_zarr
from spatia.sim import SimulationConfig, simulate_bundle
from spatia.sim.segmentation import encode_cell_ids
from helpers import copy_bundle

PARQUET_BOUNDARIES = ("cell_boundaries.parquet", "nucleus_boundaries.parquet")


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> Path:
    """A 300-cell bundle with its segmentation in both layouts."""
    out = tmp_path_factory.mktemp("zarr") / "both"
    simulate_bundle(out, SimulationConfig(n_cells=300, n_genes=140, segmentation_format="both"), seed=3)
    return out


def test_cell_ids_encode_as_xenium_documents():
    """The documented example: prefix 992 with suffix 1 is "aaaaadoa-1"; round trips."""
    assert decode_cell_ids(np.array([[992, 1]], dtype=np.uint32)).tolist() == ["aaaaadoa-1"]
    ids = ["aaaaadoa-1", "pppppppp-2", "aaaaaaaa-1", "ffkpbaba-12"]
    np.testing.assert_array_equal(decode_cell_ids(encode_cell_ids(ids)), np.array(ids, dtype=object))
    with pytest.raises(ValueError):
        encode_cell_ids(["cell_1"])


def test_store_layout_matches_xenium(both):
    archive = zipfile.ZipFile(both / "cells.zarr.zip")
    assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    names = set(archive.namelist())
    for entry in ("cell_id/.zarray", "polygon_sets/0/vertices/.zarray", "polygon_sets/1/cell_index/.zarray",
                  "polygon_sets/1/num_vertices/.zarray", "masks/0/.zarray", "masks/1/.zarray",
                  "masks/homogeneous_transform/.zarray"):
        assert entry in names
    group = open_cells_zarr(both / "cells.zarr.zip")
    assert list(group.attrs["polygon_set_names"]) == ["nucleus", "cell"]
    assert group["cell_id"].dtype == np.uint32 and group["cell_id"].shape == (300, 2)
    np.testing.assert_allclose(group["masks"]["homogeneous_transform"][...], np.diag([0.2125, 0.2125, 1, 1]), rtol=1e-6)


def test_zarr_only_bundle_reads_the_same_polygons_as_parquet(both, tmp_path):
    only = copy_bundle(both, tmp_path / "only_zarr", skip=PARQUET_BOUNDARIES)
    expected, got = read_xenium(both), read_xenium(only)
    assert got.cells.index.equals(expected.cells.index)
    for key in ("cell_boundaries", "nucleus_boundaries"):
        a, b = getattr(expected, key), getattr(got, key)
        np.testing.assert_array_equal(b.offsets, a.offsets)
        np.testing.assert_allclose(b.vertices_um, a.vertices_um, rtol=0, atol=0)
    assert "cells.zarr.zip" in {Path(p).name for p in got.files_read}
    deferred = read_xenium(only, in_memory=False).deferred
    assert deferred.cell_boundaries.name == "cells.zarr.zip"


def test_label_masks_hold_each_cell_under_its_centroid(both):
    """Known answer from the geometry: the cell mask at a cell's centroid pixel is that cell."""
    slide = read_xenium(both)
    group = open_cells_zarr(both / "cells.zarr.zip")
    mask = group["masks"]["1"][...]
    assert mask.shape == slide.image.level_shapes_yx[0]
    x = np.floor(slide.cells["x_centroid_px"].to_numpy()).astype(int)
    y = np.floor(slide.cells["y_centroid_px"].to_numpy()).astype(int)
    inside = (x >= 0) & (y >= 0) & (x < mask.shape[1]) & (y < mask.shape[0])
    hit = mask[y[inside], x[inside]] == np.flatnonzero(inside) + 1
    assert hit.mean() > 0.97


def test_same_seed_same_store_bytes(both, tmp_path):
    again = tmp_path / "again"
    simulate_bundle(again, SimulationConfig(n_cells=300, n_genes=140, segmentation_format="zarr"), seed=3)
    assert (again / "cells.zarr.zip").read_bytes() == (both / "cells.zarr.zip").read_bytes()
    assert not (again / "cell_boundaries.parquet").exists()


def test_damaged_store_and_missing_polygon_set(both, tmp_path):
    bad = copy_bundle(both, tmp_path / "bad", skip=PARQUET_BOUNDARIES)
    (bad / "cells.zarr.zip").write_bytes(b"not a zip archive")
    with pytest.raises(BundleError, match="cells.zarr.zip|segmentation store"):
        read_xenium(bad)

    no_nucleus = copy_bundle(both, tmp_path / "no_nucleus", skip=PARQUET_BOUNDARIES + ("cells.zarr.zip",))
    with zipfile.ZipFile(both / "cells.zarr.zip") as src, zipfile.ZipFile(no_nucleus / "cells.zarr.zip", "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith("polygon_sets/0/"):
                dst.writestr(info, src.read(info))
    slide = read_xenium(no_nucleus)
    assert slide.cell_boundaries.has_polygon().all()
    assert not slide.nucleus_boundaries.has_polygon().any()
    assert any("no nucleus vertices" in p for p in slide.problems)
