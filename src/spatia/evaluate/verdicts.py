"""The report's verdicts: per task, the best representation and SPATIA against the best baseline.

`task_verdicts(results)` reads the dict of `spatia.evaluate.evaluate` and returns one plain
`Verdict` dict per task (and per label column for annotation and clustering) with:

- ``metric``: the headline metric (annotation: MLP macro-F1; clustering: Leiden ARI at the best
  resolution; expression from morphology: XGBoost Pearson, else ridge; imputation: pooled Pearson);
- ``best``: the representation with the highest mean of that metric (any row of the table; the
  first in table order on ties, ``n_tied_with_best`` counts the others equal at 3 decimals);
- ``spatia``: SPATIA's row: the unified embedding ``X_spatia`` where the task has it, else
  (`SPATIA_PREFERENCE`) the gene decoder for imputation, the image-only embeddings for
  expression from morphology, else the first SPATIA row of the table;
- ``baseline``: the best baseline row (PCA, count autoencoder, scVI, morphology features, ...);
- ``difference`` = spatia mean - baseline mean, ``spread`` = the larger of the two seed stds
  (0 for deterministic models), ``within_spread`` = |difference| < spread, and
  ``spatia_below_baseline`` = difference < 0;
- ``interval`` (95 % percentile interval of the difference over paired bootstrap resamples of
  the test units), ``interval_n_test`` and ``resolved`` (the interval excludes 0): from the
  task entry's ``comparisons`` (`spatia.evaluate.bootstrap`) when one pairs the same two rows;
  None otherwise (clustering, imputation, or the bootstrap was skipped).

Annotation has a second verdict per label column, ``annotation_image_only``, with ``title``
`IMAGE_ONLY_TITLE`: SPATIA's image-only row (`X_spatia_image_cell`, else `X_spatia_image`)
against the hand-made morphology features, when both rows ran (`image_only_pair`).

A row is {"key", "name", "mean", "std", "n_runs"}; a task with no SPATIA row or no baseline row
has None there and no difference.
"""

from __future__ import annotations

from typing import Any

from spatia.keys import X_SPATIA, X_SPATIA_GENE, X_SPATIA_IMAGE, X_SPATIA_IMAGE_CELL

BASELINE_KEYS = ("pca", "autoencoder", "scvi", "morphology", "pca+morphology", "niche_morphology",
                 "gene_mean", "knn_expression", "knn_pca", "knn_autoencoder", "knn_scvi", "knn_morphology",
                 "knn_pca+morphology")
# SPATIA's row per task, first present wins: the unified embedding; for imputation the gene decoder,
# then kNN on SPATIA; for expression from morphology (genes cannot be inputs) the image-only ones.
IMAGE_ONLY_KEYS = (X_SPATIA_IMAGE_CELL, X_SPATIA_IMAGE)  # the image-only annotation verdict's row, first present
SPATIA_PREFERENCE = (X_SPATIA, "model", f"knn_{X_SPATIA}", X_SPATIA_IMAGE_CELL, X_SPATIA_IMAGE, "X_spatia_image_niche",
                     f"knn_{X_SPATIA_IMAGE}", X_SPATIA_GENE, f"knn_{X_SPATIA_GENE}")


