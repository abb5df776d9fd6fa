"""The rows and obs of `spatia embed`'s AnnData: every input cell in the bundle's order (the
dataset's `input_cells.parquet`), the cells the build skipped with their reason and raw counts,
and the cell-index columns under the reader's (`XeniumSlide.to_anndata`) names."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatia.errors import DatasetError
from spatia.keys import SKIP_REASON

log = logging.getLogger("spatia.train.embed")


def output_cell_names(slide_ids, cell_ids) -> np.ndarray:
    """Obs names of cells given their slide and cell IDs: the cell ID, or `slide_id/cell_id`
    when IDs repeat across the cells given."""
    import pandas as pd

    ids = pd.Series(np.asarray(cell_ids).astype(str))
    if ids.duplicated().any():
        ids = pd.Series(np.asarray(slide_ids).astype(str)) + "/" + ids
    return ids.to_numpy()


def reader_names(columns) -> dict[str, str]:
    """Renames from cell-index columns to the reader's (`to_anndata`) obs names: `label_<c>` and
    `qc_<c>` -> `<c>`, the index's own `total_counts` (counts in the vocabulary) ->
    `gene_counts_total`; a name already taken keeps its prefix."""
    columns = list(columns)
    renames = {"total_counts": "gene_counts_total"} if "total_counts" in columns else {}
    taken = {renames.get(c, c) for c in columns if not c.startswith(("label_", "qc_"))}
    for column in columns:
        for prefix in ("label_", "qc_"):
            name = column.removeprefix(prefix)
            if column.startswith(prefix) and name not in taken:
                renames[column] = name
                taken.add(name)
    return renames


def h5ad_ready(obs):
    """Text columns as categoricals (missing values NaN), bool columns with missing values as
    pandas' nullable boolean, so that `write_h5ad` takes every column."""
    import pandas as pd

    for column in obs.columns:
        values = obs[column]
        if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
            present = values[values.notna()]
            if len(present) and present.map(lambda v: isinstance(v, (bool, np.bool_))).all():
                obs[column] = values.astype("boolean")
            else:
                obs[column] = pd.Categorical(values.where(values.isna(), values.astype(str)))
    return obs


@dataclass
class OutputRows:
    """The rows `embed` writes: `obs` (reader order), for each row its cell-index row (-1 for a
    skipped cell), and the skipped cells' raw counts (CSR, vocabulary columns; zero rows for the
    embedded cells)."""

    obs: Any
    index_row: np.ndarray
    skipped_counts: Any


def output_rows(context, dataset: Path, wanted: np.ndarray) -> OutputRows:
    """The rows of `embed`'s AnnData: every input cell in the bundle order (`input_cells.parquet`),
    or with `wanted` not all True only the kept cells it selects; a dataset built before
    `input_cells.parquet` existed gives the cell-index order (with a warning)."""
    import pandas as pd
    from scipy import sparse

    from spatia.mist.build.output import INPUT_CELLS_NAME, read_input_cells

    index = context.cell_index
    n_genes = len(context.genes)
    inputs = read_input_cells(dataset)
    if inputs is None:
        log.warning("%s has no %s (built by an older spatia): rows follow the dataset's cell index, not the "
                    "bundle's cell order, and skipped cells are left out; rebuild the dataset for the bundle's order",
                    dataset, INPUT_CELLS_NAME)
        rows = np.flatnonzero(wanted)
        obs = index.iloc[rows].reset_index(drop=True)
        obs[SKIP_REASON] = None
        return OutputRows(obs, rows, sparse.csr_matrix((len(rows), n_genes), dtype=np.float32))

    def keys(frame) -> pd.Index:
        return pd.Index(frame["slide_index"].astype(np.int64).astype(str) + "\x00" + frame["cell_id"].astype(str))

    kept = inputs["skip_reason"].isna().to_numpy()
    index_row = np.full(len(inputs), -1, dtype=np.int64)
    index_row[kept] = keys(index).get_indexer(keys(inputs[kept]))
    if (index_row[kept] < 0).any() or int(kept.sum()) != len(index):
        raise DatasetError(f"{INPUT_CELLS_NAME} and the cell index disagree on the kept cells", path=dataset,
                           fix="rebuild the dataset with `spatia build`")
    chosen = np.ones(len(inputs), dtype=bool) if wanted.all() else (kept & wanted[np.maximum(index_row, 0)])
    inputs, index_row, kept = inputs[chosen].reset_index(drop=True), index_row[chosen], kept[chosen]

    parts = [index.iloc[index_row[kept]].assign(_position=np.flatnonzero(kept))]
    skipped = np.flatnonzero(~kept)
    if len(skipped):
        extra = [c for c in inputs.columns if c not in index.columns and c not in
                 ("skip_reason", "counts_gene_indices", "counts_values")]
        parts.append(inputs.iloc[skipped][[c for c in index.columns if c in inputs.columns] + extra]
                     .assign(_position=skipped))
    obs = pd.concat(parts, ignore_index=True).sort_values("_position").drop(columns="_position").reset_index(drop=True)
    obs[SKIP_REASON] = inputs["skip_reason"].to_numpy()
    for column in ("x_centroid_um", "y_centroid_um"):  # the reader's values, bit for bit
        obs[column] = inputs[column].to_numpy(dtype=np.float64)

    lengths = np.zeros(len(inputs), dtype=np.int64)
    gene_lists = inputs["counts_gene_indices"].to_numpy() if "counts_gene_indices" in inputs else None
    value_lists = inputs["counts_values"].to_numpy() if "counts_values" in inputs else None
    genes, values = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    if gene_lists is not None:
        for i in skipped:
            if gene_lists[i] is not None:
                lengths[i] = len(gene_lists[i])
                genes.append(np.asarray(gene_lists[i], dtype=np.int64))
                values.append(np.asarray(value_lists[i], dtype=np.float32))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    counts = sparse.csr_matrix((np.concatenate(values), np.concatenate(genes), indptr), shape=(len(inputs), n_genes))
    return OutputRows(obs, index_row, counts)
