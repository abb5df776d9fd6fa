"""SpatialData in and out (optional extra spatia[spatialdata]): XeniumSlide.to_spatialdata,
read_spatialdata, building a MIST dataset from a SpatialData object, a .zarr store, and
spatialdata-io's Xenium reader. Skipped with a reason where spatialdata is not installed."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

spatialdata = pytest.importorskip(
    "spatialdata", reason="spatialdata is not installed (optional extra: pip install 'spatia[spatialdata]')")

from helpers import decoded_records
from spatialdata.transformations import Identity, Scale, get_transformation

from spatia import stages
from spatia.errors import ConfigError, InputDataError
from spatia.io import read_xenium
from spatia.io.spatialdata import read_spatialdata
from spatia.mist import BuildConfig, build_dataset

CONFIG = BuildConfig.cpu()


@pytest.fixture(scope="module")
def bundle(bundle_both_segmentations) -> Path:
    """conftest's 600-cell bundle with Parquet and cells.zarr.zip segmentation."""
    return bundle_both_segmentations


@pytest.fixture(scope="module")
def slide(bundle):
    return read_xenium(bundle)


@pytest.fixture(scope="module")
def sdata(slide):
    return slide.to_spatialdata()


@pytest.fixture(scope="module")
def bundle_dataset(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd_mist") / "from_bundle"
    build_dataset([bundle], out, CONFIG, seed=0)
    return out


def assert_same_slide(got, want, *, nucleus: bool = True) -> None:
    """Same cells (order), counts, genes, polygons, centroids (um) and pixel size."""
    assert list(got.cells.index) == list(want.cells.index)
    assert got.gene_names == want.gene_names
    assert (got.counts != want.counts).nnz == 0 and got.counts.shape == want.counts.shape
    np.testing.assert_allclose(got.cells[["x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"]],
                               want.cells[["x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"]])
    assert got.pixel_size_um == pytest.approx(want.pixel_size_um, rel=1e-12)
    pairs = [(got.cell_boundaries, want.cell_boundaries)]
    if nucleus:
        pairs.append((got.nucleus_boundaries, want.nucleus_boundaries))
    for a, b in pairs:
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.vertices_um, b.vertices_um)


def assert_same_pixels(got_image, want_image, *, all_levels: bool = True) -> None:
    """Every pyramid level (or level 0), whole, and a window over the top-left edge (0-padded)."""
    if all_levels:
        assert got_image.level_shapes_yx == want_image.level_shapes_yx
    for level in range(want_image.n_levels if all_levels else 1):
        np.testing.assert_array_equal(got_image.read_level(level), want_image.read_level(level))
        np.testing.assert_array_equal(got_image.read_window(-7, -3, 50, 40, level=level, channel="DAPI"),
                                      want_image.read_window(-7, -3, 50, 40, level=level, channel="DAPI"))


