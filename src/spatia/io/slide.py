"""`XeniumSlide`: one Xenium section as read (cells, counts, polygons, image) and its AnnData.

Returned by `spatia.io.read_xenium`; see docs/io.md for the conventions.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.errors import ConfigError
from spatia.io.he_image import HEImage
from spatia.io.image import MorphologyImage
from spatia.io.matrix import GENE_FEATURE_TYPE, FeatureMatrixFile
from spatia.io.polygons import CellPolygons

if TYPE_CHECKING:
    import anndata

READER_VERSION = "1"
"""Version of the reading rules; stored in ``uns["spatia"]["reader_version"]``."""

HASH_MAX_BYTES = 256 * 2**20
"""Table files up to this size get a sha256 in the provenance; larger files and images get size + mtime."""


@dataclass(frozen=True)
class DeferredTables:
    """The tables `read_xenium(..., in_memory=False)` left on disk.

    Attributes:
        matrix: the opened feature matrix (barcodes, features, row pointers; stream the counts
            with ``matrix.row_blocks()``).
        matrix_rows: int64 (n_cells,): the feature-matrix row of each cell of ``cells``.
        cell_boundaries: the cell boundaries file (None if the bundle has none); stream it with
            `spatia.io.polygons.scan_polygons`.
    """

    matrix: FeatureMatrixFile
    matrix_rows: np.ndarray
    cell_boundaries: Path | None


@dataclass
class XeniumSlide:
    """One Xenium section: lazy morphology image, cells, counts, polygons, clusterings.

    Attributes:
        path: the bundle folder.
        slide_id: the folder name, or experiment.xenium's ``slide_id`` (+ ``region_name``).
        pixel_size_um: micrometres per morphology level-0 pixel.
        image: the lazy morphology image.
        cells: index ``cell_id`` (str); x_centroid_um, y_centroid_um, x_centroid_px,
            y_centroid_px, cell_area_um2, nucleus_area_um2 (NaN if absent), the count columns of
            cells.parquet (transcript_counts, control_probe_counts, total_counts, ...), and one
            categorical column per clustering.
        counts: CSR (n_cells, n_genes) raw counts (int32, or float32 if the file stores floats);
            None when read with ``in_memory=False`` (then see ``deferred``).
        gene_names, gene_ids: per gene column of `counts`.
        control_counts: CSR (n_cells, n_controls): negative-control probes and codewords.
        control_names, control_types: per control column (10x feature names and types).
        cell_boundaries, nucleus_boundaries: polygons aligned to `cells` (None if absent).
        cluster_columns: names of the clustering columns of `cells`.
        he: registered H&E image, or None.
        problems: human-readable, counted skips and repairs made while reading.
        metadata: the contents of experiment.xenium ({} if absent).
        files_read: every file the reader used (for provenance).
        deferred: where the tables not read into memory are (``in_memory=False``), else None.
    """

    path: Path
    slide_id: str
    pixel_size_um: float
    image: MorphologyImage
    cells: pd.DataFrame
    counts: sp.csr_matrix | None
    gene_names: list[str]
    gene_ids: list[str]
    control_counts: sp.csr_matrix | None
    control_names: list[str]
    control_types: list[str]
    cell_boundaries: CellPolygons | None
    nucleus_boundaries: CellPolygons | None
    cluster_columns: list[str]
    he: HEImage | None
    problems: list[str]
    metadata: dict
    files_read: list[Path] = field(default_factory=list)
    deferred: DeferredTables | None = None

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    def __repr__(self) -> str:
        return (
            f"XeniumSlide({self.slide_id!r}: {self.n_cells} cells, {self.n_genes} genes, "
            f"{len(self.control_names)} controls, image {self.image.level_shapes_yx[0]} px "
            f"x {len(self.image.channel_names)} channels, {len(self.problems)} problems)"
        )

    # -- AnnData ------------------------------------------------------------------------------

    def to_anndata(self) -> anndata.AnnData:
        """An AnnData ready for scanpy and for ``write_h5ad``.

        ``.X``: CSR raw gene counts as float32 (whole numbers; scanpy's normalisation works in
        place on it, and `spatia embed` writes the same dtype, so the two files merge). ``var``: index gene names (made unique), ``gene_ids``,
        ``feature_types``. ``obs``: the `cells` columns (text as categorical), plus
        ``gene_counts_total``, ``control_counts_total`` and ``control_counts_<type>`` per control
        type. ``obsm["spatial"]``: float64 (n_cells, 2) x_um, y_um. ``obsm["control_counts"]``:
        CSR control counts (names in ``uns["spatia"]["control_names"]``). ``uns["spatia"]``:
        provenance (source path, files with sha256 or size + mtime, pixel size, reader version,
        problems, experiment.xenium as JSON).
        """
        import anndata as ad

        from spatia import __version__

        self._require_counts("to_anndata")
        obs = self.cells.copy()
        obs["gene_counts_total"] = np.asarray(self.counts.sum(axis=1)).ravel()
        control_types = np.asarray(self.control_types, dtype=object)
        obs["control_counts_total"] = np.asarray(self.control_counts.sum(axis=1)).ravel()
        for kind in sorted(set(self.control_types)):
            columns = np.flatnonzero(control_types == kind)
            obs[f"control_counts_{_slug(kind)}"] = np.asarray(self.control_counts[:, columns].sum(axis=1)).ravel()
        for column in obs.columns:
            if obs[column].dtype == object or pd.api.types.is_string_dtype(obs[column].dtype):
                if not isinstance(obs[column].dtype, pd.CategoricalDtype):
                    obs[column] = obs[column].astype("category")
        obs.index = pd.Index(np.asarray(obs.index, dtype=str), name="cell_id")
        var = pd.DataFrame(
            {"gene_ids": np.asarray(self.gene_ids, dtype=str), "feature_types": GENE_FEATURE_TYPE},
            index=pd.Index(ad.utils.make_index_unique(pd.Index(self.gene_names, dtype=str)), name="gene"),
        )
        uns = {
            "spatia": {
                "reader": "spatia.io.read_xenium",
                "reader_version": READER_VERSION,
                "spatia_version": __version__,
                "source_path": str(self.path.resolve()),
                "slide_id": self.slide_id,
                "pixel_size_um": float(self.pixel_size_um),
                "pixel_size_source": self.image.pixel_size_source,
                "coordinates": (
                    "obsm['spatial'] and *_um columns in micrometres; *_px = um / pixel_size_um in morphology "
                    "level-0 pixels; x = column, y = row, origin top-left"
                ),
                "image": {
                    "path": str(self.image.path),
                    "channel_names": list(self.image.channel_names),
                    "level_shapes_yx": np.asarray(self.image.level_shapes_yx, dtype=np.int64),
                    "dtype": str(self.image.dtype),
                    "n_z": int(self.image.n_z),
                },
                "files": _provenance(self.files_read, self.path),
                "control_names": np.asarray(self.control_names, dtype=str),
                "control_types": np.asarray(self.control_types, dtype=str),
                "cluster_columns": np.asarray(self.cluster_columns, dtype=str),
                "problems": np.asarray(self.problems, dtype=str),
                "experiment_xenium_json": json.dumps(self.metadata),
            }
        }
        if self.he is not None:
            uns["spatia"]["he"] = {
                "path": str(self.he.path),
                "alignment_path": str(self.he.alignment_path) if self.he.alignment_path else "",
                "he_to_morphology_px": np.asarray(self.he.he_to_morphology_px),
            }
        adata = ad.AnnData(
            X=sp.csr_matrix(self.counts, dtype=np.float32),
            obs=obs,
            var=var,
            obsm={
                "spatial": self.cells[["x_centroid_um", "y_centroid_um"]].to_numpy(dtype=np.float64),
                "control_counts": sp.csr_matrix(self.control_counts),
            },
            uns=uns,
        )
        return adata

    def to_spatialdata(self, **options: Any) -> Any:
        """A `spatialdata.SpatialData` laid out as spatialdata-io's Xenium reader does (optional
        extra ``spatia[spatialdata]``); options and elements: `spatia.io.spatialdata.to_spatialdata`."""
        from spatia.io.spatialdata import to_spatialdata

        return to_spatialdata(self, **options)

    # -- summary ------------------------------------------------------------------------------

    def _require_counts(self, what: str) -> None:
        if self.counts is None:
            raise ConfigError(
                f"{what} needs the counts in memory, but this slide was read with in_memory=False",
                fix="read the bundle with spatia.io.read_xenium(path) (in_memory=True, the default)",
            )

    def summary(self) -> dict[str, Any]:
        """JSON-ready overview: what ``spatia info`` prints."""
        self._require_counts("summary")
        width_um, height_um = self.image.extent_um
        x, y = self.cells["x_centroid_um"], self.cells["y_centroid_um"]
        clusterings = {}
        for column in self.cluster_columns:
            values = self.cells[column]
            clusterings[column] = {
                "n_clusters": int(values.nunique(dropna=True)),
                "n_cells_assigned": int(values.notna().sum()),
            }
        control_type_counts = pd.Series(self.control_types, dtype=object).value_counts()

        def polygons(p: CellPolygons | None) -> int | None:
            return None if p is None else int(p.has_polygon().sum())

        return {
            "slide_id": self.slide_id,
            "path": str(self.path),
            "n_cells": int(self.n_cells),
            "n_genes": int(self.n_genes),
            "n_controls": len(self.control_names),
            "control_types": {str(k): int(v) for k, v in control_type_counts.items()},
            "total_gene_counts": int(self.counts.sum()),
            "pixel_size_um": float(self.pixel_size_um),
            "pixel_size_source": self.image.pixel_size_source,
            "image": {
                "path": str(self.image.path),
                "channels": list(self.image.channel_names),
                "levels_yx": [list(s) for s in self.image.level_shapes_yx],
                "dtype": str(self.image.dtype),
                "n_z": int(self.image.n_z),
            },
            "extent_um": {
                "image_width_um": float(width_um),
                "image_height_um": float(height_um),
                "cells_x_min_um": float(x.min()),
                "cells_x_max_um": float(x.max()),
                "cells_y_min_um": float(y.min()),
                "cells_y_max_um": float(y.max()),
            },
            "clusterings": clusterings,
            "cells_with_boundary": polygons(self.cell_boundaries),
            "cells_with_nucleus_boundary": polygons(self.nucleus_boundaries),
            "he_image": None if self.he is None else str(self.he.path),
            "problems": list(self.problems),
        }


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _provenance(files: list[Path], root: Path) -> dict[str, Any]:
    """Columnar file records (h5ad-writable): name, size_bytes, mtime_utc, sha256 ('' when not hashed)."""
    names, sizes, mtimes, digests = [], [], [], []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        is_image = path.name.lower().endswith((".tif", ".tiff"))
        digest = ""
        if not is_image and stat.st_size <= HASH_MAX_BYTES:
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    sha.update(chunk)
            digest = sha.hexdigest()
        names.append(name)
        sizes.append(int(stat.st_size))
        mtimes.append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)))
        digests.append(digest)
    return {
        "name": np.asarray(names, dtype=str),
        "size_bytes": np.asarray(sizes, dtype=np.int64),
        "mtime_utc": np.asarray(mtimes, dtype=str),
        "sha256": np.asarray(digests, dtype=str),
    }
