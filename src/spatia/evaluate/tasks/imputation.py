"""Gene imputation: hold out a random fraction of each test cell's genes, predict them with the
model's gene decoder (`imputer`) and with kNN / mean baselines; Pearson and Spearman on the
held-out entries (log1p of raw counts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from spatia.errors import InputDataError
from spatia.evaluate import baselines
from spatia.evaluate.baselines import Imputer
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.metrics import masked_column_pearson, pooled_corr, skipped, stat, status_ok
from spatia.keys import TEST, TRAIN


def hold_out_mask(n_cells: int, n_genes: int, fraction: float, seed: int) -> np.ndarray:
    """bool (n_cells, n_genes): exactly max(1, round(fraction * n_genes)) random genes per cell."""
    n_hold = max(1, int(round(fraction * n_genes)))
    order = np.argsort(np.random.default_rng(seed).random((n_cells, n_genes)), axis=1)
    mask = np.zeros((n_cells, n_genes), dtype=bool)
    np.put_along_axis(mask, order[:, :n_hold], True, axis=1)
    return mask


def imputation_task(counts: sp.csr_matrix, obs_names: np.ndarray, split: np.ndarray, reps: dict[str, np.ndarray],
                    config: EvaluateConfig, imputer: Imputer | None, advance=lambda: None) -> dict[str, Any]:
    """Hold out genes of test cells; score the model's imputer and baseline imputers."""
    train_rows, test_rows = np.flatnonzero(split == TRAIN), np.flatnonzero(split == TEST)
    rng = np.random.default_rng(config.seed)
    if test_rows.size > config.impute_max_cells:
        test_rows = np.sort(rng.choice(test_rows, size=config.impute_max_cells, replace=False))
    imputers: dict[str, Imputer | None] = {"model": imputer}
    imputers["gene_mean"] = baselines.GeneMeanImputer(counts[train_rows])
    imputers["knn_expression"] = baselines.ExpressionKnnImputer(counts[train_rows], k=config.knn_k, seed=config.seed,
                                                                prior_cells=config.knn_prior_cells)
    reference = split == TRAIN
    for name in config.expression_inputs:
        if name in reps:
            imputers[f"knn_{name}"] = baselines.KnnImputer(reps[name], obs_names, reference, counts, k=config.knn_k,
                                                           prior_cells=config.knn_prior_cells)
    query = counts[test_rows].toarray()
    query_names = obs_names[test_rows]
    per: dict[str, dict[str, list[float]]] = {k: {"pearson": [], "spearman": [], "pearson_per_gene": []} for k in imputers}
    for seed in config.seeds:
        mask = hold_out_mask(*query.shape, config.impute_fraction, seed)
        visible = sp.csr_matrix(np.where(mask, 0.0, query).astype(np.float32))
        truth = np.log1p(query)
        for name, fn in imputers.items():
            if fn is None:
                continue
            pred = np.asarray(fn(visible, mask.copy(), query_names.copy()), dtype=np.float64)
            if pred.shape != query.shape:
                raise InputDataError(f"the {name} imputer returned shape {pred.shape}, expected {query.shape}",
                                     fix="return one prediction per (cell, gene) of the counts it was given")
            if not np.isfinite(pred[mask]).all():
                raise InputDataError(f"the {name} imputer returned NaN or infinite values on held-out entries",
                                     fix="return finite expected counts")
            logged = np.log1p(np.maximum(pred, 0.0))
            p, s = pooled_corr(truth[mask], logged[mask])
            per_gene = masked_column_pearson(truth, logged, mask)
            per[name]["pearson"].append(p)
            per[name]["spearman"].append(s)
            per[name]["pearson_per_gene"].append(float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() else np.nan)
        advance()
    results: dict[str, Any] = {}
    for name, fn in imputers.items():
        if fn is None:
            results[name] = skipped("no model given")
        else:
            results[name] = {"status": "ok", **{k: stat(v) for k, v in per[name].items()}}
    return status_ok(n_cells=int(test_rows.size), n_genes=int(query.shape[1]),
                     n_held_out_per_cell=int(max(1, round(config.impute_fraction * query.shape[1]))),
                     scale="log1p of raw counts", results=results)
