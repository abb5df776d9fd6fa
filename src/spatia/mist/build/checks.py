"""Refusing a build whose inputs would give a wrong or empty dataset, before or after planning.

Each refusal is an `InputDataError` naming the slide, the cause and the fix, and each has an
explicit `BuildConfig` option to accept it (docs/io.md lists the messages):

- no cell segmentation (`segmentation="circles"` builds circles instead);
- experiment.xenium's pixel size and the image's OME pixel size differ by more than
  `PIXEL_SIZE_TOLERANCE` (`accept_pixel_size_mismatch`);
- a slide keeps no cell, or loses more than `MOST` of its cells to one skip reason
  (`accept_cell_loss`); a build that keeps no cell at all is always refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spatia.errors import InputDataError
from spatia.mist.build.plan import SKIP_REASONS, SlidePlan
from spatia.mist.config import BuildConfig

PIXEL_SIZE_TOLERANCE = 0.01
"""Largest relative difference between experiment.xenium's and the OME pixel size."""
MOST = 0.5
"""A slide may lose at most this share of its cells to one skip reason."""

_ACCEPT_LOSS = "or, to build with the cells that remain, set accept_cell_loss (spatia build --accept-cell-loss)"
SKIP_CAUSES = {
    "outside_image": ("their centroids lie outside the morphology image",
                      "check that the image belongs to this bundle and that experiment.xenium's pixel_size is right"),
    "no_polygon": ("they have no boundary polygon (the boundary file's cell IDs do not match the cells table, or it "
                   "holds no polygons)", "use the boundary file of the same Xenium run, or build nucleus-centred "
                   "circles (spatia build --segmentation circles --radius-um R)"),
    "zero_area_polygon": ("their polygons have no area", "check the boundary file (it looks damaged)"),
    "invalid_polygon": ("their polygons are self-intersecting beyond repair", "check the boundary file (it looks damaged)"),
    "zero_counts": ("they have no counts (no 'Gene Expression' feature in the matrix, or a matrix of another run)",
                    "use the cell_feature_matrix.h5 of the same Xenium run"),
    "low_counts": ("they have fewer counts than min_counts", "lower min_counts (spatia build --min-counts)"),
}


def has_cell_segmentation(slide: Any) -> bool:
    """Whether a slide brings cell polygons (in memory, or a boundaries file to stream)."""
    if getattr(slide, "cell_boundaries", None) is not None:
        return True
    deferred = getattr(slide, "deferred", None)
    return deferred is not None and getattr(deferred, "cell_boundaries", None) is not None


def check_slide_inputs(slide: Any, slide_id: str, config: BuildConfig) -> None:
    """Before anything is written: refuse a slide without segmentation (unless circles are asked
    for) or with disagreeing pixel sizes (unless accepted)."""
    where = getattr(slide, "path", None)
    if config.segmentation == "polygons" and not has_cell_segmentation(slide):
        raise InputDataError(
            f"slide {slide_id} has no cell segmentation: no cell_boundaries.parquet (or .csv.gz) and no "
            "cells.zarr.zip with a cell polygon set",
            path=where,
            fix="copy the segmentation files from the Xenium output folder, or build nucleus-centred circles of a "
                "radius you choose: spatia build --segmentation circles --radius-um R",
        )
    metadata = getattr(slide, "metadata", None) or {}
    stated = metadata.get("pixel_size") if isinstance(metadata, dict) else None
    ome = getattr(getattr(slide, "image", None), "ome_pixel_size_um", None)
    if stated is None or ome is None or config.accept_pixel_size_mismatch:
        return
    stated = float(stated)
    if abs(stated - ome) > PIXEL_SIZE_TOLERANCE * min(stated, ome):
        raise InputDataError(
            f"slide {slide_id}: experiment.xenium says the pixel size is {stated:g} um/px but the morphology image's "
            f"OME metadata says {ome:g} um/px (they differ by more than {PIXEL_SIZE_TOLERANCE:.0%})",
            path=where,
            fix="correct pixel_size in experiment.xenium (or delete the key to use the image's), or set "
                "accept_pixel_size_mismatch (spatia build --accept-pixel-size-mismatch) to use experiment.xenium's",
        )


def check_kept_cells(plan: SlidePlan, slide: Any, config: BuildConfig) -> None:
    """After planning a slide: refuse one that keeps no cell or loses most cells to one reason."""
    if config.accept_cell_loss:
        return
    n = len(plan.reason)
    if n == 0:
        return
    counts = np.bincount(plan.reason, minlength=len(SKIP_REASONS) + 1)
    kept = int(counts[0])
    worst = int(np.argmax(counts[1:])) if len(counts) > 1 else 0
    lost = int(counts[worst + 1])
    if kept > 0 and lost <= MOST * n:
        return
    name = SKIP_REASONS[worst]
    cause, fix = SKIP_CAUSES[name]
    summary = ", ".join(f"{SKIP_REASONS[k]} {int(c)}" for k, c in enumerate(counts[1:]) if c)
    what = "keeps no cell" if kept == 0 else f"would keep {kept} of {n} cells"
    raise InputDataError(
        f"slide {plan.slide_id} {what}: {lost} of {n} cells are skipped as '{name}': {cause} (skipped: {summary})",
        path=getattr(slide, "path", None),
        fix=f"{fix}; {_ACCEPT_LOSS}",
    )
