"""The sources of a build: loading a slide, and the fingerprints a resumed build must match."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

GROUND_TRUTH_FILE = "ground_truth.parquet"
"""The simulator's per-cell ground truth, read beside a bundle when present."""
_SHA_BLOCK = 4 * 2**20


def load_source(source: Any):
    """A `XeniumSlide` (or any object with the same attributes) from a path or an object."""
    if isinstance(source, (str, Path)):
        from spatia.io.spatialdata import is_spatialdata_store, read_spatialdata
        from spatia.io.xenium import read_xenium

        if is_spatialdata_store(source):  # a SpatialData .zarr store (optional extra spatia[spatialdata])
            return read_spatialdata(source, nucleus_shapes=None)

        return read_xenium(source, read_nucleus_boundaries=False, in_memory=False)
    return source


def source_label(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"<in-memory {type(source).__name__} {getattr(source, 'slide_id', '?')}>"


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_SHA_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()


def _source_files(slide: Any) -> list[Path]:
    """The files a slide was read from (plus the simulator's ground truth), sorted, unique."""
    files = [Path(p) for p in getattr(slide, "files_read", []) or []]
    root = getattr(slide, "path", None)
    if root is not None and (Path(root) / GROUND_TRUTH_FILE).is_file():
        files.append(Path(root) / GROUND_TRUTH_FILE)
    return sorted({p.resolve() for p in files if p.is_file()})


def _checksums(files: list[Path], root: Path | None) -> dict[str, str]:
    out = {}
    for path in files:
        try:
            name = str(path.relative_to(Path(root).resolve())) if root is not None else str(path)
        except ValueError:
            name = str(path)
        out[name] = _sha256_file(path)
    return out


def _content_fingerprint(slide: Any) -> str:
    """For slides given as objects (no files): a digest of the tables the build uses."""
    sha = hashlib.sha256()
    sha.update(str(slide.slide_id).encode())
    sha.update(np.asarray(slide.cells.index.astype(str)).astype("U").tobytes())
    sha.update(np.ascontiguousarray(slide.cells[["x_centroid_um", "y_centroid_um"]].to_numpy()).tobytes())
    counts = sp.csr_matrix(slide.counts)
    for array in (counts.indptr, counts.indices, counts.data):
        sha.update(np.ascontiguousarray(array).tobytes())
    sha.update("\n".join(slide.gene_names).encode())
    polygons = slide.cell_boundaries
    if polygons is not None:
        sha.update(np.ascontiguousarray(polygons.offsets).tobytes())
        sha.update(np.ascontiguousarray(polygons.vertices_um).tobytes())
    sha.update(repr(tuple(slide.image.level_shapes_yx)).encode())
    sha.update(repr(float(slide.pixel_size_um)).encode())
    return sha.hexdigest()


def fingerprint(slide: Any) -> dict[str, str]:
    files = _source_files(slide)
    if files:
        return _checksums(files, getattr(slide, "path", None))
    return {"<tables>": _content_fingerprint(slide)}


def ground_truth_file(slide: Any) -> Path | None:
    """The simulator's ground_truth.parquet of a slide read from a bundle that has one."""
    root = getattr(slide, "path", None)
    if root is None or not (Path(root) / GROUND_TRUTH_FILE).is_file():
        return None
    return Path(root) / GROUND_TRUTH_FILE
