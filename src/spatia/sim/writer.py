"""Writers for the 10x Xenium Onboard Analysis output formats.

Each function writes one file exactly as Xenium (and the reference bundle in
../shared/data/xenium_bone_marrow_region1) lays it out: column names and dtypes of the parquet
tables, the 10x HDF5 layout of cell_feature_matrix.h5, the tiled OME-TIFF pyramid with its
levels as SubIFDs, experiment.xenium, and the graph-clustering clusters.csv. The functions do
not validate their inputs beyond what the format needs, so tests can use them to write small,
odd or deliberately damaged bundles; `write_xenium_bundle` writes a whole bundle from a
`XeniumBundle`. Outputs are written in place: callers that need atomicity write into a
temporary folder (see `spatia.outputs.atomic_output`).

Formats (all coordinates in um unless named _px):
- cells.parquet: cell_id (string), x_centroid, y_centroid (float64), transcript_counts,
  control_probe_counts, total_counts (int64), cell_area (float64, um^2), plus any extra columns.
- cell_boundaries.parquet / nucleus_boundaries.parquet: cell_id (string), vertex_x, vertex_y
  (float32); one closed polygon per cell (first vertex repeated at the end), cells contiguous.
- cell_feature_matrix.h5: /matrix/{barcodes, data, indices, indptr, shape} (CSC, features x
  cells) and /matrix/features/{id, name, feature_type, genome, _all_tag_keys}.
- morphology_focus.ome.tif (layout v1): uint16 YX, 256 x 256 zlib tiles, BigTIFF, reduced
  levels as SubIFDs, OME-XML with PhysicalSizeX/Y and the channel name.
- morphology_focus/morphology_focus_000C.ome.tif (layout v2): one such file per channel, each
  carrying the multi-file OME-XML of the whole channel set (tifffile opens any one of them as
  the (C, Y, X) series; pass is_ome=False to read just that file's channel).
- morphology.ome.tif: the z-stack, uint16 ZYX, same tiling and pyramid.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import tifffile
from scipy import sparse

FEATURE_GENE = "Gene Expression"
FEATURE_NEGATIVE_PROBE = "Negative Control Probe"
FEATURE_NEGATIVE_CODEWORD = "Negative Control Codeword"
FEATURE_UNASSIGNED_CODEWORD = "Unassigned Codeword"
CELLS_COLUMNS = (
    "cell_id", "x_centroid", "y_centroid", "transcript_counts", "control_probe_counts", "total_counts", "cell_area",
)
CLUSTERS_RELPATH = Path("analysis/clustering/gene_expression_graphclust/clusters.csv")
V2_FOCUS_DIR = "morphology_focus"
SEGMENTATION_FORMATS = ("parquet", "zarr", "both", "none")
OME_SCHEMA = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
ZLIB_LEVEL = 1  # fast; the format (TIFF compression 8, zlib) is the same at every level
_CELL_ID_LETTERS = np.frombuffer(b"abcdefghijklmnop", dtype=np.uint8)


def xenium_cell_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` unique Xenium-style cell IDs ("aaabcdef-1": 8 letters a..p, one per hex digit),
    sorted ascending, as an object array of str."""
    if n == 0:
        return np.array([], dtype=object)
    values = np.unique(rng.integers(0, 2**32, size=n + n // 4 + 16, dtype=np.uint64))
    while len(values) < n:
        values = np.unique(np.concatenate([values, rng.integers(0, 2**32, size=n, dtype=np.uint64)]))
    values = np.sort(rng.choice(values, n, replace=False))
    shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = ((values[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.int64)
    letters = np.ascontiguousarray(_CELL_ID_LETTERS[digits]).view("S8").ravel()
    return np.char.add(letters.astype("U8"), "-1").astype(object)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def write_cells_parquet(path: str | Path, cells: pd.DataFrame) -> Path:
    """Write cells.parquet (pyarrow, snappy, a RangeIndex kept as pandas metadata as Xenium's)."""
    path = Path(path)
    cells.reset_index(drop=True).to_parquet(path, engine="pyarrow", compression="snappy")
    return path


def write_cells_csv_gz(path: str | Path, cells: pd.DataFrame) -> Path:
    """Write cells.csv.gz (same columns as cells.parquet; gzip with mtime 0, so reproducible)."""
    path = Path(path)
    cells.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0})
    return path


def boundaries_frame(cell_ids: Sequence[str], vertices_um: np.ndarray) -> pd.DataFrame:
    """Long table of closed polygons: `vertices_um` (n, K, 2) -> n * (K + 1) rows of
    cell_id (str), vertex_x, vertex_y (float32), the first vertex repeated at the end."""
    vertices_um = np.asarray(vertices_um)
    n, k, _ = vertices_um.shape
    closed = np.concatenate([vertices_um, vertices_um[:, :1]], axis=1).astype(np.float32)
    return pd.DataFrame({
        "cell_id": np.repeat(np.asarray(cell_ids, dtype=object), k + 1),
        "vertex_x": closed[..., 0].ravel(),
        "vertex_y": closed[..., 1].ravel(),
    })


def write_boundaries_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write cell_boundaries.parquet or nucleus_boundaries.parquet from a long table."""
    path = Path(path)
    frame.reset_index(drop=True).to_parquet(path, engine="pyarrow", compression="snappy")
    return path


def write_cell_feature_matrix_h5(
    path: str | Path,
    counts: sparse.spmatrix,
    barcodes: Sequence[str],
    features: pd.DataFrame,
    genome: str = "Unknown",
) -> Path:
    """Write the 10x HDF5 count matrix.

    counts: (n_cells, n_features) sparse integer matrix (stored as CSC features x cells, which
    is the cells x features CSR); features: columns id, name, feature_type in matrix order.
    Strings are fixed-length bytes sized to the longest value, as in Xenium's files.
    """
    path = Path(path)
    csr = sparse.csr_matrix(counts)
    csr.sort_indices()
    n_cells, n_features = csr.shape
    if len(barcodes) != n_cells or len(features) != n_features:
        raise ValueError(
            f"counts are {n_cells} cells x {n_features} features but there are {len(barcodes)} barcodes "
            f"and {len(features)} features"
        )

    def fixed(values: Sequence[str]) -> np.ndarray:
        return np.array([str(v).encode() for v in values], dtype="S") if len(values) else np.array([], dtype="S1")

    with h5py.File(path, "w", track_order=False) as h5:
        matrix = h5.create_group("matrix", track_order=False)
        options = {"compression": "gzip", "compression_opts": 4, "track_times": False}
        matrix.create_dataset("barcodes", data=fixed(barcodes), track_times=False)
        matrix.create_dataset("data", data=csr.data.astype(np.int32), chunks=(max(1, min(len(csr.data), 4096)),),
                              maxshape=(None,), **options)
        matrix.create_dataset("indices", data=csr.indices.astype(np.int64),
                              chunks=(max(1, min(len(csr.indices), 2048)),), maxshape=(None,), **options)
        matrix.create_dataset("indptr", data=csr.indptr.astype(np.int64), track_times=False)
        matrix.create_dataset("shape", data=np.array([n_features, n_cells], dtype=np.int32), track_times=False)
        group = matrix.create_group("features", track_order=False)
        group.create_dataset("id", data=fixed(features["id"]), track_times=False)
        group.create_dataset("name", data=fixed(features["name"]), track_times=False)
        group.create_dataset("feature_type", data=fixed(features["feature_type"]), track_times=False)
        group.create_dataset("genome", data=fixed([genome] * n_features), track_times=False)
        group.create_dataset("_all_tag_keys", data=np.array([b"genome"]), track_times=False)
    return path


def write_clusters_csv(path: str | Path, barcodes: Sequence[str], clusters: Sequence[int]) -> Path:
    """Write analysis/clustering/gene_expression_graphclust/clusters.csv (Barcode, Cluster)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"Barcode": list(barcodes), "Cluster": np.asarray(clusters, dtype=np.int64)}).to_csv(
        path, index=False
    )
    return path


