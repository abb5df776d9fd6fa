"""Cell annotation: MLP (one fit per seed) and logistic regression (deterministic, one fit) on each
representation, trained on the train split and scored on the test split (macro-F1,
macro-precision, accuracy)."""

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
    from sklearn.linear_model import LogisticRegression
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
        logreg = LogisticRegression(C=config.logreg_c, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            logreg.fit(x_train, y_train)
        lr_scores = scores(logreg.predict(x_test))
        results[name] = {
            "mlp": {k: stat(v) for k, v in per_seed.items()},
            "logreg": {k: stat([v], deterministic=True) for k, v in lr_scores.items()},
        }
        advance()
    return status_ok(n_train=int(train.sum()), n_test=int(test.sum()), classes=kept, excluded_classes=excluded,
                     chance_accuracy=float(pd.Series(y_test).value_counts(normalize=True).max()), results=results)
