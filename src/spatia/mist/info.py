"""`dataset_info`: a summary of a MIST dataset directory (what `spatia dataset-info` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from spatia.keys import LEVELS
from spatia.mist.store import RecordReader, index_path, read_manifest, store_path


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dataset_info(root: str | Path, *, check_stores: bool = True) -> dict[str, Any]:
    """Summarise a complete dataset: levels, slides, splits, skipped cells, sizes on disk.

    Raises `DatasetError` for a missing, foreign or incomplete dataset. With `check_stores`,
    the number of records in each LMDB store is compared with its index.
    """
    root = Path(root)
    manifest = read_manifest(root)
    levels = {}
    for level in LEVELS:
        n_index = pq.read_metadata(index_path(root, level)).num_rows
        entry = {
            **manifest["levels"][level],
            "n_index_rows": n_index,
            "store_bytes": _size_bytes(store_path(root, level)),
            "splits": manifest["splits"][level],
        }
        if check_stores:
            reader = RecordReader(store_path(root, level))
            entry["n_store_records"] = reader.count()
            reader.close()
        levels[level] = entry
    slides = [
        {
            "slide_id": s["slide_id"],
            "source": s["source"],
            "pixel_size_um": s["pixel_size_um"],
            "image_shape_yx": s["image_shape_yx"],
            "n_cells_input": s["n_cells_input"],
            "n_cells": s["n_cells"],
            "n_niches": s["n_niches"],
            "n_tissues": s["n_tissues"],
            "n_genes_measured": s["n_genes_measured"],
            "scale_factor": s["scale"]["factor"],
            "n_clipped": s["scale"]["n_clipped"],
            # a slide that kept no cell (accept_cell_loss) has no range: NaN, as its scale factor
            "intensity_range": [s["normalisation"].get("low", float("nan")), s["normalisation"].get("high", float("nan"))],
            "skipped": {k: v for k, v in s["skipped"].items() if v},
            "repaired": {k: v for k, v in s["repaired"].items() if v},
            "split": s["split"],
        }
        for s in manifest["slides"]
    ]
    config = manifest["builder_config"]
    return {
        "path": str(root),
        "format": f"{manifest['format']} v{manifest['format_version']}",
        "created_utc": manifest.get("created_utc"),
        "preset": config.get("preset"),
        "seed": manifest.get("seed"),
        "n_genes": len(manifest["genes"]),
        "image_px": {level: manifest["levels"][level]["image_px"] for level in LEVELS},
        "split_mode": config.get("split_mode"),
        "levels": levels,
        "skipped": {k: v for k, v in manifest["skipped"].items()},
        "repaired": manifest["repaired"],
        "n_clipped": manifest["n_clipped"],
        "slides": slides,
        "total_bytes": _size_bytes(root),
    }
