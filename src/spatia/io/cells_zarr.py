"""The segmentation store of Xenium Onboard Analysis 2.x-4.x: ``cells.zarr.zip``.

A zipped Zarr (format 2) group, its entries stored uncompressed in the zip (each chunk is
compressed by Zarr itself):

- ``cell_id``: uint32 (n_cells, 2): each cell's ID as (prefix, dataset suffix); the text ID is
  the prefix's 8 hexadecimal digits written with the letters a..p, then ``-`` and the suffix
  (``(992, 1)`` -> ``"aaaaadoa-1"``), as in cells.parquet;
- ``polygon_sets/<k>/``: one polygon set per segmentation (root attribute
  ``polygon_set_names``, e.g. ``["nucleus", "cell"]``; without it set 0 is the nucleus and set 1
  the cell): ``cell_index`` (row of ``cell_id`` each polygon belongs to), ``num_vertices`` and
  ``vertices`` (float32 (n_polygons, 2 * max_vertices), x and y interleaved, micrometres);
- ``masks/<k>``: the label images of the same segmentations and ``masks/homogeneous_transform``
  (mask pixels -> micrometres); the readers here do not need them (the builder rasterises the
  polygons itself).

The simulator writes this layout (`spatia.sim.segmentation`). `polygon_batches` yields the polygons in the shape `spatia.io.polygons.scan_polygons` reads a
boundaries table in, so the same rules apply to both sources. The Zarr package opens the store
in place (no extraction); only the chunks of the rows read are decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spatia.errors import BundleError

CELLS_ZARR_FILE = "cells.zarr.zip"
DEFAULT_POLYGON_SETS = {"nucleus": 0, "cell": 1}
"""Polygon set index of each segmentation when the store does not name its sets."""
_LETTERS = np.frombuffer(b"abcdefghijklmnop", dtype=np.uint8)
_FIX = "the segmentation store is damaged: copy cells.zarr.zip again from the Xenium output folder"


def decode_cell_ids(pairs: np.ndarray) -> np.ndarray:
    """Xenium text cell IDs (object array of str) from uint32 (n, 2) (prefix, suffix) pairs."""
    pairs = np.asarray(pairs).reshape(-1, 2).astype(np.uint64)
    shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = ((pairs[:, :1] >> shifts[None, :]) & np.uint64(15)).astype(np.int64)
    letters = np.ascontiguousarray(_LETTERS[digits]).view("S8").ravel().astype("U8")
    return np.char.add(np.char.add(letters, "-"), pairs[:, 1].astype(np.int64).astype(str)).astype(object)


def open_cells_zarr(path: Path):
    """The store's root group, opened read-only in place; `BundleError` if it cannot be."""
    import zarr

    try:
        store = zarr.storage.ZipStore(str(path), mode="r")
        return zarr.open_group(store=store, mode="r")
    except FileNotFoundError:
        raise BundleError("the segmentation store does not exist", path=path) from None
    except Exception as exc:  # zipfile.BadZipFile, zarr's own errors, JSON errors
        raise BundleError(f"cannot open the segmentation store ({type(exc).__name__}: {exc})", path=path,
                          fix=_FIX) from None


def polygon_set_index(group: Any, what: str) -> int | None:
    """Index of the polygon set of `what` ("cell" or "nucleus") in an opened store; None when
    the store holds no such set."""
    names = group.attrs.get("polygon_set_names")
    sets = group.get("polygon_sets")
    if sets is None:
        return None
    if names is not None:
        names = [str(n).lower() for n in names]
        index = names.index(what) if what in names else None
    else:
        index = DEFAULT_POLYGON_SETS.get(what)
    if index is None or str(index) not in sets:
        return None
    return index


def polygon_batches(path: Path, what: str, max_vertices: int) -> Iterator[tuple]:
    """The `what` polygons of a cells.zarr.zip as batches of at most about `max_vertices`
    vertices: ((cell IDs, per-vertex index into them), x_um, y_um, per-vertex polygon number),
    polygons in store order. Yields nothing when the store has no such polygon set."""
    group = open_cells_zarr(path)
    try:
        index = polygon_set_index(group, what)
        if index is None:
            return
        polygons = group["polygon_sets"][str(index)]
        cell_ids = decode_cell_ids(group["cell_id"][...])
        cell_index = np.asarray(polygons["cell_index"][...], dtype=np.int64)
        n_vertices = np.asarray(polygons["num_vertices"][...], dtype=np.int64)
        vertices = polygons["vertices"]
        n_polygons, width = vertices.shape[0], vertices.shape[1]
        if len(cell_index) != n_polygons or len(n_vertices) != n_polygons or width % 2:
            raise BundleError(
                f"polygon set {index}: {n_polygons} vertex rows, {len(cell_index)} cell indices and "
                f"{len(n_vertices)} vertex counts do not match", path=path, fix=_FIX)
        if n_polygons and (cell_index.min() < 0 or cell_index.max() >= len(cell_ids)
                           or n_vertices.min() < 0 or n_vertices.max() > width // 2):
            raise BundleError(f"polygon set {index}: a cell index or vertex count is out of range", path=path, fix=_FIX)
        step = max(1, max_vertices // max(1, width // 2))
        for first in range(0, n_polygons, step):
            stop = min(n_polygons, first + step)
            block = np.asarray(vertices[first:stop], dtype=np.float64).reshape(stop - first, -1, 2)
            counts = n_vertices[first:stop]
            keep = np.arange(block.shape[1])[None, :] < counts[:, None]
            xy = block[keep]
            owner = np.repeat(np.arange(stop - first), counts)
            yield (
                (cell_ids[cell_index[first:stop]], owner),
                xy[:, 0],
                xy[:, 1],
                owner + first,
            )
    except BundleError:
        raise
    except Exception as exc:  # a damaged chunk or array
        raise BundleError(f"cannot read the {what} polygons ({type(exc).__name__}: {exc})", path=path, fix=_FIX) from None
