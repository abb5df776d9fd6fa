"""Paired bootstrap of a comparison over the test set: is SPATIA's lead over the best baseline
larger than what the choice of test cells alone moves it by?

On a small section (breast: 50 to 265 test cells) two representations can differ by a few
hundredths from test-set sampling alone, and the seed spread of the probes (none for the
deterministic XGBoost and ridge) does not show it. `paired_difference` resamples the test units
(cells, or niches for the patch-level task) with replacement, scores *both* rows on each
resample from the predictions they made once, and reports the difference's percentile
interval. The rows are scored on the same resampled units, so what the two share (hard cells,
rare classes) cancels.

This measures the test-set part of the uncertainty only; the seed spread of the probes and the
variation between trained models (one per seed of `bench_representation.py`) come on top.

`HeldOutPredictions` holds one row's test predictions, kept by the tasks while they score:
- annotation: labels (n_test,), one prediction per MLP seed; metric macro-F1 over the classes of
  the full test set (sklearn's `labels=`, zero_division 0), averaged over the seeds;
- expression from morphology and its patch-level form: values (n_test, G), one prediction per
  model (XGBoost or ridge); metric the per-gene Pearson averaged over the genes where both sides
  vary, as `regression_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MACRO_F1 = "macro_f1"
MEAN_PEARSON = "mean_pearson"
CHUNK = 100


@dataclass
class HeldOutPredictions:
    """One row's predictions on the task's test units (the same units, in the same order, for every
    row of a task). truth: (n,) labels or (n, G) values; fits: one prediction of truth's shape per
    fitted model (MLP seeds); classes: the labels macro-F1 averages over (annotation only)."""

    metric: str
    truth: np.ndarray
    fits: list[np.ndarray]
    classes: list[Any] = field(default_factory=list)


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """float64 (n_resamples, n): how often each of n units is drawn in each bootstrap resample."""
    draws = rng.integers(0, n, size=(n_resamples, n)) + n * np.arange(n_resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def weighted_macro_f1(truth: np.ndarray, pred: np.ndarray, classes: list[Any], weights: np.ndarray) -> np.ndarray:
    """Macro-F1 over `classes` of each weighting (row of weights (R, n)): (R,). A weight of k counts
    a unit k times, so integer weights give the macro-F1 of the resample; a class with no true and
    no predicted unit in a resample scores 0 (sklearn's zero_division=0 with labels=classes)."""
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    names = np.asarray([str(c) for c in classes])
    is_true = (truth[:, None] == names[None, :]).astype(np.float64)          # (n, C)
    is_pred = (pred[:, None] == names[None, :]).astype(np.float64)
    tp = weights @ (is_true * is_pred)                                       # (R, C)
    denom = weights @ is_true + weights @ is_pred
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return f1.mean(axis=1)


def weighted_mean_pearson(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-column Pearson under each weighting, averaged over the columns where both sides vary
    (NaN when none does): (R,). Unit weights give `per_column_corr`'s Pearson."""
    truth, pred = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    # centre on the unweighted means first: the weighted moments below then lose no precision
    truth = truth - truth.mean(axis=0)
    pred = pred - pred.mean(axis=0)
    total = weights.sum(axis=1, keepdims=True)                               # (R, 1)
    mt, mp = weights @ truth / total, weights @ pred / total                 # (R, G)
    vt = weights @ truth**2 / total - mt**2
    vp = weights @ pred**2 / total - mp**2
    cov = weights @ (truth * pred) / total - mt * mp
    # a column "varies" under a weighting when its variance is above 1e-12 of its unweighted one
    ok = (vt > 1e-12 * truth.var(axis=0)) & (vp > 1e-12 * pred.var(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, cov / np.sqrt(np.where(ok, vt * vp, 1.0)), 0.0)
    counted = ok.sum(axis=1)
    return np.where(counted > 0, r.sum(axis=1) / np.maximum(counted, 1), np.nan)


def score(predictions: HeldOutPredictions, weights: np.ndarray) -> np.ndarray:
    """The row's metric under each weighting (R, n) -> (R,), averaged over its fits."""
    if predictions.metric == MACRO_F1:
        per_fit = [weighted_macro_f1(predictions.truth, p, predictions.classes, weights) for p in predictions.fits]
    elif predictions.metric == MEAN_PEARSON:
        per_fit = [weighted_mean_pearson(predictions.truth, p, weights) for p in predictions.fits]
    else:
        raise ValueError(f"unknown metric {predictions.metric!r}")
    return np.mean(per_fit, axis=0)


def paired_difference(a: HeldOutPredictions, b: HeldOutPredictions, n_resamples: int, seed: int,
                      level: float = 0.95) -> dict[str, Any]:
    """a's metric minus b's on the full test set, and its percentile interval over `n_resamples`
    paired bootstrap resamples of the test units.

    Returns {"difference", "interval": [low, high], "level", "n_resamples", "n_test",
    "resolved"}: resolved is True when the interval excludes 0 (the test set tells the rows
    apart). Resamples where either metric is undefined are left out of the interval.
    """
    if a.metric != b.metric or a.truth.shape != b.truth.shape:
        raise ValueError("paired rows must share the metric and the test units")
    n = int(a.truth.shape[0])
    point = float(score(a, np.ones((1, n)))[0] - score(b, np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_resamples, CHUNK):  # chunks bound the memory at CHUNK x n weights
        weights = resample_counts(n, min(CHUNK, n_resamples - start), rng)
        diffs.append(score(a, weights) - score(b, weights))
    diffs = np.concatenate(diffs) if diffs else np.empty(0)
    diffs = diffs[np.isfinite(diffs)]
    tail = (1.0 - level) / 2 * 100
    low, high = (np.percentile(diffs, [tail, 100 - tail]) if diffs.size else (np.nan, np.nan))
    return {"difference": point, "interval": [float(low), float(high)], "level": level,
            "n_resamples": int(diffs.size), "n_test": n, "resolved": bool(low > 0 or high < 0)}
