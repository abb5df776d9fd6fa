"""Read a 10x Xenium Onboard Analysis output folder (v1 and v2) into one `XeniumSlide`.

    slide = read_xenium("path/to/outs")
    slide.cells            # DataFrame, index cell_id (str), centroids in um and px
    slide.counts           # CSR (n_cells, n_genes), raw counts, rows in cells order
    slide.image.read_window(x_px, y_px, 256, 256, level=0, channel="DAPI")
    adata = slide.to_anndata()

Coordinates: micrometres (``*_um``) as in the Xenium tables; morphology level-0 pixels
(``*_px``) are ``um / pixel_size_um``; x is the column, y the row, origin top-left. See
docs/io.md for the rules applied to damaged or inconsistent bundles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.errors import BundleError, ConfigError
from spatia.io.image import DEFAULT_CACHE_BYTES, HEImage, MorphologyImage
from spatia.io.tables import (
    GENE_FEATURE_TYPE,
    CellPolygons,
    note,
    read_cells_table,
    read_clusterings,
    FeatureMatrixFile,
    open_feature_matrix,
    read_polygons,
    release_unused_memory,
)

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

READER_VERSION = "1"
"""Version of the reading rules; stored in ``uns["spatia"]["reader_version"]``."""

MIN_ID_OVERLAP = 0.5
"""Cells table and feature matrix must share at least this fraction of the larger ID set."""

HASH_MAX_BYTES = 256 * 2**20
"""Table files up to this size get a sha256 in the provenance; larger files and images get size + mtime."""

CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
MATRIX_FILES = ("cell_feature_matrix.h5", "cell_feature_matrix")
CELL_BOUNDARY_FILES = ("cell_boundaries.parquet", "cell_boundaries.csv.gz")
NUCLEUS_BOUNDARY_FILES = ("nucleus_boundaries.parquet", "nucleus_boundaries.csv.gz")
MORPHOLOGY_FILES = ("morphology_focus", "morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif")
EXPERIMENT_FILE = "experiment.xenium"
CLUSTERING_DIR = Path("analysis") / "clustering"

_BUNDLE_CONTENTS = (
    "point at a Xenium Onboard Analysis output folder ('outs'): it holds cells.parquet (or cells.csv.gz), "
    "cell_feature_matrix.h5, a morphology image (morphology_focus.ome.tif in v1, the morphology_focus/ "
    "folder in v2, or morphology.ome.tif), and usually experiment.xenium, cell_boundaries.parquet, "
    "nucleus_boundaries.parquet and analysis/clustering/"
)


@dataclass(frozen=True)
class DeferredTables:
    """The tables `read_xenium(..., in_memory=False)` left on disk.

    Attributes:
        matrix: the opened feature matrix (barcodes, features, row pointers; stream the counts
            with ``matrix.row_blocks()``).
        matrix_rows: int64 (n_cells,): the feature-matrix row of each cell of ``cells``.
        cell_boundaries: the cell boundaries file (None if the bundle has none); stream it with
            `spatia.io.tables.scan_polygons`.
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

        ``.X``: CSR raw gene counts. ``var``: index gene names (made unique), ``gene_ids``,
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
            X=sp.csr_matrix(self.counts),
            obs=obs,
            var=var,
            obsm={
                "spatial": self.cells[["x_centroid_um", "y_centroid_um"]].to_numpy(dtype=np.float64),
                "control_counts": sp.csr_matrix(self.control_counts),
            },
            uns=uns,
        )
        return adata

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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_experiment(path: Path) -> dict:
    """Parse ``experiment.xenium`` (JSON). Malformed JSON raises `BundleError`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read experiment.xenium ({exc})", path=path) from None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(
            f"experiment.xenium is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            path=path,
            fix="restore the file from the Xenium output, or delete it (the pixel size then comes from the image)",
        ) from None
    if not isinstance(metadata, dict):
        raise BundleError(
            f"experiment.xenium holds a JSON {type(metadata).__name__}, not an object",
            path=path,
            fix="restore the file from the Xenium output, or delete it",
        )
    return metadata


def _metadata_pixel_size(metadata: dict, path: Path) -> float | None:
    if "pixel_size" not in metadata:
        return None
    value = metadata["pixel_size"]
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if not math.isfinite(size) or size <= 0:
        raise BundleError(
            f"experiment.xenium has pixel_size {value!r}; expected a positive number of um (Xenium: 0.2125)",
            path=path,
            fix="correct pixel_size in experiment.xenium",
        )
    return size


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def _find_morphology(folder: Path, metadata: dict, chosen: str | Path | None) -> Path | None:
    if chosen is not None:
        path = Path(chosen)
        path = path if path.is_absolute() else folder / path
        if not path.exists():
            raise BundleError("the morphology image chosen does not exist", path=path)
        return path
    found = _first(folder, MORPHOLOGY_FILES)
    if found is not None:
        return found
    images = metadata.get("images") if isinstance(metadata.get("images"), dict) else {}
    for key in ("morphology_focus_filepath", "morphology_mip_filepath", "morphology_filepath"):
        value = images.get(key)
        if isinstance(value, str) and (folder / value).exists():
            path = folder / value
            return path.parent if path.parent.name == "morphology_focus" else path
    return None


def _reconcile_ids(
    cells: pd.DataFrame, barcodes: np.ndarray, *, min_overlap: float, cells_path: Path, matrix_path: Path, problems: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells kept and, for each, its row in the feature matrix (see MIN_ID_OVERLAP)."""
    matrix_ids = pd.Index(barcodes, dtype=object)
    if matrix_ids.has_duplicates:
        raise BundleError(
            f"{int(matrix_ids.duplicated().sum())} barcodes appear more than once in the feature matrix",
            path=matrix_path,
            fix="use the cell_feature_matrix.h5 written by Xenium Onboard Analysis",
        )
    in_matrix = cells.index.isin(matrix_ids)
    n_common = int(in_matrix.sum())
    n_cells, n_barcodes = len(cells), len(matrix_ids)
    if n_common == n_cells == n_barcodes:
        return cells, matrix_ids.get_indexer(cells.index)
    overlap = n_common / max(n_cells, n_barcodes, 1)
    if overlap < min_overlap:
        raise BundleError(
            f"the cells table ({n_cells} cells, {cells_path.name}) and the feature matrix ({n_barcodes} barcodes, "
            f"{matrix_path.name}) share only {n_common} cell IDs ({overlap:.1%}; at least {min_overlap:.0%} needed)",
            path=cells_path.parent,
            fix="both files must come from the same Xenium output folder; re-copy the one that was replaced",
        )
    note(
        problems,
        f"cell IDs disagree: {n_cells - n_common} cells of {cells_path.name} have no counts and "
        f"{n_barcodes - n_common} barcodes of {matrix_path.name} have no cell row; kept the {n_common} shared cells",
    )
    kept = cells[in_matrix]
    return kept, matrix_ids.get_indexer(kept.index)


