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

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.arrays import release_unused_memory
from spatia.errors import BundleError, ConfigError
from spatia.io.bundle import BUNDLE_CONTENTS, EXPERIMENT_FILE, find_bundle_files, metadata_pixel_size, slide_id_of
from spatia.io.he_image import HEImage
from spatia.io.image import DEFAULT_CACHE_BYTES, MorphologyImage
from spatia.io.matrix import open_feature_matrix
from spatia.io.polygons import CellPolygons, read_polygons
from spatia.io.slide import DeferredTables, XeniumSlide
from spatia.io.tables import note, read_cells_table, read_clusterings

log = logging.getLogger(__name__)

MIN_ID_OVERLAP = 0.5
"""Cells table and feature matrix must share at least this fraction of the larger ID set."""


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
    found = find_bundle_files(path, morphology=morphology)
    if he_alignment is not None and he_image is None:
        raise ConfigError("an H&E alignment was given without an H&E image", fix="also pass he_image=...")
    folder, metadata = found.folder, found.metadata
    problems: list[str] = []
    files_read: list[Path] = [found.experiment] if found.experiment is not None else []
    experiment = folder / EXPERIMENT_FILE
    meta_pixel_size = metadata_pixel_size(metadata, experiment)
    found.require_core()
    cells_path, matrix_path, image_path = found.cells, found.matrix, found.morphology
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
        raise BundleError("no cells left to read (every cell was dropped, see above)", path=folder, fix=BUNDLE_CONTENTS)
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
    for key, path_found in (("cell", found.cell_boundaries), ("nucleus", found.nucleus_boundaries)):
        what = key
        boundary_file = path_found if in_memory and (key == "cell" or read_nucleus_boundaries) else None
        if boundary_file is None:
            boundaries[key] = None
            continue
        polygons = read_polygons(boundary_file, cells.index, problems, what=what)
        files_read.append(boundary_file)
        bounds = polygons.bounds_um()
        outside = (bounds[:, 0] < 0) | (bounds[:, 1] < 0) | (bounds[:, 2] > width_um) | (bounds[:, 3] > height_um)
        if outside.any():
            note(problems, f"{boundary_file.name}: {int(outside.sum())} {what} polygons extend past the image edge; kept")
        without = int((~polygons.has_polygon()).sum())
        if without:
            note(problems, f"{boundary_file.name}: {without} cells have no {what} polygon")
        boundaries[key] = polygons
    deferred = None
    if not in_memory:
        cell_boundaries_path = found.cell_boundaries
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
    clusters, cluster_files = read_clusterings(found.clustering_dir, cells.index, problems)
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
        slide_id=slide_id_of(folder, metadata),
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
