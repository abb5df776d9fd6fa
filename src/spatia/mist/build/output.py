"""The output directory of a build: refusing a foreign or complete one, starting or checking
the state of a resumed one, removing what a failed fresh build wrote, turning an output place
that cannot take the dataset into `OutputWriteError`, and the table of every input cell
(`input_cells.parquet`: the bundle's cell order and the skipped cells, with why)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatia.errors import DatasetError, OutputExistsError, OutputWriteError
from spatia.mist.store import BUILD_DIR_NAME, MANIFEST_NAME
from spatia.outputs import user_output_errors, write_json


def check_output(out_dir: Path) -> bool:
    """Refuse a complete dataset or a foreign non-empty directory; True when `out_dir` holds an
    interrupted build (to be checked against this one's state before resuming)."""
    if (out_dir / MANIFEST_NAME).exists():
        raise OutputExistsError(
            "a complete MIST dataset already exists here and spatia does not overwrite it",
            path=out_dir,
            fix="choose a new output directory, or delete this one yourself",
        )
    if (out_dir / BUILD_DIR_NAME / "state.json").exists():
        return True
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            "the output path exists and is not an empty directory or an interrupted MIST build",
            path=out_dir,
            fix="choose a new output directory (spatia never writes into a non-empty one)",
        )
    return False


def prepare_output(out_dir: Path, state: dict[str, Any], interrupted: bool) -> None:
    """Start a new build (write its state) or check that the interrupted one has the same
    inputs, config, seed and vocabulary."""
    state_file = out_dir / BUILD_DIR_NAME / "state.json"
    if interrupted:
        previous = json.loads(state_file.read_text())
        differences = [k for k in ("format_version", "config", "seed", "sources", "genes") if previous.get(k) != state.get(k)]
        if differences:
            raise DatasetError(
                "this directory holds an interrupted build of different inputs or options "
                f"(differs in: {', '.join(differences)}); it cannot be resumed with these",
                path=out_dir,
                fix="rerun with the original bundles, options and seed to resume, or delete the directory to start over",
            )
        return
    (out_dir / BUILD_DIR_NAME / "index").mkdir(parents=True, exist_ok=True)
    write_json(state_file, state)


_LMDB_WRITE_PROBLEMS = ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system")


@contextlib.contextmanager
def output_errors(out_dir: Path):
    """An output place that cannot take the dataset (no permission, read-only, full disk, also
    as LMDB reports it) becomes `OutputWriteError`, naming the directory and the fix."""
    import lmdb

    fix = "free disk space (or choose another output directory); rerunning the same command resumes the build"
    try:
        with user_output_errors(out_dir):
            yield
    except OutputWriteError as error:
        raise OutputWriteError(error.problem, path=out_dir, fix=fix) from None
    except lmdb.MapFullError:
        raise OutputWriteError("an LMDB store reached lmdb_map_size_gb", path=out_dir,
                               fix="build again with a larger lmdb_map_size_gb") from None
    except lmdb.Error as error:
        reason = next((p for p in _LMDB_WRITE_PROBLEMS if p in str(error)), None)
        if reason is None:
            raise
        raise OutputWriteError(f"cannot write the dataset's stores ({reason.lower()})", path=out_dir, fix=fix) from None


def remove_output(out_dir: Path, existed: bool) -> None:
    """Remove what a failed fresh build wrote (the directory itself unless it existed, empty)."""
    if not existed:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for item in out_dir.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


# --- every input cell, in the bundle's order ----------------------------------------------------

INPUT_CELLS_NAME = "input_cells.parquet"
"""One row per cell of every input slide, slide by slide in the reader's order (the bundle's
cells.parquet order): `slide_id`, `slide_index`, `cell_id`, `skip_reason` (null for a kept
cell, else the build's reason, e.g. "zero_counts"), the reader's `x_centroid_um`,
`y_centroid_um`. Skipped cells also carry the cell-index columns that mean something for them
(pixel centroids, `qc_*`, `label_*`, `truth_*`, total_counts,
n_genes_detected) and their raw counts as `counts_gene_indices` / `counts_values` (vocabulary
columns); a kept cell's are in the cell index and the cell store. `spatia embed` writes its
rows in this order, the skipped cells flagged."""

