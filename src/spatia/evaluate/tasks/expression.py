"""Expression from morphology: from image-only inputs (SPATIA image-only embedding, morphology
features) predict the log-normalised expression of the top highly variable genes with XGBoost
(100 trees of depth 3 per gene, as the paper) and ridge regression; per-gene Pearson and
Spearman on the test split, averaged."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.evaluate.bootstrap import MEAN_PEARSON, HeldOutPredictions
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.metrics import regression_scores, skipped, status_ok
from spatia.keys import TEST, TRAIN


def expression_task(reps: dict[str, np.ndarray], log_expr: sp.csr_matrix, gene_names: np.ndarray,
                    split: np.ndarray, config: EvaluateConfig, advance=lambda: None,
                    keep: dict[str, dict[str, HeldOutPredictions]] | None = None) -> dict[str, Any]:
    """Predict log-normalised HVG expression from image-only representations (XGBoost, ridge).
    keep: as `fit_and_score`'s, per input name."""
    inputs = [name for name in config.expression_inputs if name in reps]
    if not inputs:
        return skipped(f"none of the image-only inputs {list(config.expression_inputs)} is available "
                       "(run `spatia embed --modality image`, or give crops / obsm['X_morphology'])")
    train, test = split == TRAIN, split == TEST
    genes_idx = select_hvgs(log_expr[train], gene_names, config.n_hvg, config.hvg_min_detection)
    y = log_expr[:, genes_idx].toarray()
    results = {}
    for name in inputs:
        results[name] = fit_and_score(reps[name], y, train, test, config,
                                      keep=None if keep is None else keep.setdefault(name, {}))
        advance()
    return status_ok(genes=gene_names[genes_idx].tolist(), n_train=int(train.sum()), n_test=int(test.sum()),
                     target="log1p(counts / total * median total)", results=results)


def fit_and_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                  config: EvaluateConfig, keep: dict[str, HeldOutPredictions] | None = None) -> dict[str, Any]:
    """Ridge and XGBoost from standardised x to every column of y; scores on the test rows.

    Ridge takes the penalty among config.ridge_alphas with the lowest leave-one-out error on the
    train rows (sklearn's RidgeCV, efficient generalised cross-validation; one penalty for all
    columns), recorded as entry["ridge"]["alpha"].

    XGBoost sees at most config.xgb_max_train_cells train rows (a seeded subsample). keep: when
    given, keep["ridge"] and keep["xgboost"] receive the test predictions, for the paired
    bootstrap of `spatia.evaluate.bootstrap`.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    try:
        import xgboost
    except ImportError:  # the dependency is declared; guard a broken install
        xgboost = None
    train_rows = np.flatnonzero(train)
    if config.xgb_max_train_cells is not None and train_rows.size > config.xgb_max_train_cells:
        rng = np.random.default_rng(config.seed)
        xgb_rows = np.sort(rng.choice(train_rows, size=config.xgb_max_train_cells, replace=False))
    else:
        xgb_rows = train_rows
    scaler = StandardScaler().fit(x[train])
    x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
    y_train, y_test = y[train], y[test]
    entry: dict[str, Any] = {}
    ridge = RidgeCV(alphas=np.asarray(config.ridge_alphas, dtype=float)).fit(x_train, y_train)
    predictions = {"ridge": ridge.predict(x_test)}
    entry["ridge"] = regression_scores(y_test, predictions["ridge"])
    entry["ridge"]["alpha"] = float(ridge.alpha_)
    if xgboost is None:
        entry["xgboost"] = skipped("xgboost is not installed")
    else:
        model = xgboost.XGBRegressor(n_estimators=config.xgb_estimators, max_depth=config.xgb_max_depth,
                                     tree_method="hist", max_bin=config.xgb_max_bin, n_jobs=config.n_jobs,
                                     random_state=config.seed)
        model.fit(scaler.transform(x[xgb_rows]), y[xgb_rows])
        predictions["xgboost"] = model.predict(x_test).reshape(y_test.shape)
        entry["xgboost"] = regression_scores(y_test, predictions["xgboost"])
        entry["xgboost"]["n_train"] = int(xgb_rows.size)
    if keep is not None:
        keep.update({model: HeldOutPredictions(MEAN_PEARSON, y_test, [p]) for model, p in predictions.items()})
    return entry


def select_hvgs(log_expr_train: sp.csr_matrix | np.ndarray, gene_names: np.ndarray, n_top: int,
                min_detection: float) -> np.ndarray:
    """Indices of the top highly variable genes (scanpy "seurat" normalised dispersion).

    Candidates are the genes detected in at least `min_detection` of the cells: on sparse
    single-cell panels (a few counts per cell) the highest dispersions otherwise belong to
    genes seen in a handful of cells, which no representation can predict.
    """
    import anndata as ad
    import scanpy as sc

    log_expr_train = sp.csr_matrix(log_expr_train)
    detected = np.asarray((log_expr_train > 0).mean(axis=0)).ravel()
    candidates = np.flatnonzero(detected >= min_detection)
    if candidates.size < 2:
        candidates = np.arange(log_expr_train.shape[1])
    holder = ad.AnnData(X=log_expr_train[:, candidates].copy(), var=pd.DataFrame(index=gene_names[candidates]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(holder, flavor="seurat", n_top_genes=min(n_top, candidates.size))
    dispersion = holder.var["dispersions_norm"].fillna(-np.inf).to_numpy()
    return candidates[np.argsort(-dispersion, kind="stable")[: min(n_top, candidates.size)]]
