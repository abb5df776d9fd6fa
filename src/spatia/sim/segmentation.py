"""Writing a segmentation as Xenium Onboard Analysis 2.x-4.x does: ``cells.zarr.zip``.

A Zarr (format 2) group, zipped with every entry stored (chunks are compressed by Zarr, zlib):

- ``cell_id``: uint32 (n_cells, 2) (prefix, suffix) of each cell's text ID ("aaaaadoa-1": the
  prefix's 8 hexadecimal digits as the letters a..p);
- ``polygon_sets/0`` (nucleus) and ``polygon_sets/1`` (cell): ``cell_index`` uint32,
  ``num_vertices`` int32 and ``vertices`` float32 (n_polygons, 2 * max_vertices), x and y
  interleaved, micrometres, the closing vertex not repeated; root attributes
  ``polygon_set_names`` (["nucleus", "cell"]), ``number_cells``, ``spatial_units``;
- ``masks/0`` and ``masks/1``: uint32 label images (0 background, cell i + 1) on the morphology
  pixel grid, and ``masks/homogeneous_transform`` float32 (4, 4): mask pixels -> micrometres.

The store is written to a folder, then zipped with sorted entry names and a fixed timestamp,
so the same inputs give the same bytes. `spatia.io.cells_zarr` reads it.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

CELLS_ZARR_FILE = "cells.zarr.zip"
POLYGON_SET_NAMES = ("nucleus", "cell")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def encode_cell_ids(ids: Sequence[str]) -> np.ndarray:
    """uint32 (n, 2) (prefix, suffix) pairs of Xenium text cell IDs ("aaaaadoa-1")."""
    out = np.zeros((len(ids), 2), dtype=np.uint32)
    for i, value in enumerate(str(v) for v in ids):
        prefix, _, suffix = value.partition("-")
        if len(prefix) != 8 or not suffix.isdigit() or any(not "a" <= c <= "p" for c in prefix):
            raise ValueError(f"{value!r} is not a Xenium cell ID (8 letters a..p, '-', a number)")
        number = 0
        for c in prefix:
            number = (number << 4) | (ord(c) - ord("a"))
        out[i] = (number, int(suffix))
    return out


def polygon_set_arrays(frame: pd.DataFrame, cell_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell_index uint32, num_vertices int32, vertices float32 (n, 2 * max_vertices)) of a long
    boundaries table (`spatia.sim.writer.boundaries_frame`: cells contiguous, closed polygons)."""
    row_of = pd.Index(np.asarray(cell_ids, dtype=object)).get_indexer(frame["cell_id"].to_numpy())
    if (row_of < 0).any():
        raise ValueError("the boundaries table names cells that are not in cell_ids")
    change = np.r_[True, row_of[1:] != row_of[:-1]]
    starts = np.flatnonzero(change)
    lengths = np.diff(np.r_[starts, len(row_of)])
    xy = frame[["vertex_x", "vertex_y"]].to_numpy(np.float32)
    first, last = xy[starts], xy[starts + lengths - 1]
    closed = (lengths > 1) & np.all(first == last, axis=1)
    n_vertices = (lengths - closed).astype(np.int32)
    width = int(n_vertices.max()) if len(n_vertices) else 0
    vertices = np.zeros((len(starts), 2 * width), dtype=np.float32)
    for k in np.unique(n_vertices):
        rows = np.flatnonzero(n_vertices == k)
        gather = starts[rows, None] + np.arange(k)[None, :]
        vertices[rows, : 2 * k] = xy[gather].reshape(len(rows), 2 * k)
    return row_of[starts].astype(np.uint32), n_vertices, vertices


def label_mask(num_vertices: np.ndarray, vertices: np.ndarray, cell_index: np.ndarray, shape_yx: tuple[int, int],
               pixel_size_um: float) -> np.ndarray:
    """uint32 label image: pixel (r, c) holds cell_index + 1 of the polygon covering its centre
    (later polygons win where two overlap), 0 elsewhere."""
    import shapely

    out = np.zeros(shape_yx, dtype=np.uint32)
    h, w = shape_yx
    for p in range(len(num_vertices)):
        k = int(num_vertices[p])
        if k < 3:
            continue
        xy_px = vertices[p, : 2 * k].reshape(k, 2).astype(np.float64) / pixel_size_um
        x0, y0 = np.maximum(np.floor(xy_px.min(axis=0)).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(xy_px.max(axis=0)).astype(int) + 1, (w, h))
        if x0 >= x1 or y0 >= y1:
            continue
        cols, rows = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        inside = shapely.contains_xy(shapely.Polygon(xy_px), cols, rows)
        block = out[y0:y1, x0:x1]
        block[inside] = int(cell_index[p]) + 1
    return out


def write_cells_zarr_zip(
    path: str | Path,
    cell_ids: Sequence[str],
    polygon_sets: dict[str, pd.DataFrame],
    *,
    image_shape_yx: tuple[int, int],
    pixel_size_um: float,
    masks: bool = True,
) -> Path:
    """Write ``cells.zarr.zip`` from long boundaries tables by set name ("nucleus", "cell")."""
    import zarr
    from numcodecs import Zlib

    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix=".cells_zarr_", dir=path.parent))
    try:
        root = zarr.open_group(store=str(work / "store"), mode="w", zarr_format=2)
        root.attrs.update({
            "major_version": 5, "minor_version": 0, "number_cells": len(cell_ids),
            "polygon_set_names": list(POLYGON_SET_NAMES), "spatial_units": "microns",
        })  # fmt: skip
        compressor = Zlib(level=1)

        def array(group, name: str, data: np.ndarray, chunk_rows: int = 65_536) -> None:
            chunks = (min(max(1, data.shape[0]), chunk_rows), *data.shape[1:])
            target = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=compressor)
            if data.size:
                target[...] = data

        array(root, "cell_id", encode_cell_ids(cell_ids))
        sets = root.create_group("polygon_sets")
        mask_group = root.create_group("masks") if masks else None
        for k, name in enumerate(POLYGON_SET_NAMES):
            if name not in polygon_sets:
                continue
            cell_index, n_vertices, vertices = polygon_set_arrays(polygon_sets[name], cell_ids)
            group = sets.create_group(str(k))
            array(group, "cell_index", cell_index)
            array(group, "num_vertices", n_vertices)
            array(group, "vertices", vertices)
            if mask_group is not None:
                labels = label_mask(n_vertices, vertices, cell_index, image_shape_yx, pixel_size_um)
                mask_group.create_array(str(k), shape=labels.shape, dtype=labels.dtype,
                                        chunks=(min(4096, labels.shape[0]), min(4096, labels.shape[1])),
                                        compressors=compressor)[...] = labels
        if mask_group is not None:
            transform = np.diag([pixel_size_um, pixel_size_um, 1.0, 1.0]).astype(np.float32)
            array(mask_group, "homogeneous_transform", transform)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for file in sorted((work / "store").rglob("*")):
                if file.is_file():
                    info = zipfile.ZipInfo(file.relative_to(work / "store").as_posix(), date_time=_ZIP_TIME)
                    info.external_attr = 0o644 << 16
                    with open(file, "rb") as fh:
                        archive.writestr(info, fh.read(), compress_type=zipfile.ZIP_STORED)
        tmp.replace(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
