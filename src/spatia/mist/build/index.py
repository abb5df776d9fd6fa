"""Index tables of a build: per-slide cell, niche and tissue rows (Parquet), streamed in row
groups, and their concatenation into `<level>_index.parquet`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spatia.keys import SPLIT_NAMES  # split code k is SPLIT_NAMES[k] (spatia.keys.SPLIT_CODES)
from spatia.mist.build.ids import cell_key, niche_id, tissue_id
from spatia.mist.build.jobs import chunk_niches
from spatia.mist.build.plan import SlidePlan
from spatia.mist.build.sources import ground_truth_file
from spatia.mist.config import BuildConfig
from spatia.mist.staging import StagedTruth, stage_ground_truth
from spatia.mist.store import BUILD_DIR_NAME, index_path


INDEX_BATCH_CELLS = 50_000
"""Cells per row group of the cell index while it is written: bounds the builder's memory for
the index whatever the slide size."""


def write_cell_index(plan: SlidePlan, slide: Any, config: BuildConfig, path: Path, work_dir: Path) -> dict[str, int]:
    """Write one slide's cell index rows (record order, chunk by chunk) to `path` in row groups
    of about `INDEX_BATCH_CELLS` cells, through a temporary file; returns cells per split. The
    simulator's ground truth, where the bundle has one, is staged in `work_dir` first."""
    truth = None
    truth_file = ground_truth_file(slide)
    if truth_file is not None:
        truth = stage_ground_truth(truth_file, slide.cells.index, work_dir)
    truth_as_float = False
    if truth is not None and plan.chunks:
        kept_rows = np.concatenate([plan.chunk_cells[c] for c in plan.chunks])
        # cells without ground truth get NaN: make every numeric or boolean column float in all
        # row groups, not only in those that happen to hold such a cell
        truth_as_float = bool((~truth.has_row[kept_rows]).any())
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for c in plan.chunks:
        rows = plan.chunk_cells[c]
        if size and size + len(rows) > INDEX_BATCH_CELLS:
            groups.append([])
            size = 0
        groups[-1].append(rows)
        size += len(rows)
    splits: dict[str, int] = {}
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for group in groups:
            rows = np.concatenate(group) if group else np.zeros(0, dtype=np.int64)
            frame = cell_index_rows(plan, slide, config, rows, truth, truth_as_float)
            for name, n in frame["split"].value_counts().items():
                splits[str(name)] = splits.get(str(name), 0) + int(n)
            if writer is None:
                schema = _arrow_schema(frame)
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
            del frame
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)
    return splits


def _arrow_schema(frame: pd.DataFrame) -> pa.Schema:
    """The Arrow schema of an index frame with text (object) columns typed as strings, so that
    every row group of a file has the same schema even where a batch holds only missing text."""
    fields = []
    for name in frame.columns:
        dtype = frame[name].dtype
        # object (pandas 2) or StringDtype (pandas 3) text columns -> Arrow strings
        text = dtype == object or pd.api.types.is_string_dtype(dtype)
        fields.append(pa.field(name, pa.string() if text else pa.from_numpy_dtype(dtype)))
    return pa.schema(fields)