def assert_same_dataset(got: Path, want: Path) -> None:
    """Same cells in the same order, geometry and split, and the same cell records."""
    a, b = pd.read_parquet(got / "cell_index.parquet"), pd.read_parquet(want / "cell_index.parquet")
    assert len(a) == len(b) > 0
    columns = ["key", "cell_id", "niche_id", "tissue_id", "split", "x_centroid_um", "y_centroid_um", "crop_x_px",
               "crop_y_px", "bbox_side_px", "polygon_area_um2", "total_counts"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    records_a, records_b = decoded_records(got, "cell"), decoded_records(want, "cell")
    assert records_a.keys() == records_b.keys()
    for key in list(records_b)[:100]:
        ra, rb = records_a[key], records_b[key]
        np.testing.assert_array_equal(ra.image, rb.image)
        np.testing.assert_array_equal(ra.mask, rb.mask)
        np.testing.assert_array_equal(ra.indices, rb.indices)
        np.testing.assert_array_equal(ra.values, rb.values)


def test_to_spatialdata_lays_out_elements_as_spatialdata_io(slide, sdata):
    assert set(sdata.images) == {"morphology_focus"}
    assert set(sdata.shapes) == {"cell_boundaries", "nucleus_boundaries", "cell_circles"}
    assert set(sdata.tables) == {"table"}
    assert sdata.coordinate_systems == ["global"]
    assert get_transformation(sdata["morphology_focus"], "global") == Identity()
    scale = get_transformation(sdata["cell_boundaries"], "global")
    assert isinstance(scale, Scale)
    np.testing.assert_allclose(scale.scale, [1 / slide.pixel_size_um] * 2)

    table = sdata["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("cell_circles", "region", "cell_id")
    assert list(table.obs["cell_id"]) == list(slide.cells.index) == list(sdata["cell_circles"].index)
    assert {"cell_area", "nucleus_area", "transcript_counts"} <= set(table.obs.columns)
    np.testing.assert_array_equal(table.X.toarray(), slide.counts.toarray())
    np.testing.assert_array_equal(table.obsm["spatial"], slide.cells[["x_centroid_um", "y_centroid_um"]].to_numpy())
    np.testing.assert_allclose(sdata["cell_circles"]["radius"], np.sqrt(slide.cells["cell_area_um2"] / np.pi))

    # the image is lazy (dask) and holds the TIFF's own pyramid levels
    tree = sdata["morphology_focus"]
    assert list(tree.children) == [f"scale{k}" for k in range(slide.image.n_levels)]
    level1 = tree["scale1"]["image"]
    assert type(level1.data).__name__ == "Array" and level1.dims == ("c", "y", "x")
    assert list(level1.coords["c"].values) == ["DAPI"]
    np.testing.assert_array_equal(level1.data[0].compute(), slide.image.read_level(1))


def test_round_trip_gives_the_same_slide(slide, sdata):
    back = read_spatialdata(sdata)
    assert back.slide_id == slide.slide_id
    assert_same_slide(back, slide)
    assert_same_pixels(back.image, slide.image)
    assert back.problems == []


def test_build_from_spatialdata_object_and_zarr_store_equals_build_from_bundle(sdata, bundle_dataset, tmp_path):
    build_dataset([read_spatialdata(sdata)], tmp_path / "from_object", CONFIG, seed=0)
    assert_same_dataset(tmp_path / "from_object", bundle_dataset)

    store = tmp_path / "slide.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr's notice about its future defaults
        warnings.simplefilter("ignore", DeprecationWarning)  # ome-zarr's, about its own Scaler
        sdata.write(store)
    result = stages.build([store], tmp_path / "from_store", CONFIG, seed=0)  # what `spatia build slide.zarr` runs
    assert result.figures["cells"] == len(pd.read_parquet(bundle_dataset / "cell_index.parquet"))
    assert_same_dataset(tmp_path / "from_store", bundle_dataset)


def test_spatialdata_io_xenium_reader_output_builds_the_same_cells(bundle, slide, bundle_dataset, tmp_path):
    spatialdata_io = pytest.importorskip("spatialdata_io", reason="spatialdata-io is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # it cannot parse the simulator's software version
        # morphology_mip=False: the simulator writes no morphology_mip.ome.tif, which the reader
        # opens for every bundle whose version it cannot parse (real v1 bundles have one)
        theirs = spatialdata_io.xenium(bundle, transcripts=False, morphology_mip=False)
    got = read_spatialdata(theirs, slide_id=slide.slide_id)
    assert_same_slide(got, slide)
    # level 0 only: spatialdata-io makes its own pyramid (2x mean-coarsened, 5 levels) from it
    assert got.image.level_shapes_yx[0] == slide.image.level_shapes_yx[0]
    assert_same_pixels(got.image, slide.image, all_levels=False)
    build_dataset([got], tmp_path / "from_spatialdata_io", CONFIG, seed=0)
    assert_same_dataset(tmp_path / "from_spatialdata_io", bundle_dataset)


@pytest.mark.real_data
def test_real_section_round_trips_and_builds_the_same_cells(tmp_path):
    """The real breast section (3 pyramid levels, integer cell IDs) out and back, and built."""
    bundle = Path(__file__).resolve().parents[2] / "shared" / "data" / "xenium_breast_cancer_left"
    if not (bundle / "cells.parquet").exists():
        pytest.skip(f"real Xenium bundle not found at {bundle}")
    slide = read_xenium(bundle)
    back = read_spatialdata(slide.to_spatialdata())
    assert_same_slide(back, slide, nucleus=False)
    assert_same_pixels(back.image, slide.image)
    build_dataset([bundle], tmp_path / "from_bundle", CONFIG, seed=0)
    build_dataset([back], tmp_path / "from_spatialdata", CONFIG, seed=0)
    assert_same_dataset(tmp_path / "from_spatialdata", tmp_path / "from_bundle")


def test_missing_elements_are_named_with_a_fix(sdata, tmp_path):
    def without(kind: str, name: str):
        elements = {k: dict(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
        del elements[kind][name]
        return spatialdata.SpatialData(**elements)

    with pytest.raises(InputDataError, match=r"no table element 'table'(.|\n)*Fix: pass table="):
        read_spatialdata(without("tables", "table"))
    with pytest.raises(InputDataError, match=r"no image element named 'morphology_focus' or 'morphology_mip'"):
        image = sdata["morphology_focus"]
        read_spatialdata(spatialdata.SpatialData(images={"a": image, "b": image}, shapes=dict(sdata.shapes),
                                                 tables=dict(sdata.tables)))
    with pytest.raises(InputDataError, match=r"no shapes element 'cell_boundaries'(.|\n)*cells_boundaries=True"):
        read_spatialdata(without("shapes", "cell_boundaries"))
    with pytest.raises(InputDataError, match=r"no transformation to the coordinate system 'microns'"):
        read_spatialdata(sdata, coordinate_system="microns")
    with pytest.raises(InputDataError, match="not a SpatialData .zarr store"):
        read_spatialdata(tmp_path)
    table = sdata["table"].copy()
    del table.obsm["spatial"]
    with pytest.raises(InputDataError, match=r"obsm\['spatial'\]"):
        read_spatialdata(spatialdata.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                                                 tables={"table": table}))


def test_to_spatialdata_refuses_a_slide_read_without_its_tables(bundle):
    with pytest.raises(ConfigError, match="in_memory=False"):
        read_xenium(bundle, in_memory=False).to_spatialdata()
