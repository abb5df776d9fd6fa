"""Finding the files of a Xenium Onboard Analysis output folder, apart from reading them.

`find_bundle_files(folder)` says which file holds each part of a bundle (v1 and v2 names, the
paths experiment.xenium lists) without reading any table or image; `read_experiment` parses
experiment.xenium. `spatia.io.xenium.read_xenium` reads what was found.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from spatia.errors import BundleError
from spatia.io.cells_zarr import CELLS_ZARR_FILE

CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
MATRIX_FILES = ("cell_feature_matrix.h5", "cell_feature_matrix")
CELL_BOUNDARY_FILES = ("cell_boundaries.parquet", "cell_boundaries.csv.gz")
NUCLEUS_BOUNDARY_FILES = ("nucleus_boundaries.parquet", "nucleus_boundaries.csv.gz")
MORPHOLOGY_FILES = ("morphology_focus", "morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif")
EXPERIMENT_FILE = "experiment.xenium"
CLUSTERING_DIR = Path("analysis") / "clustering"

BUNDLE_CONTENTS = (
    "point at a Xenium Onboard Analysis output folder ('outs'): it holds cells.parquet (or cells.csv.gz), "
    "cell_feature_matrix.h5, a morphology image (morphology_focus.ome.tif in v1, the morphology_focus/ "
    "folder in v2, or morphology.ome.tif), and usually experiment.xenium, cell_boundaries.parquet, "
    "nucleus_boundaries.parquet and analysis/clustering/"
)

@dataclass(frozen=True)
class BundleFiles:
    """Where each part of one bundle lies (None: absent). Nothing has been read but
    experiment.xenium (`metadata`, {} without one)."""

    folder: Path
    experiment: Path | None
    metadata: dict
    cells: Path | None
    matrix: Path | None
    morphology: Path | None
    cell_boundaries: Path | None
    nucleus_boundaries: Path | None
    clustering_dir: Path
    cells_zarr: Path | None = None
    """``cells.zarr.zip`` (XOA 2.x-4.x). Where a boundaries table is absent, its polygons are read
    from this store instead (`cell_boundaries` / `nucleus_boundaries` then name it)."""

    def require_core(self) -> None:
        """Raise `BundleError` naming every missing required part (cells, matrix, image)."""
        missing = [
            what
            for what, found in (
                ("cells.parquet (or cells.csv.gz)", self.cells),
                ("cell_feature_matrix.h5", self.matrix),
                ("a morphology image (morphology_focus.ome.tif, morphology_focus/ or morphology.ome.tif)", self.morphology),
            )
            if found is None
        ]
        if missing:
            raise BundleError(
                f"not a complete Xenium output folder: missing {'; '.join(missing)}", path=self.folder, fix=BUNDLE_CONTENTS
            )


def find_bundle_files(folder: str | Path, *, morphology: str | Path | None = None) -> BundleFiles:
    """The files of the bundle in `folder` (see `BundleFiles`); `morphology` overrides the
    image choice. Raises `BundleError` for a folder that does not exist or a malformed
    experiment.xenium, never for a missing part (see `BundleFiles.require_core`)."""
    folder = Path(folder)
    if not folder.exists():
        raise BundleError("the Xenium output folder does not exist", path=folder, fix=BUNDLE_CONTENTS)
    if not folder.is_dir():
        raise BundleError("expected a Xenium output folder, got a file", path=folder, fix=BUNDLE_CONTENTS)
    experiment = folder / EXPERIMENT_FILE
    metadata = read_experiment(experiment) if experiment.exists() else {}
    cells_zarr = folder / CELLS_ZARR_FILE if (folder / CELLS_ZARR_FILE).is_file() else None
    return BundleFiles(
        folder=folder,
        experiment=experiment if experiment.exists() else None,
        metadata=metadata,
        cells=first_existing(folder, CELLS_FILES),
        matrix=first_existing(folder, MATRIX_FILES),
        morphology=_find_morphology(folder, metadata, morphology),
        cell_boundaries=first_existing(folder, CELL_BOUNDARY_FILES) or cells_zarr,
        nucleus_boundaries=first_existing(folder, NUCLEUS_BOUNDARY_FILES) or cells_zarr,
        clustering_dir=folder / CLUSTERING_DIR,
        cells_zarr=cells_zarr,
    )


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


def metadata_pixel_size(metadata: dict, path: Path) -> float | None:
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


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
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
    found = first_existing(folder, MORPHOLOGY_FILES)
    if found is not None:
        return found
    images = metadata.get("images") if isinstance(metadata.get("images"), dict) else {}
    for key in ("morphology_focus_filepath", "morphology_mip_filepath", "morphology_filepath"):
        value = images.get(key)
        if isinstance(value, str) and (folder / value).exists():
            path = folder / value
            return path.parent if path.parent.name == "morphology_focus" else path
    return None


def slide_id_of(folder: Path, metadata: dict) -> str:
    slide = metadata.get("slide_id")
    if isinstance(slide, (str, int)) and str(slide).strip():
        region = metadata.get("region_name")
        return f"{slide}_{region}" if isinstance(region, str) and region.strip() else str(slide)
    return folder.resolve().name
