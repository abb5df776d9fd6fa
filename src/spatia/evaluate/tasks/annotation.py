"""Cell annotation: MLP (one fit per seed) and logistic regression (deterministic, one fit, its
L2 strength chosen by cross-validation on the train cells) on each representation, trained on the
train split and scored on the test split (macro-F1, macro-precision, accuracy)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from spatia.evaluate.bootstrap import MACRO_F1, HeldOutPredictions
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.metrics import skipped, stat, status_ok
from spatia.keys import TEST, TRAIN


def annotation_task(reps: dict[str, np.ndarray], labels: np.ndarray, split: np.ndarray,
                    config: EvaluateConfig, advance=lambda: None,
                    keep: dict[str, dict[str, HeldOutPredictions]] | None = None) -> dict[str, Any]:
    """MLP and logistic regression per representation; macro-F1, macro-precision, accuracy.

    keep: when given, keep[name]["mlp"] receives the MLPs' test predictions (one per seed), for
    the paired bootstrap of `spatia.evaluate.bootstrap`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score, precision_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    labelled = labels != None  # noqa: E711
    train_counts = pd.Series(labels[labelled & (split == TRAIN)]).value_counts()
    kept = sorted(train_counts[train_counts >= config.min_class_train_cells].index)
    excluded = sorted(set(labels[labelled]) - set(kept))
    use = labelled & np.isin(labels, kept)
    train, test = use & (split == TRAIN), use & (split == TEST)
    if len(kept) < 2 or test.sum() == 0:
        return skipped(f"{len(kept)} class(es) with >= {config.min_class_train_cells} train cells and "
                       f"{int(test.sum())} test cells")
    y_train, y_test = labels[train].astype(str), labels[test].astype(str)
    test_classes = sorted(set(y_test))

    def scores(pred: np.ndarray) -> dict[str, float]:
        return {
            "macro_f1": f1_score(y_test, pred, labels=test_classes, average="macro", zero_division=0),
            "precision": precision_score(y_test, pred, labels=test_classes, average="macro", zero_division=0),
            "accuracy": accuracy_score(y_test, pred),
        }

    # at least ~20 updates per epoch, so early stopping does not end training on small sets
    batch_size = int(np.clip(train.sum() // 20, 32, 256))
    results: dict[str, Any] = {}
    for name, x in reps.items():
        scaler = StandardScaler().fit(x[train])
        x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
        per_seed: dict[str, list[float]] = {"macro_f1": [], "precision": [], "accuracy": []}
        predictions = []
        for seed in config.seeds:
            mlp = MLPClassifier(hidden_layer_sizes=config.mlp_hidden, alpha=config.mlp_alpha, early_stopping=True,
                                validation_fraction=0.1, n_iter_no_change=15, max_iter=config.mlp_max_iter,
                                batch_size=batch_size, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                mlp.fit(x_train, y_train)
            predictions.append(mlp.predict(x_test))
            for key, value in scores(predictions[-1]).items():
                per_seed[key].append(value)
        if keep is not None:
            keep[name] = {"mlp": HeldOutPredictions(MACRO_F1, y_test, predictions, test_classes)}
        logreg, c = fit_logistic_regression(x_train, y_train, config)
        lr_scores = scores(logreg.predict(x_test))
        results[name] = {
            "mlp": {k: stat(v) for k, v in per_seed.items()},
            "logreg": {**{k: stat([v], deterministic=True) for k, v in lr_scores.items()}, "C": c},
        }
        advance()
    return status_ok(n_train=int(train.sum()), n_test=int(test.sum()), classes=kept, excluded_classes=excluded,
                     chance_accuracy=float(pd.Series(y_test).value_counts(normalize=True).max()), results=results)


def fit_logistic_regression(x_train: np.ndarray, y_train: np.ndarray, config: EvaluateConfig):
    """Logistic regression (L2, lbfgs) with the inverse strength C among config.logreg_cs that has
    the best mean macro-F1 over a seeded stratified config.logreg_cv_folds-fold split of the train
    cells, refit on every train cell. Returns (fitted model, chosen C); one value in logreg_cs is
    used as given, with no cross-validation.

    C is chosen on a seeded subsample of at most config.logreg_cv_max_cells train cells (sklearn's
    C scales the summed loss, so a C suits every sample size about equally; the grid costs ~5 fits
    of the full set per fold otherwise). Folds are capped at the smallest class's count there (at
    least 2); a class with a single cell there is missing from a fold, which scores it 0."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import f1_score, make_scorer
    from sklearn.model_selection import StratifiedKFold

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(config.logreg_cs) == 1:
            c = float(config.logreg_cs[0])
            return LogisticRegression(C=c, max_iter=1000).fit(x_train, y_train), c
        rows = np.arange(len(y_train))
        cap = config.logreg_cv_max_cells
        if cap is not None and rows.size > cap:
            rows = np.sort(np.random.default_rng(config.seed).choice(rows, size=cap, replace=False))
        smallest = int(pd.Series(y_train[rows]).value_counts().min())
        folds = StratifiedKFold(n_splits=max(2, min(config.logreg_cv_folds, smallest)), shuffle=True,
                                random_state=config.seed)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        # sklearn 1.8-1.9 announce defaults that change in 1.10 (l1_ratios, the fitted attributes);
        # neither changes this L2 fit or C_, read below as one value either way
        warnings.filterwarnings("ignore", message=".*(l1_ratios|use_legacy_attributes)", category=FutureWarning)
        # on two classes LogisticRegressionCV hands the scorer a pos_label, which macro-F1 ignores
        warnings.filterwarnings("ignore", message="Note that pos_label", category=UserWarning)
        search = LogisticRegressionCV(Cs=list(config.logreg_cs), cv=folds, max_iter=1000,
                                      scoring=make_scorer(f1_score, average="macro", zero_division=0))
        search.fit(x_train[rows], y_train[rows])
        c = float(np.ravel(search.C_)[0])
        return LogisticRegression(C=c, max_iter=1000).fit(x_train, y_train), c