def _metric_of(task: str, entry: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(metric label, stat) of one row of a task's results; stat None when the row did not run."""
    if entry.get("status", "ok") != "ok":
        return "", None
    if task == "annotation":
        return "MLP macro-F1", entry["mlp"]["macro_f1"]
    if task == "clustering":
        return "Leiden ARI (best resolution)", entry["leiden_best"]["ari"]
    if task in ("expression", "patch_expression"):
        for model, label in (("xgboost", "XGBoost"), ("ridge", "Ridge")):
            if entry.get(model, {}).get("status") == "ok":
                return f"{label} Pearson", entry[model]["pearson"]
        return "", None
    if task == "imputation":
        return "Pearson on held-out genes", entry["pearson"]
    raise ValueError(f"no headline metric for task {task!r}")


def _row(key: str, name: str, stat: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "name": name, "mean": float(stat["mean"]), "std": float(stat.get("std") or 0.0),
            "n_runs": int(stat.get("n_runs", 1))}


def verdict(task: str, task_results: dict[str, Any], results: dict[str, Any], *,
            image_only: bool = False) -> dict[str, Any] | None:
    """The verdict of one task entry (status ok); None when no row has a value. image_only: the
    image-only verdict instead (`image_only_pair`: SPATIA's image-only row against the hand-made
    features, "best" among the image-only rows and those features; None when either row is
    missing)."""
    rows = {}
    for key, entry in task_results["results"].items():
        label, stat = _metric_of(task, entry)
        if stat is not None and stat.get("mean") is not None and label:
            rows[key] = (label, stat)
    if not rows:
        return None
    labels = [label for label, _ in rows.values()]
    metric = max(labels, key=labels.count)  # compare like with like (expression: XGBoost unless it did not run)
    row = {k: _row(k, row_name(results, k), stat) for k, (label, stat) in rows.items() if label == metric}
    if image_only:
        pair = image_only_pair(task, task_results)
        if pair is None or pair[0] not in row or pair[1] not in row:
            return None
        spatia, baseline = row[pair[0]], row[pair[1]]
        row = {k: r for k, r in row.items() if k == pair[1] or k.startswith(X_SPATIA_IMAGE)}
    else:
        spatia = next((row[k] for k in SPATIA_PREFERENCE if k in row),
                      next((r for k, r in row.items() if k.startswith(("X_spatia", "knn_X_spatia"))), None))
        baselines = [r for k, r in row.items() if k in BASELINE_KEYS]
        baseline = max(baselines, key=lambda r: r["mean"]) if baselines else None
    best = max(row.values(), key=lambda r: r["mean"])
    n_tied = sum(round(r["mean"], 3) == round(best["mean"], 3) for r in row.values()) - 1
    out: dict[str, Any] = {"task": task, "metric": metric, "best": best, "n_tied_with_best": n_tied,
                           "spatia": spatia, "baseline": baseline, "difference": None, "spread": None,
                           "within_spread": None, "spatia_below_baseline": None,
                           "interval": None, "interval_n_test": None, "resolved": None}
    if spatia is not None and baseline is not None:
        diff = spatia["mean"] - baseline["mean"]
        spread = max(spatia["std"], baseline["std"])
        out.update(difference=diff, spread=spread, within_spread=bool(abs(diff) < spread),
                   spatia_below_baseline=bool(diff < 0))
        for comparison in task_results.get("comparisons", []):
            if (comparison["spatia"], comparison["baseline"], comparison["metric"]) == (spatia["key"], baseline["key"],
                                                                                      metric):
                out.update(interval=list(comparison["interval"]), interval_n_test=comparison["n_test"],
                           resolved=bool(comparison["resolved"]))
    return out


def image_only_pair(task: str, task_results: dict[str, Any]) -> tuple[str, str] | None:
    """(SPATIA image-only row, "morphology") for annotation when both rows are present: does the
    image branch know what hand-made features know? None otherwise."""
    if task != "annotation":
        return None
    keys = task_results.get("results", {})
    image = next((k for k in IMAGE_ONLY_KEYS if k in keys), None)
    return (image, "morphology") if image is not None and "morphology" in keys else None


def verdict_pairs(task: str, task_results: dict[str, Any], results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(SPATIA row, baseline row, metric) of every verdict `task_verdicts` draws from this entry."""
    candidates = [verdict(task, task_results, results), verdict(task, task_results, results, image_only=True)]
    out: list[tuple[str, str, str]] = []
    for v in candidates:
        if v is not None and v["spatia"] is not None and v["baseline"] is not None:
            item = (v["spatia"]["key"], v["baseline"]["key"], v["metric"])
            if item not in out:
                out.append(item)
    return out


IMAGE_ONLY_TITLE = "Cell annotation from the image alone"
TASK_TITLES = {"annotation": "Cell annotation", "clustering": "Clustering", "expression": "Expression from morphology",
               "patch_expression": "Niche expression from the niche image", "imputation": "Gene imputation"}


IMPUTER_NAMES = {"model": "SPATIA gene decoder", "gene_mean": "Train mean profile",
                 "knn_expression": "kNN on visible expression"}


def row_name(results: dict[str, Any], key: str) -> str:
    """Display name of a row key of any task (representation, niche features or imputer)."""
    if key == "niche_morphology":
        return "Niche image features (hand-made)"
    if key in IMPUTER_NAMES:
        return IMPUTER_NAMES[key]
    if key.startswith("knn_"):
        return f"kNN on {row_name(results, key[4:])}"
    return results.get("embeddings", {}).get(key, {}).get("name", key)


def task_verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{verdict id: verdict} for every task that ran; ids are the task name, with ``:<label column>``
    for annotation and clustering when the run has several label columns."""
    by_label = results.get("by_label") or {results["dataset"]["label_column"]: results["tasks"]}
    several = len(by_label) > 1
    out: dict[str, dict[str, Any]] = {}
    for task in ("annotation", "clustering"):
        for column, tasks in by_label.items():
            entry = tasks.get(task, {})
            if entry.get("status") != "ok":
                continue
            v = verdict(task, entry, results)
            if v is not None:
                v["label_column"] = column
                out[f"{task}:{column}" if several else task] = v
            v = verdict(task, entry, results, image_only=True)
            if v is not None:
                v.update(label_column=column, title=IMAGE_ONLY_TITLE)
                out[f"{task}_image_only:{column}" if several else f"{task}_image_only"] = v
    for task in ("expression", "patch_expression", "imputation"):
        entry = results["tasks"].get(task, {})
        if entry.get("status") == "ok":
            v = verdict(task, entry, results)
            if v is not None:
                out[task] = v
    return out


def _stat_text(row: dict[str, Any]) -> str:
    if row["n_runs"] <= 1:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} ± {row['std']:.3f}"


def headline(v: dict[str, Any]) -> tuple[str, str | None]:
    """(headline sentence, warning sentence or None) of one verdict, plain text."""
    title = v.get("title", TASK_TITLES[v["task"]]) + (f" (`{v['label_column']}`)" if v.get("label_column") else "")
    tied = v.get("n_tied_with_best", 0)
    text = (f"{title}, {v['metric']}: best is {v['best']['name']} ({_stat_text(v['best'])}"
            + (f", tied with {tied} other{'s' if tied > 1 else ''} at 3 decimals" if tied else "") + ").")
    spatia, base = v["spatia"], v["baseline"]
    if spatia is None:
        return text + " No SPATIA representation in this task.", None
    if base is None:
        return text + f" {spatia['name']}: {_stat_text(spatia)}; no baseline in this task.", None
    against = "hand-made" if v.get("title") == IMAGE_ONLY_TITLE else "best baseline"
    diff, spread = v["difference"], v["spread"]
    if max(spatia["n_runs"], base["n_runs"]) <= 1:
        spread_text = "one fit each, no seed spread"
    elif v["within_spread"]:
        spread_text = f"within seed spread, ±{spread:.3f}"
    else:
        spread_text = f"seed spread ±{spread:.3f}"
    interval_text = ""
    if v.get("interval") is not None:
        low, high = v["interval"]
        interval_text = (f"; 95 % interval over {v['interval_n_test']} test units [{low:+.3f}, {high:+.3f}]"
                         + ("" if v["resolved"] else ": the test set cannot tell them apart"))
    text += (f" {spatia['name']} {_stat_text(spatia)} vs {against} {base['name']} {_stat_text(base)}: "
             f"{diff:+.3f} ({spread_text}{interval_text}).")
    warning = None
    if v["spatia_below_baseline"]:
        qualifiers = [q for q, on in (("within seed spread", v["within_spread"]),
                                      ("not resolved by the test set", v.get("resolved") is False)) if on]
        warning = (f"WARNING: {spatia['name']} is below the baseline {base['name']} on {title.replace('`', '')} "
                   f"by {-diff:.3f}" + (f" ({', '.join(qualifiers)})." if qualifiers else "."))
    return text, warning