def cell_index_rows(plan: SlidePlan, slide: Any, config: BuildConfig, rows: np.ndarray,
                    truth: StagedTruth | None, truth_as_float: bool = False) -> pd.DataFrame:
    """The cell index rows of the slide's cells `rows` (in that order)."""
    sid, ps = plan.slide_id, plan.pixel_size_um
    cells_df = slide.cells
    cell_ids = np.asarray(cells_df.index[rows].astype(str))
    nrc, trc = plan.niche_rc[rows], plan.tissue_rc[rows]
    columns: dict[str, Any] = {
        "key": [cell_key(sid, c) for c in cell_ids],
        "slide_id": sid,
        "slide_index": np.full(len(rows), plan.slide_index, dtype=np.int32),
        "cell_id": cell_ids,
        "niche_id": [niche_id(sid, r, c) for r, c in nrc.tolist()],
        "tissue_id": [tissue_id(sid, r, c) for r, c in trc.tolist()],
        "split": np.asarray(SPLIT_NAMES, dtype=object)[plan.cell_split[rows]],
        "x_centroid_um": plan.centroid_px[rows, 0] * ps,
        "y_centroid_um": plan.centroid_px[rows, 1] * ps,
        "x_centroid_px": plan.centroid_px[rows, 0],
        "y_centroid_px": plan.centroid_px[rows, 1],
        "crop_x_px": (plan.crop_start[rows, 0] + config.cell_image_px / 2.0) / plan.scale["factor"],
        "crop_y_px": (plan.crop_start[rows, 1] + config.cell_image_px / 2.0) / plan.scale["factor"],
        "bbox_side_px": plan.stats.side_px[rows],
        "polygon_area_um2": plan.stats.area_px2[rows] * ps * ps,
        "clipped": plan.clipped[rows],
        "repaired": plan.repaired[rows],
        "niche_row": nrc[:, 0].astype(np.int32),
        "niche_col": nrc[:, 1].astype(np.int32),
        "tissue_row": trc[:, 0].astype(np.int32),
        "tissue_col": trc[:, 1].astype(np.int32),
        "total_counts": plan.total_counts[rows],
        "n_genes_detected": plan.genes_detected[rows],
    }
    skip_cols = {"x_centroid_um", "y_centroid_um", "x_centroid_px", "y_centroid_px", *slide.cluster_columns}
    for column in cells_df.columns:
        if column in skip_cols:
            continue
        values = cells_df[column].take(rows).to_numpy()  # take first: no whole-column copy per group
        if pd.api.types.is_numeric_dtype(cells_df[column]) or pd.api.types.is_bool_dtype(cells_df[column]):
            columns[f"qc_{column}"] = values.astype(np.float64)
        else:
            columns[f"qc_{column}"] = _as_text(values)
    for column in slide.cluster_columns:
        columns[f"label_{column}"] = _as_text(cells_df[column].take(rows).to_numpy())
    if truth is not None:
        for column, values in truth.rows(rows, as_float=truth_as_float).items():
            columns[f"truth_{column}"] = values
    return pd.DataFrame(columns)