# cell-index columns that describe a kept cell's record (crop, niche, split): null for a skipped cell
_RECORD_ONLY_COLUMNS = ("key", "niche_id", "tissue_id", "split", "crop_x_px", "crop_y_px", "bbox_side_px",
                        "polygon_area_um2", "clipped", "repaired", "niche_row", "niche_col", "tissue_row",
                        "tissue_col")


def write_input_cells(plan: Any, slide: Any, config: Any, staged: Any, path: Path) -> None:
    """Write one slide's part of `INPUT_CELLS_NAME` (through a temporary file) while its staged
    tables (counts, ground truth) are still on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spatia.mist.build.index import cell_index_rows
    from spatia.mist.build.plan import SKIP_REASONS
    from spatia.mist.build.sources import ground_truth_file
    from spatia.mist.staging import stage_ground_truth

    n = len(plan.reason)
    skipped = np.flatnonzero(plan.reason != 0)
    reasons = np.asarray([None, *SKIP_REASONS], dtype=object)[plan.reason]
    table = pa.table({
        "slide_id": pa.array([plan.slide_id] * n, type=pa.string()),
        "slide_index": pa.array(np.full(n, plan.slide_index, dtype=np.int32)),
        "cell_id": pa.array(np.asarray(slide.cells.index.astype(str)), type=pa.string()),
        "skip_reason": pa.array(reasons, type=pa.string()),
        # the reader's centroids, bit for bit (the cell index derives its own from pixels)
        "x_centroid_um": pa.array(slide.cells["x_centroid_um"].to_numpy(dtype=np.float64)),
        "y_centroid_um": pa.array(slide.cells["y_centroid_um"].to_numpy(dtype=np.float64)),
    })
    if len(skipped):
        truth_file = ground_truth_file(slide)
        truth = None if truth_file is None else stage_ground_truth(truth_file, slide.cells.index, staged.directory)
        frame = cell_index_rows(plan, slide, config, skipped, truth, truth_as_float=truth is not None and bool(
            (~truth.has_row[skipped]).any()))
        frame = frame.drop(columns=["slide_id", "slide_index", "cell_id", "x_centroid_um", "y_centroid_um",
                                    *_RECORD_ONLY_COLUMNS], errors="ignore")
        indptr, indices, values = staged.counts.rows(skipped)
        lengths = np.diff(np.asarray(indptr, dtype=np.int64))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        details = pa.Table.from_pandas(frame, preserve_index=False)
        details = details.append_column("counts_gene_indices", pa.ListArray.from_arrays(
            offsets, pa.array(np.asarray(indices, dtype=np.int32))))
        details = details.append_column("counts_values", pa.ListArray.from_arrays(
            offsets, pa.array(np.asarray(values, dtype=np.int64))))
        # row i of the slide: its row of `details` when skipped, else null (a null take gives nulls)
        position = np.zeros(n, dtype=np.int64)
        position[skipped] = np.arange(len(skipped))
        details = details.take(pa.array(position, mask=plan.reason == 0))
        for name in details.column_names:
            table = table.append_column(name, details.column(name))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def concat_input_cells(out_dir: Path, parts: list[Path]) -> int:
    """Concatenate the per-slide parts into `out_dir/INPUT_CELLS_NAME` (columns a slide lacks
    are null); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in parts]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    target = out_dir / INPUT_CELLS_NAME
    tmp = target.with_name(target.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(None), tmp)
    os.replace(tmp, target)
    return table.num_rows


def read_input_cells(dataset: Path) -> pd.DataFrame | None:
    """The dataset's `INPUT_CELLS_NAME` table, or None for a dataset built before it existed."""
    path = Path(dataset) / INPUT_CELLS_NAME
    if not path.is_file():
        return None
    return pd.read_parquet(path)