def write_experiment_xenium(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write experiment.xenium (JSON)."""
    path = Path(path)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def downsample_2x(image: np.ndarray) -> np.ndarray:
    """Mean of 2 x 2 blocks over the last two axes (edge rows/columns repeated when odd)."""
    h, w = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, h % 2), (0, w % 2)]
    padded = np.pad(image, pad, mode="edge").astype(np.float32)
    mean = (padded[..., 0::2, 0::2] + padded[..., 1::2, 0::2] + padded[..., 0::2, 1::2] + padded[..., 1::2, 1::2]) / 4
    return np.rint(mean).astype(image.dtype)


def pyramid_extra_levels(shape: Sequence[int], minimum: int = 2, smallest_px: int = 1024) -> int:
    """Number of reduced levels: halve until the larger side is <= smallest_px, at least `minimum`."""
    side, extra = max(shape[-2:]), 0
    while side > smallest_px:
        side = (side + 1) // 2
        extra += 1
    return max(extra, minimum)


def _tiles(image: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Row-major tiles of each plane of a (Y, X) or (Z, Y, X) array, zero-padded at the edges."""
    planes = image.reshape((-1,) + image.shape[-2:])
    h, w = planes.shape[1:]
    for plane in planes:
        for y in range(0, h, tile_px):
            for x in range(0, w, tile_px):
                tile = plane[y : y + tile_px, x : x + tile_px]
                if tile.shape != (tile_px, tile_px):
                    padded = np.zeros((tile_px, tile_px), plane.dtype)
                    padded[: tile.shape[0], : tile.shape[1]] = tile
                    tile = padded
                yield tile


def _write_pyramid(
    writer: tifffile.TiffWriter,
    image: np.ndarray,
    n_extra: int,
    tile_px: int,
    first_page: dict[str, Any],
) -> None:
    """Level 0 tile by tile with `n_extra` SubIFD slots, then each reduced level into them."""
    options = {"dtype": image.dtype, "tile": (tile_px, tile_px), "compression": "zlib",
               "compressionargs": {"level": ZLIB_LEVEL}, "photometric": "minisblack"}
    writer.write(_tiles(image, tile_px), shape=image.shape, subifds=n_extra, software="tifffile.py",
                 **first_page, **options)
    level = image
    for _ in range(n_extra):
        level = downsample_2x(level)
        writer.write(_tiles(level, tile_px), shape=level.shape, subfiletype=1, metadata=None, **options)


def deterministic_uuid(*parts: object) -> str:
    """A UUID derived from `parts` (same parts, same UUID), for reproducible OME files."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "spatia/" + "/".join(str(p) for p in parts)))


def write_ome_tiff(
    path: str | Path,
    image: np.ndarray,
    *,
    pixel_size_um: float,
    channel_name: str = "DAPI",
    z_step_um: float | None = None,
    n_extra_levels: int | None = None,
    tile_px: int = 256,
    uuid: str | None = None,
) -> Path:
    """Write a single-channel pyramidal OME-TIFF: (Y, X) focus image or (Z, Y, X) z-stack, uint16."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint16 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint16 (Y, X) or (Z, Y, X) image, got {image.dtype} {image.shape}")
    n_extra = pyramid_extra_levels(image.shape) if n_extra_levels is None else n_extra_levels
    metadata: dict[str, Any] = {
        "axes": "YX" if image.ndim == 2 else "ZYX",
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeY": pixel_size_um,
        "Channel": {"Name": [channel_name]},
        "UUID": f"urn:uuid:{uuid or deterministic_uuid(path.name, image.shape)}",
    }
    if image.ndim == 3 and z_step_um is not None:
        metadata["PhysicalSizeZ"] = z_step_um
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        _write_pyramid(writer, image, n_extra, tile_px, {"metadata": metadata})
    return path