def region_index_tables(plan: SlidePlan, config: BuildConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The niche and tissue index rows of one slide, in record order (chunk by chunk)."""
    sid, ps, tn = plan.slide_id, plan.pixel_size_um, config.tissue_niches
    # niches and tissue regions, chunk by chunk (record order)
    niche_rc, niche_tissue, niche_cells, niche_totals, niche_split = [], [], [], [], []
    tissue_rows = []
    for tr, tc in plan.chunks:
        chunk_rows = plan.chunk_cells[(tr, tc)]
        niches, local = chunk_niches(plan, chunk_rows)
        split = SPLIT_NAMES[plan.split_of_tissue(tr, tc, config.split_block_tissues)]
        niche_rc.append(niches)
        niche_tissue += [tissue_id(sid, tr, tc)] * len(niches)
        niche_split += [split] * len(niches)
        niche_cells.append(np.bincount(local, minlength=len(niches)))
        niche_totals.append(np.bincount(local, weights=plan.total_counts[chunk_rows], minlength=len(niches)))
        tissue_rows.append(
            {
                "key": tissue_id(sid, tr, tc),
                "slide_id": sid,
                "slide_index": plan.slide_index,
                "tissue_id": tissue_id(sid, tr, tc),
                "split": split,
                "tissue_row": tr,
                "tissue_col": tc,
                "x0_px": tc * config.tissue_px,
                "y0_px": tr * config.tissue_px,
                "x_center_um": (tc + 0.5) * config.tissue_px * ps,
                "y_center_um": (tr + 0.5) * config.tissue_px * ps,
                "n_niches": len(niches),
                "n_cells": len(chunk_rows),
                "total_counts": int(plan.total_counts[chunk_rows].sum()),
            }
        )
    if niche_rc:
        rc = np.concatenate(niche_rc).astype(np.int64)
        ids = [niche_id(sid, r, c) for r, c in rc.tolist()]
        niches_df = pd.DataFrame(
            {
                "key": ids,
                "slide_id": sid,
                "slide_index": np.full(len(rc), plan.slide_index, dtype=np.int32),
                "niche_id": ids,
                "tissue_id": niche_tissue,
                "split": niche_split,
                "niche_row": rc[:, 0].astype(np.int32),
                "niche_col": rc[:, 1].astype(np.int32),
                "grid_row": (rc[:, 0] % tn).astype(np.int32),
                "grid_col": (rc[:, 1] % tn).astype(np.int32),
                "x0_px": rc[:, 1] * config.niche_px,
                "y0_px": rc[:, 0] * config.niche_px,
                "x_center_um": (rc[:, 1] + 0.5) * config.niche_px * ps,
                "y_center_um": (rc[:, 0] + 0.5) * config.niche_px * ps,
                "n_cells": np.concatenate(niche_cells).astype(np.int32),
                "total_counts": np.rint(np.concatenate(niche_totals)).astype(np.int64),
            }
        )
    else:
        niches_df = _empty_niches()
    tissues_df = pd.DataFrame(tissue_rows) if tissue_rows else _empty_tissues()
    tissues_df = tissues_df.astype(
        {"slide_index": np.int32, "tissue_row": np.int32, "tissue_col": np.int32, "n_niches": np.int32, "n_cells": np.int32}
    )
    tissues_df = tissues_df.astype({"x0_px": np.int64, "y0_px": np.int64, "total_counts": np.int64})
    return niches_df, tissues_df


def _as_text(values: np.ndarray) -> np.ndarray:
    """Labels as str (object array), None where missing."""
    values = np.asarray(values, dtype=object)
    missing = pd.isna(values)
    out = values.astype(str).astype(object)
    out[missing] = None
    return out


def _empty_niches() -> pd.DataFrame:
    columns = {
        "key": object, "slide_id": object, "slide_index": np.int32, "niche_id": object, "tissue_id": object,
        "split": object, "niche_row": np.int32, "niche_col": np.int32, "grid_row": np.int32, "grid_col": np.int32,
        "x0_px": np.int64, "y0_px": np.int64, "x_center_um": np.float64, "y_center_um": np.float64,
        "n_cells": np.int32, "total_counts": np.int64,
    }  # fmt: skip
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def _empty_tissues() -> pd.DataFrame:
    columns = {
        "key": object, "slide_id": object, "slide_index": np.int32, "tissue_id": object, "split": object,
        "tissue_row": np.int32, "tissue_col": np.int32, "x0_px": np.int64, "y0_px": np.int64,
        "x_center_um": np.float64, "y_center_um": np.float64, "n_niches": np.int32, "n_cells": np.int32,
        "total_counts": np.int64,
    }  # fmt: skip
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def concat_parts(out_dir: Path, level: str, n_slides: int) -> int:
    """Concatenate the per-slide index parts into `<level>_index.parquet` (streamed, one slide
    at a time; columns missing from a slide are null). Returns the number of rows."""
    parts = [out_dir / BUILD_DIR_NAME / "index" / f"{k:05d}_{level}.parquet" for k in range(n_slides)]
    # a slide that kept no row (accept_cell_loss) wrote its empty columns with guessed types:
    # the schema comes from the parts that hold rows (all parts when none does)
    with_rows = [p for p in parts if pq.read_metadata(p).num_rows > 0] or parts
    schema = pa.unify_schemas([pq.read_schema(p).remove_metadata() for p in with_rows], promote_options="permissive")
    target = index_path(out_dir, level)
    tmp = target.with_name(target.name + ".tmp")
    n_rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=INDEX_BATCH_CELLS):
                table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table), type=schema.field(name).type))
                table = table.select(schema.names).cast(schema)
                writer.write_table(table)
                n_rows += len(table)
    os.replace(tmp, target)
    return n_rows