def _slide_id(folder: Path, metadata: dict) -> str:
    slide = metadata.get("slide_id")
    if isinstance(slide, (str, int)) and str(slide).strip():
        region = metadata.get("region_name")
        return f"{slide}_{region}" if isinstance(region, str) and region.strip() else str(slide)
    return folder.resolve().name


def read_xenium(
    path: str | Path,
    *,
    he_image: str | Path | None = None,
    he_alignment: str | Path | np.ndarray | None = None,
    morphology: str | Path | None = None,
    min_id_overlap: float = MIN_ID_OVERLAP,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    read_nucleus_boundaries: bool = True,
    in_memory: bool = True,
) -> XeniumSlide:
    """Read a Xenium Onboard Analysis output folder (v1 or v2).

    Args:
        path: the output folder (``outs``).
        he_image: optional post-Xenium H&E image (OME-TIFF/TIFF, RGB).
        he_alignment: 10x alignment CSV (3 x 3 affine, H&E px -> morphology px) or the matrix;
            without one the H&E is taken to be in morphology pixel coordinates already.
        morphology: a morphology image file or folder to use instead of the default choice
            (``morphology_focus/``, ``morphology_focus.ome.tif``, ``morphology_mip.ome.tif``,
            ``morphology.ome.tif``, in that order; z-stacks are max-projected).
        min_id_overlap: see `MIN_ID_OVERLAP`.
        cache_bytes: decoded-tile cache budget of each image.
        read_nucleus_boundaries: False leaves ``nucleus_boundaries`` None without reading the
            file (the MIST builder needs cell boundaries only; this saves its memory).
        in_memory: False reads neither the counts nor the boundaries: ``counts``,
            ``control_counts``, ``cell_boundaries`` and ``nucleus_boundaries`` are None and
            ``deferred`` says where to stream them from (the MIST builder's way of reading a
            section of any size in bounded memory).

    Raises:
        BundleError: missing required files, unreadable files, empty or inconsistent bundles.
    """
    folder = Path(path)
    if not folder.exists():
        raise BundleError("the Xenium output folder does not exist", path=folder, fix=_BUNDLE_CONTENTS)
    if not folder.is_dir():
        raise BundleError("expected a Xenium output folder, got a file", path=folder, fix=_BUNDLE_CONTENTS)
    if he_alignment is not None and he_image is None:
        raise ConfigError("an H&E alignment was given without an H&E image", fix="also pass he_image=...")
    problems: list[str] = []
    files_read: list[Path] = []

    metadata: dict = {}
    experiment = folder / EXPERIMENT_FILE
    if experiment.exists():
        metadata = read_experiment(experiment)
        files_read.append(experiment)
    meta_pixel_size = _metadata_pixel_size(metadata, experiment)

    cells_path = _first(folder, CELLS_FILES)
    matrix_path = _first(folder, MATRIX_FILES)
    image_path = _find_morphology(folder, metadata, morphology)
    missing = [
        what
        for what, found in (
            ("cells.parquet (or cells.csv.gz)", cells_path),
            ("cell_feature_matrix.h5", matrix_path),
            ("a morphology image (morphology_focus.ome.tif, morphology_focus/ or morphology.ome.tif)", image_path),
        )
        if found is None
    ]
    if missing:
        raise BundleError(f"not a complete Xenium output folder: missing {'; '.join(missing)}", path=folder, fix=_BUNDLE_CONTENTS)
    assert cells_path is not None and matrix_path is not None and image_path is not None

    # -- image (lazy: only TIFF directories are parsed) ------------------------------------------
    image = MorphologyImage(image_path, pixel_size_um=meta_pixel_size, cache_bytes=cache_bytes)
    if meta_pixel_size is not None:
        image.pixel_size_source = EXPERIMENT_FILE
    files_read.extend(image.files)
    for message in image.warnings:
        note(problems, f"{image_path.name}: {message}")
    ome_size = image.ome_pixel_size_um
    if meta_pixel_size is not None and ome_size is not None and abs(ome_size - meta_pixel_size) > 0.01 * meta_pixel_size:
        note(
            problems,
            f"pixel size: experiment.xenium says {meta_pixel_size} um/px, the image's OME metadata {ome_size}; "
            "using experiment.xenium",
        )
    pixel_size = image.pixel_size_um

    # -- cells and counts ----------------------------------------------------------------------
    cells = read_cells_table(cells_path)
    files_read.append(cells_path)
    if len(cells) == 0:
        raise BundleError("the cells table holds no cells", path=cells_path, fix="this section has no segmented cells; check the Xenium run")
    matrix = open_feature_matrix(matrix_path)
    files_read.extend(sorted(matrix_path.iterdir()) if matrix_path.is_dir() else [matrix_path])
    cells, matrix_rows = _reconcile_ids(
        cells, matrix.barcodes, min_overlap=min_id_overlap, cells_path=cells_path, matrix_path=matrix_path, problems=problems
    )
    finite = np.isfinite(cells["x_centroid_um"].to_numpy()) & np.isfinite(cells["y_centroid_um"].to_numpy())
    if not finite.all():
        note(problems, f"{cells_path.name}: {int((~finite).sum())} cells have NaN/inf centroids; dropped")
        cells, matrix_rows = cells[finite], matrix_rows[finite]
    if len(cells) == 0:
        raise BundleError("no cells left to read (every cell was dropped, see above)", path=folder, fix=_BUNDLE_CONTENTS)
    is_gene = matrix.is_gene
    gene_names = [str(x) for x in matrix.feature_names[is_gene]]
    gene_ids = [str(x) for x in matrix.feature_ids[is_gene]]
    control_names = [str(x) for x in matrix.feature_names[~is_gene]]
    control_types = [str(x) for x in matrix.feature_types[~is_gene]]
    counts = control_counts = None
    if in_memory:
        counts_all = matrix.read().counts
        same_rows = len(matrix_rows) == counts_all.shape[0] and np.array_equal(matrix_rows, np.arange(len(matrix_rows)))
        if not same_rows:
            counts_all = counts_all[matrix_rows]
        counts = sp.csr_matrix(counts_all[:, np.flatnonzero(is_gene)])
        control_counts = sp.csr_matrix(counts_all[:, np.flatnonzero(~is_gene)])
        del counts_all  # the whole matrix is no longer needed: free it before the polygons are read
    if len(set(gene_names)) != len(gene_names):
        note(problems, f"{matrix_path.name}: {len(gene_names) - len(set(gene_names))} duplicated gene names (made unique in AnnData)")
    if not is_gene.any():
        note(problems, f"{matrix_path.name}: no 'Gene Expression' features; every feature is a control")

    cells = cells.copy()
    position = cells.columns.get_loc("y_centroid_um") + 1
    cells.insert(position, "x_centroid_px", cells["x_centroid_um"] / pixel_size)
    cells.insert(position + 1, "y_centroid_px", cells["y_centroid_um"] / pixel_size)

    # -- polygons ------------------------------------------------------------------------------
    width_um, height_um = image.extent_um
    boundaries: dict[str, CellPolygons | None] = {}
    for key, names, what in (("cell", CELL_BOUNDARY_FILES, "cell"), ("nucleus", NUCLEUS_BOUNDARY_FILES, "nucleus")):
        found = _first(folder, names) if in_memory and (key == "cell" or read_nucleus_boundaries) else None
        if found is None:
            boundaries[key] = None
            continue
        polygons = read_polygons(found, cells.index, problems, what=what)
        files_read.append(found)
        bounds = polygons.bounds_um()
        outside = (bounds[:, 0] < 0) | (bounds[:, 1] < 0) | (bounds[:, 2] > width_um) | (bounds[:, 3] > height_um)
        if outside.any():
            note(problems, f"{found.name}: {int(outside.sum())} {what} polygons extend past the image edge; kept")
        without = int((~polygons.has_polygon()).sum())
        if without:
            note(problems, f"{found.name}: {without} cells have no {what} polygon")
        boundaries[key] = polygons
    deferred = None
    if not in_memory:
        cell_boundaries_path = _first(folder, CELL_BOUNDARY_FILES)
        if cell_boundaries_path is not None:
            files_read.append(cell_boundaries_path)
        deferred = DeferredTables(matrix=matrix, matrix_rows=np.asarray(matrix_rows, dtype=np.int64),
                                  cell_boundaries=cell_boundaries_path)  # fmt: skip
    del matrix
    x_px, y_px = cells["x_centroid_px"].to_numpy(), cells["y_centroid_px"].to_numpy()
    h0, w0 = image.level_shapes_yx[0]
    off_image = (x_px < 0) | (y_px < 0) | (x_px >= w0) | (y_px >= h0)
    if off_image.any():
        note(problems, f"{cells_path.name}: {int(off_image.sum())} cell centroids lie outside the morphology image; kept")

    # -- clusterings ---------------------------------------------------------------------------
    clusters, cluster_files = read_clusterings(folder / CLUSTERING_DIR, cells.index, problems)
    files_read.extend(cluster_files)
    cluster_columns = []
    for column in clusters.columns:
        name = column if column not in cells.columns else f"cluster_{column}"
        cells[name] = clusters[column]
        cluster_columns.append(name)

    # -- H&E -----------------------------------------------------------------------------------
    he = None
    if he_image is not None:
        if he_alignment is None:
            note(problems, "no H&E alignment given: the H&E image is taken to be in morphology pixel coordinates")
        factors = [image.downsample_factor(level) for level in range(image.n_levels)]
        he = HEImage(he_image, he_alignment, morphology_downsample=factors, cache_bytes=cache_bytes)
        files_read.append(he.path)
        if he.alignment_path is not None:
            files_read.append(he.alignment_path)

    slide = XeniumSlide(
        path=folder,
        slide_id=_slide_id(folder, metadata),
        pixel_size_um=pixel_size,
        image=image,
        cells=cells,
        counts=counts,
        gene_names=gene_names,
        gene_ids=gene_ids,
        control_counts=control_counts,
        control_names=control_names,
        control_types=control_types,
        cell_boundaries=boundaries["cell"],
        nucleus_boundaries=boundaries["nucleus"],
        cluster_columns=cluster_columns,
        he=he,
        problems=problems,
        metadata=metadata,
        files_read=files_read,
        deferred=deferred,
    )
    release_unused_memory()
    log.info("read %r", slide)
    return slide