def _multifile_ome_xml(
    file_names: Sequence[str], uuids: Sequence[str], own: int, channel_names: Sequence[str],
    shape: tuple[int, int], pixel_size_um: float, image_name: str,
) -> str:
    channels = "".join(
        f'<Channel ID="Channel:0:{c}" SamplesPerPixel="1" Name="{name}"><LightPath/></Channel>'
        for c, name in enumerate(channel_names)
    )
    tiff_data = "".join(
        f'<TiffData FirstC="{c}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1">'
        f'<UUID FileName="{name}">urn:uuid:{u}</UUID></TiffData>'
        for c, (name, u) in enumerate(zip(file_names, uuids))
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_SCHEMA}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_SCHEMA} {OME_SCHEMA}/ome.xsd" UUID="urn:uuid:{uuids[own]}" '
        f'Creator="tifffile.py {tifffile.__version__}">'
        f'<Image ID="Image:0" Name="{image_name}"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" '
        f'SizeX="{shape[1]}" SizeY="{shape[0]}" SizeC="{len(channel_names)}" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{pixel_size_um}" PhysicalSizeY="{pixel_size_um}">{channels}{tiff_data}</Pixels></Image></OME>'
    )


def write_ome_tiff_channels(
    folder: str | Path,
    images: Sequence[np.ndarray],
    *,
    channel_names: Sequence[str],
    pixel_size_um: float,
    stem: str = "morphology_focus",
    n_extra_levels: int | None = None,
    tile_px: int = 256,
    uuid_seed: object = 0,
) -> list[Path]:
    """Write a Xenium v2 multi-file OME-TIFF set: folder/{stem}_000C.ome.tif, one channel each.

    Every file is a pyramidal single-channel TIFF whose OME-XML describes the whole set (SizeC =
    number of channels, one TiffData per file, referenced by UUID and file name).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(images) != len(channel_names) or not images:
        raise ValueError("need one channel name per image, and at least one image")
    shape = images[0].shape
    names = [f"{stem}_{c:04d}.ome.tif" for c in range(len(images))]
    uuids = [deterministic_uuid(uuid_seed, stem, name, shape) for name in names]
    n_extra = pyramid_extra_levels(shape) if n_extra_levels is None else n_extra_levels
    paths = []
    for c, image in enumerate(images):
        if image.shape != shape or image.dtype != np.uint16:
            raise ValueError(f"channel {c} is {image.dtype} {image.shape}; all must be uint16 {shape}")
        xml = _multifile_ome_xml(names, uuids, c, channel_names, shape, pixel_size_um, stem)
        path = folder / names[c]
        with tifffile.TiffWriter(path, bigtiff=True, ome=False) as writer:
            _write_pyramid(writer, image, n_extra, tile_px, {"description": xml, "metadata": None})
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# A whole bundle
# ---------------------------------------------------------------------------------------------

@dataclass
class XeniumBundle:
    """Everything `write_xenium_bundle` writes.

    cells: cells.parquet table (see module docstring); its cell_id order is the matrix order.
    cell_boundaries / nucleus_boundaries: long polygon tables (see `boundaries_frame`).
    counts: (n_cells, n_features) sparse counts; features: id, name, feature_type.
    focus_channels: uint16 (Y, X) images, DAPI first; layout "v1" writes only the first, as
      morphology_focus.ome.tif; "v2" writes all into morphology_focus/.
    zstack: optional uint16 (Z, Y, X) DAPI stack written as morphology.ome.tif.
    clusters: optional DataFrame Barcode, Cluster.
    experiment: extra keys merged into experiment.xenium.
    segmentation_format: where the polygons go: "parquet" (cell_boundaries.parquet,
      nucleus_boundaries.parquet), "zarr" (only cells.zarr.zip, as some XOA 2.x-4.x bundles),
      "both", or "none" (a bundle without segmentation).
    """

    cells: pd.DataFrame
    cell_boundaries: pd.DataFrame
    counts: sparse.spmatrix
    features: pd.DataFrame
    focus_channels: list[np.ndarray]
    pixel_size_um: float
    channel_names: list[str] = field(default_factory=lambda: ["DAPI"])
    layout: str = "v1"
    nucleus_boundaries: pd.DataFrame | None = None
    clusters: pd.DataFrame | None = None
    zstack: np.ndarray | None = None
    z_step_um: float = 3.0
    experiment: dict[str, Any] = field(default_factory=dict)
    write_cells_csv: bool = True
    tile_px: int = 256
    segmentation_format: str = "parquet"


def experiment_payload(bundle: XeniumBundle) -> dict[str, Any]:
    """experiment.xenium content for a bundle (Xenium keys; major_version 1 or 2 by layout)."""
    n_genes = int((bundle.features["feature_type"] == FEATURE_GENE).sum())
    images: dict[str, str] = {}
    if bundle.zstack is not None:
        images["morphology_filepath"] = "morphology.ome.tif"
    if bundle.layout == "v2":
        images["morphology_focus_filepath"] = f"{V2_FOCUS_DIR}/{V2_FOCUS_DIR}_0000.ome.tif"
    else:
        images["morphology_focus_filepath"] = "morphology_focus.ome.tif"
    payload: dict[str, Any] = {
        "major_version": 2 if bundle.layout == "v2" else 1,
        "minor_version": 0,
        "run_name": "spatia_simulated",
        "region_name": "simulated_region",
        "panel_name": "spatia simulated panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": n_genes,
        "panel_num_targets_custom": 0,
        "pixel_size": bundle.pixel_size_um,
        "num_cells": int(len(bundle.cells)),
        "z_step_size": bundle.z_step_um,
        "images": images,
    }
    payload.update(bundle.experiment)
    return payload


def write_xenium_bundle(out_dir: str | Path, bundle: XeniumBundle, *, uuid_seed: object = 0) -> dict[str, Path]:
    """Write a Xenium output folder into `out_dir` (created if missing); returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if bundle.layout not in ("v1", "v2"):
        raise ValueError(f"layout must be 'v1' or 'v2', not {bundle.layout!r}")
    if bundle.segmentation_format not in SEGMENTATION_FORMATS:
        raise ValueError(f"segmentation_format must be one of {SEGMENTATION_FORMATS}, not {bundle.segmentation_format!r}")
    written: dict[str, Path] = {}
    written["experiment.xenium"] = write_experiment_xenium(out / "experiment.xenium", experiment_payload(bundle))
    written["cells.parquet"] = write_cells_parquet(out / "cells.parquet", bundle.cells)
    if bundle.write_cells_csv:
        written["cells.csv.gz"] = write_cells_csv_gz(out / "cells.csv.gz", bundle.cells)
    if bundle.segmentation_format in ("parquet", "both"):
        written["cell_boundaries.parquet"] = write_boundaries_parquet(out / "cell_boundaries.parquet",
                                                                      bundle.cell_boundaries)
        if bundle.nucleus_boundaries is not None:
            written["nucleus_boundaries.parquet"] = write_boundaries_parquet(
                out / "nucleus_boundaries.parquet", bundle.nucleus_boundaries
            )
    if bundle.segmentation_format in ("zarr", "both"):
        from spatia.sim.segmentation import CELLS_ZARR_FILE, write_cells_zarr_zip

        sets = {"cell": bundle.cell_boundaries}
        if bundle.nucleus_boundaries is not None:
            sets["nucleus"] = bundle.nucleus_boundaries
        written[CELLS_ZARR_FILE] = write_cells_zarr_zip(
            out / CELLS_ZARR_FILE, list(bundle.cells["cell_id"]), sets,
            image_shape_yx=bundle.focus_channels[0].shape[-2:], pixel_size_um=bundle.pixel_size_um,
        )
    written["cell_feature_matrix.h5"] = write_cell_feature_matrix_h5(
        out / "cell_feature_matrix.h5", bundle.counts, list(bundle.cells["cell_id"]), bundle.features
    )
    if bundle.clusters is not None:
        written["clusters.csv"] = write_clusters_csv(
            out / CLUSTERS_RELPATH, bundle.clusters["Barcode"], bundle.clusters["Cluster"]
        )
    if bundle.layout == "v1":
        written["morphology_focus.ome.tif"] = write_ome_tiff(
            out / "morphology_focus.ome.tif", bundle.focus_channels[0], pixel_size_um=bundle.pixel_size_um,
            channel_name=bundle.channel_names[0], tile_px=bundle.tile_px,
            uuid=deterministic_uuid(uuid_seed, "morphology_focus.ome.tif"),
        )
    else:
        paths = write_ome_tiff_channels(
            out / V2_FOCUS_DIR, bundle.focus_channels, channel_names=bundle.channel_names,
            pixel_size_um=bundle.pixel_size_um, tile_px=bundle.tile_px, uuid_seed=uuid_seed,
        )
        for path in paths:
            written[f"{V2_FOCUS_DIR}/{path.name}"] = path
    if bundle.zstack is not None:
        written["morphology.ome.tif"] = write_ome_tiff(
            out / "morphology.ome.tif", bundle.zstack, pixel_size_um=bundle.pixel_size_um,
            channel_name=bundle.channel_names[0], z_step_um=bundle.z_step_um, tile_px=bundle.tile_px,
            uuid=deterministic_uuid(uuid_seed, "morphology.ome.tif"),
        )
    return written
