"""`evaluate(adata, config)`: every task on the same cells, the same split and the same seeds.

In one pass:

- annotation (`tasks.annotation`) and clustering (`tasks.clustering`) against every label
  column of ``config.labels``;
- expression from morphology per cell (`tasks.expression`) and per niche (`tasks.patches`);
- gene imputation (`tasks.imputation`).

Representations: the SPATIA embeddings in obsm (ordered as the paper's Table 4: gene-only,
image-only, cell level, + niche, + tissue, unified), the level concatenations, and the
baselines (PCA, count autoencoder, scVI, morphology). Every metric is reported as mean,
standard deviation and the per-seed values; deterministic models (logistic regression, ridge,
XGBoost without subsampling) are fitted once and say so (``n_runs = 1``). The result is a plain
dict; `spatia.evaluate.report.write_report` writes it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from spatia.config import config_to_dict
from spatia.console import progress
from spatia.evaluate.baselines import Imputer
from spatia.evaluate.bootstrap import HeldOutPredictions, paired_difference
from spatia.evaluate.config import TASKS, EvaluateConfig
from spatia.evaluate.crops import CellCrops, NicheCrops
from spatia.evaluate.inputs import (
    build_representations,
    check_compare_rows,
    embedded_cells,
    make_split,
    read_labels,
)
from spatia.evaluate.layout import layouts_2d
from spatia.evaluate.metrics import skipped
from spatia.evaluate.tasks import (
    annotation_task,
    clustering_task,
    expression_task,
    imputation_task,
    niche_image_features,
    patch_expression_task,
)
from spatia.evaluate.verdicts import verdict_pairs
from spatia.expression import counts_from_anndata, log_normalise
from spatia.keys import SPATIAL_KEY

log = logging.getLogger(__name__)

LABEL_TASKS = ("annotation", "clustering")


def evaluate(adata, config: EvaluateConfig, *, crops: CellCrops | None = None, imputer: Imputer | None = None,
             niche_crops: NicheCrops | None = None) -> dict[str, Any]:
    """Score SPATIA's embeddings and the baselines on every task of `config.tasks`.

    Args:
        adata: AnnData with raw counts (``.X`` or ``layers["counts"]``), the label columns in
            obs, ``obsm["spatial"]`` (um; needed without a split column), embeddings in
            ``obsm["X_spatia*"]``; optional ``obsm["X_morphology"]`` and ``obs[niche_column]``.
        config: the run's settings (validated here).
        crops: per-cell crops for the morphology baseline (ignored when obsm has X_morphology).
        imputer: the model's gene decoder with the `Imputer` contract; None reports the model
            row of the imputation task as "skipped: no model given".
        niche_crops: niche images for the hand-made features of the patch-level task.

    Returns:
        A dict: ``config``, ``seeds``, ``dataset``, ``labels`` (per label column: counts),
        ``split``, ``embeddings``, ``tasks`` (one entry per task with ``status`` and
        ``results``; annotation and clustering for the first label column), ``by_label``
        (annotation and clustering for every label column), ``timings_s`` and ``plots`` (numpy
        arrays for the report; left out of metrics.json).
    """
    from threadpoolctl import threadpool_limits

    config.validate()
    with threadpool_limits(limits=config.n_jobs):
        return _evaluate(adata, config, crops, imputer, niche_crops)


def _label_summary(labels: np.ndarray) -> dict[str, Any]:
    labelled = labels != None  # noqa: E711
    return {"n_labelled": int(labelled.sum()), "n_labels": int(len(set(labels[labelled]))),
            "label_counts": {str(k): int(v) for k, v in pd.Series(labels[labelled]).value_counts().items()}}


MODEL_OF_METRIC = {"MLP macro-F1": "mlp", "XGBoost Pearson": "xgboost", "Ridge Pearson": "ridge"}


def _with_comparison(task: str, entry: dict[str, Any], kept: dict[str, dict[str, HeldOutPredictions]],
                     results: dict[str, Any], config: EvaluateConfig) -> dict[str, Any]:
    """The task entry with ``comparisons``: the paired bootstrap (`spatia.evaluate.bootstrap`) of
    each verdict's two rows (`verdict_pairs`: SPATIA against its best baseline; on annotation
    also the image-only row against the hand-made features, and the pairs of `config.compare`)
    over the test units, for the pairs whose rows kept their predictions, unless
    `config.bootstrap_resamples` is 0."""
    if config.bootstrap_resamples == 0 or entry.get("status") != "ok":
        return entry
    pairs = verdict_pairs(task, entry, results)
    if task == "annotation":
        requested = [(a, b, "MLP macro-F1") for a, b in config.compare_pairs]
        pairs += [pair for pair in requested if pair not in pairs]
    comparisons = []
    for spatia, baseline, metric in pairs:
        model = MODEL_OF_METRIC.get(metric)
        a, b = kept.get(spatia, {}).get(model), kept.get(baseline, {}).get(model)
        if a is not None and b is not None:
            comparisons.append({"spatia": spatia, "baseline": baseline, "metric": metric,
                                **paired_difference(a, b, config.bootstrap_resamples, config.seed)})
    if comparisons:
        entry["comparisons"] = comparisons
    return entry


def _evaluate(adata, config: EvaluateConfig, crops: CellCrops | None, imputer: Imputer | None,
              niche_crops: NicheCrops | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    adata = embedded_cells(adata)  # rows `spatia embed` keeps for cells the build skipped: NaN embeddings
    check_compare_rows(adata, config)
    label_sets = {column: read_labels(adata, column) for column in config.label_columns}
    primary = config.label_columns[0]
    if config.max_cells is not None and adata.n_obs > config.max_cells:
        keep = np.sort(np.random.default_rng(config.seed).choice(adata.n_obs, size=config.max_cells, replace=False))
        if crops is not None and crops.cell_ids is None:
            crops = CellCrops(np.asarray(crops.images)[keep], np.asarray(crops.masks)[keep], None, crops.channel_names)
        adata = adata[keep].copy()
        label_sets = {column: labels[keep] for column, labels in label_sets.items()}
    counts = counts_from_anndata(adata)
    obs_names = adata.obs_names.to_numpy().astype(str)
    gene_names = adata.var_names.to_numpy().astype(str)
    split, split_summary = make_split(adata, config)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log_expr = log_normalise(counts)
    reps, meta = build_representations(adata, config, counts, log_expr, crops, split)
    timings["representations"] = time.perf_counter() - t0
    for key in ("autoencoder", "scvi"):
        if "train_seconds" in meta.get(key, {}):
            timings[f"train_{key}"] = meta[key]["train_seconds"]

    labels = label_sets[primary]
    label_info = {column: _label_summary(values) for column, values in label_sets.items()}
    results: dict[str, Any] = {
        "config": config_to_dict(config),
        "seeds": config.seeds,
        "dataset": {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "label_column": primary,
                    "label_columns": list(config.label_columns), **label_info[primary]},
        "labels": label_info,
        "split": split_summary,
        "embeddings": meta,
        "tasks": {},
        "by_label": {column: {} for column in config.label_columns},
    }
    plots: dict[str, Any] = {
        "spatial": np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float32)[:, :2] if SPATIAL_KEY in adata.obsm else None,
        "labels": labels, "split": split, "names": {k: meta[k]["name"] for k in reps},
    }
    niche_of_cell = (adata.obs[config.niche_column].to_numpy() if config.niche_column in adata.obs.columns else None)
    n_labels = len(config.label_columns)
    steps = {
        "annotation": len(reps) * n_labels, "clustering": len(reps),
        "expression": len([k for k in config.expression_inputs if k in reps]),
        "patch_expression": len(config.patch_inputs), "imputation": config.n_seeds,
    }
    total = sum(steps[t] for t in config.tasks) + (len(reps) if config.layout != "none" else 0)
    with progress() as bar:
        task_id = bar.add_task("evaluate", total=total)

        def advance() -> None:
            bar.advance(task_id)

        for task in TASKS:
            if task not in config.tasks:
                results["tasks"][task] = skipped("not requested")
                if task in LABEL_TASKS:
                    for column in config.label_columns:
                        results["by_label"][column][task] = skipped("not requested")
                continue
            bar.update(task_id, description=f"evaluate: {task}")
            t0 = time.perf_counter()
            if task == "annotation":
                for column, values in label_sets.items():
                    kept: dict[str, dict[str, HeldOutPredictions]] = {}
                    entry = annotation_task(reps, values, split, config, advance, keep=kept)
                    results["by_label"][column][task] = _with_comparison(task, entry, kept, results, config)
            elif task == "clustering":
                per_column, plots["clusters"], plots["clusters_rows"] = clustering_task(reps, label_sets, config,
                                                                                        advance)
                for column, entry in per_column.items():
                    results["by_label"][column][task] = entry
            elif task == "expression":
                kept = {}
                entry = expression_task(reps, log_expr, gene_names, split, config, advance, keep=kept)
                results["tasks"][task] = _with_comparison(task, entry, kept, results, config)
            elif task == "patch_expression":
                features = None
                if niche_crops is not None and "niche_morphology" in config.patch_inputs:
                    t1 = time.perf_counter()
                    features = niche_image_features(niche_crops.images)
                    features.index = pd.Index(np.asarray(niche_crops.niche_ids).astype(str))
                    timings["niche_features"] = time.perf_counter() - t1
                kept = {}
                entry = patch_expression_task(reps, counts, gene_names, niche_of_cell, split, config, features,
                                              advance, keep=kept)
                results["tasks"][task] = _with_comparison(task, entry, kept, results, config)
            elif task == "imputation":
                results["tasks"][task] = imputation_task(counts, obs_names, split, reps, config, imputer, advance)
            if task in LABEL_TASKS:
                results["tasks"][task] = results["by_label"][primary][task]
            timings[task] = time.perf_counter() - t0
            log.info("%s done in %.1f s", task, timings[task])
        if config.layout != "none":
            bar.update(task_id, description=f"evaluate: {config.layout} layout")
            t0 = time.perf_counter()
            rows = np.flatnonzero(labels != None)  # noqa: E711
            if rows.size > config.layout_max_cells:
                rows = np.sort(np.random.default_rng(config.seed).choice(rows, size=config.layout_max_cells,
                                                                         replace=False))
            plots["layout"] = layouts_2d(reps, rows, config, advance)
            plots["layout_name"] = "UMAP" if config.layout == "umap" else "PCA"
            plots["layout_rows"] = rows
            timings["layout"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    results["plots"] = plots
    return results
