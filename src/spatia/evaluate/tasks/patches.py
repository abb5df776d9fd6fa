"""Patch-level expression prediction (the paper's Fig. 5, HEST-Bench style).

From image-only inputs of each niche (a 256 px tile of the MIST dataset) predict the niche's
pooled expression: the counts of its cells summed, log-normalised (median library size of the
niches), for the top highly variable genes (selected on train niches). XGBoost (100 trees of
depth 3) and ridge, per-gene Pearson and Spearman on the test niches.

Inputs per niche: the mean over its cells of each image-only obsm key in
``config.patch_inputs`` (``X_spatia_image_niche`` is already shared by the niche's cells) and
``niche_morphology``: hand-made features of the niche image (`niche_image_features`).

A niche is a train niche when all its evaluated cells are in the train split and a test niche
when all are in the test split; niches with cells on both sides or in the buffer are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.evaluate.bootstrap import HeldOutPredictions
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.metrics import skipped, status_ok
from spatia.evaluate.tasks.expression import fit_and_score, select_hvgs
from spatia.expression import log_normalise
from spatia.keys import TEST, TRAIN

NICHE_MORPHOLOGY = "niche_morphology"
MIN_TRAIN_NICHES, MIN_TEST_NICHES = 20, 5


def niche_membership(niche_of_cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(niche IDs (M,) sorted, cell -> niche row (N,), -1 for cells without a niche)."""
    values = pd.Series(niche_of_cell, dtype=object)
    has = values.notna() & (values.astype(str) != "")
    ids = np.array(sorted(set(values[has].astype(str))), dtype=object)
    rows = np.full(len(values), -1, dtype=np.int64)
    rows[has.to_numpy()] = pd.Index(ids).get_indexer(values[has].astype(str))
    return ids, rows


def niche_split(cell_split: np.ndarray, niche_row: np.ndarray, n_niches: int) -> np.ndarray:
    """train / test / "mixed" per niche (all cells train, all cells test, anything else)."""
    has = niche_row >= 0
    n_cells = np.bincount(niche_row[has], minlength=n_niches)
    n_train = np.bincount(niche_row[has], weights=(cell_split[has] == TRAIN), minlength=n_niches)
    n_test = np.bincount(niche_row[has], weights=(cell_split[has] == TEST), minlength=n_niches)
    out = np.full(n_niches, "mixed", dtype=object)
    out[(n_cells > 0) & (n_train == n_cells)] = TRAIN
    out[(n_cells > 0) & (n_test == n_cells)] = TEST
    return out


def pool_by_niche(values: sp.spmatrix | np.ndarray, niche_row: np.ndarray, n_niches: int, *,
                  mean: bool = False) -> sp.csr_matrix | np.ndarray:
    """Sum (or mean) of the rows of each niche: (M, F); sparse stays sparse."""
    has = np.flatnonzero(niche_row >= 0)
    member = sp.csr_matrix((np.ones(has.size), (niche_row[has], has)), shape=(n_niches, len(niche_row)))
    pooled = member @ values
    if not mean:
        return sp.csr_matrix(pooled) if sp.issparse(values) else np.asarray(pooled)
    sizes = np.maximum(np.asarray(member.sum(axis=1)).ravel(), 1.0)
    return np.asarray(pooled.toarray() if sp.issparse(pooled) else pooled) / sizes[:, None]


def niche_image_features(images: np.ndarray) -> pd.DataFrame:
    """Hand-made features of niche tiles, uint8 (M, S, S) -> DataFrame (M, F).

    Intensity statistics and grey-level co-occurrence texture of the whole tile
    (`morphology_features` with a full mask), and of the nuclei: the foreground above the tile's
    Otsu threshold (its fraction of the tile, number of connected components and their mean
    area in pixels).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from spatia.evaluate.morphology import SHAPE_FEATURES, morphology_features

    images = np.asarray(images)
    full = np.ones(images.shape, dtype=bool)
    whole = morphology_features(images, full).drop(columns=list(SHAPE_FEATURES))
    fraction, n_parts, mean_area = [], [], []
    for image in images:
        threshold = threshold_otsu(image) if np.ptp(image) > 0 else 255
        foreground = image > threshold
        _, count = ndi.label(foreground)
        fraction.append(float(foreground.mean()))
        n_parts.append(float(count))
        mean_area.append(float(foreground.sum()) / count if count else 0.0)
    whole["foreground_fraction"] = fraction
    whole["foreground_components"] = n_parts
    whole["foreground_mean_area_px"] = mean_area
    return whole


def patch_expression_task(reps: dict[str, np.ndarray], counts: sp.csr_matrix, gene_names: np.ndarray,
                          niche_of_cell: np.ndarray | None, split: np.ndarray, config: EvaluateConfig,
                          niche_features: pd.DataFrame | None = None, advance=lambda: None,
                          keep: dict[str, dict[str, HeldOutPredictions]] | None = None) -> dict[str, Any]:
    """Predict each niche's pooled HVG expression from its image-only inputs (XGBoost, ridge).

    Args:
        niche_of_cell: (N,) niche ID of each cell (None / "" for none); None skips the task.
        niche_features: hand-made features of the niche images, indexed by niche ID (e.g.
            `niche_image_features` of the MIST niche crops); None leaves that input out.
        keep: as `fit_and_score`'s, per input name (the test units are the test niches).
    """
    if niche_of_cell is None:
        return skipped(f"the AnnData has no obs column {config.niche_column!r} of niche IDs "
                       "(written by `spatia embed`)")
    ids, rows = niche_membership(niche_of_cell)
    n_niches = len(ids)
    where = niche_split(split, rows, n_niches)
    train, test = where == TRAIN, where == TEST
    if train.sum() < MIN_TRAIN_NICHES or test.sum() < MIN_TEST_NICHES:
        return skipped(f"{int(train.sum())} train and {int(test.sum())} test niches (>= {MIN_TRAIN_NICHES} and "
                       f">= {MIN_TEST_NICHES} needed)")
    inputs: dict[str, np.ndarray] = {}
    for name in config.patch_inputs:
        if name == NICHE_MORPHOLOGY:
            if niche_features is not None:
                from spatia.evaluate.baselines import standardise_features

                aligned = niche_features.reindex(pd.Index(ids.astype(str)))
                if aligned.notna().all(axis=1).sum() >= 0.9 * n_niches:
                    inputs[name] = standardise_features(aligned.to_numpy())
        elif name in reps:
            inputs[name] = pool_by_niche(reps[name], rows, n_niches, mean=True).astype(np.float32)
    if not inputs:
        return skipped(f"none of the inputs {list(config.patch_inputs)} is available (image-only embeddings "
                       "from `spatia embed --modality image`, niche crops from the MIST dataset)")
    pooled = log_normalise(pool_by_niche(counts, rows, n_niches))
    genes_idx = select_hvgs(pooled[train], gene_names, config.n_hvg, config.hvg_min_detection)
    y = pooled[:, genes_idx].toarray()
    results = {}
    for name, x in inputs.items():
        results[name] = fit_and_score(x, y, train, test, config,
                                      keep=None if keep is None else keep.setdefault(name, {}))
        advance()
    cells_per_niche = np.bincount(rows[rows >= 0], minlength=n_niches)
    return status_ok(genes=gene_names[genes_idx].tolist(), n_niches=int(n_niches), n_train=int(train.sum()),
                     n_test=int(test.sum()), n_left_out=int(n_niches - train.sum() - test.sum()),
                     median_cells_per_niche=float(np.median(cells_per_niche)),
                     target="log1p(niche counts / total * median niche total)", results=results)
