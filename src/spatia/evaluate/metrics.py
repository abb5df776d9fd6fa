"""Scores and result-entry helpers shared by the evaluation tasks.

Every metric is reported by `stat`: mean, standard deviation (ddof 1), the per-run values, the
number of runs and whether the model is deterministic (fitted once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def stat(values: Sequence[float], *, deterministic: bool = False) -> dict[str, Any]:
    """Mean, std and the values of one metric over runs (NaN runs are left out of mean/std)."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if finite.size else None,
        "values": [None if not np.isfinite(v) else float(v) for v in arr],
        "n_runs": int(arr.size),
        "deterministic": deterministic,
    }


def status_ok(**extra: Any) -> dict[str, Any]:
    return {"status": "ok", **extra}


def skipped(reason: str) -> dict[str, Any]:
    return {"status": f"skipped: {reason}"}


def per_column_corr(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson and Spearman of each column (gene); NaN where either side is constant."""
    from scipy.stats import rankdata

    def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
        den = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (a * b).sum(axis=0) / den
        return np.where(den > 1e-12, r, np.nan)

    return pearson(true, pred), pearson(rankdata(true, axis=0), rankdata(pred, axis=0))


def masked_column_pearson(true: np.ndarray, pred: np.ndarray, mask: np.ndarray, min_entries: int = 5) -> np.ndarray:
    """Pearson per column over the entries where mask is True (NaN with < min_entries)."""
    m = mask.astype(np.float64)
    n = m.sum(axis=0)
    safe = np.maximum(n, 1.0)
    mt = (true * m).sum(axis=0) / safe
    mp = (pred * m).sum(axis=0) / safe
    dt = (true - mt) * m
    dp = (pred - mp) * m
    den = np.sqrt((dt**2).sum(axis=0) * (dp**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dt * dp).sum(axis=0) / den
    return np.where((den > 1e-12) & (n >= min_entries), r, np.nan)


def pooled_corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman over all entries (NaN when fewer than 3 or either side constant)."""
    from scipy.stats import pearsonr, spearmanr

    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Per-gene Pearson / Spearman of a multi-output regression, and their means over genes."""
    pearson, spearman = per_column_corr(y_true, y_pred)
    return {
        "status": "ok",
        "pearson": stat([np.nanmean(pearson) if np.isfinite(pearson).any() else np.nan], deterministic=True),
        "spearman": stat([np.nanmean(spearman) if np.isfinite(spearman).any() else np.nan], deterministic=True),
        "n_genes_scored": int(np.isfinite(pearson).sum()),
        "per_gene_pearson": [None if not np.isfinite(v) else float(v) for v in pearson],
        "per_gene_spearman": [None if not np.isfinite(v) else float(v) for v in spearman],
    }
