"""What an evaluation reads from the AnnData: labels, the split, the embeddings, and the baselines
built beside them (all (N, D) float32 arrays on the same cells)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.errors import ConfigError, InputDataError
from spatia.evaluate import baselines
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.crops import CellCrops, align_crops
from spatia.evaluate.morphology import morphology_features
from spatia.evaluate.splits import (
    spatial_block_split,
    split_from_column,
    summarise_split,
)
from spatia.expression import expression_pca
from spatia.keys import (
    EMBEDDED_FLAG,
    EMBEDDING_KEY_OF_MODALITY,
    EMBEDDING_KEYS,
    EMBEDDING_LABELS,
    SPATIAL_KEY,
    SPLIT_BUFFER_UM,
    TRAIN,
    X_SPATIA,
    X_SPATIA_CELL,
    X_SPATIA_GENE,
    X_SPATIA_IMAGE,
    X_SPATIA_IMAGE_CELL,
    X_SPATIA_NICHE,
    X_SPATIA_TISSUE,
)

log = logging.getLogger(__name__)

X_SPATIA_IMAGE_NICHE = "X_spatia_image_niche"  # niche level of the image-only embedding (`spatia embed --modality image`)
MORPHOLOGY_KEY = "X_morphology"  # obsm: precomputed per-cell morphology features

# Paper Table 4 order: gene-only, image-only, cell level, + niche, + tissue, unified.
ABLATION_ORDER = (X_SPATIA_GENE, X_SPATIA_IMAGE_CELL, X_SPATIA_IMAGE, X_SPATIA_CELL, "X_spatia_cell+niche", "X_spatia_cell+niche+tissue",
                  X_SPATIA_NICHE, X_SPATIA_TISSUE, X_SPATIA)
DISPLAY_NAMES = {
    **EMBEDDING_LABELS,
    X_SPATIA_IMAGE_NICHE: "SPATIA image-only niche level",
    "pca": "PCA (50) of log-expression",
    "autoencoder": "Count autoencoder (NB, gene-only)",
    "scvi": "scVI latent",
    "morphology": "Morphology features",
    "pca+morphology": "PCA + morphology",
}


def display_name(key: str) -> str:
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    if key.startswith("X_spatia_") and "+" in key:
        return "SPATIA " + " + ".join(key.removeprefix("X_spatia_").split("+")) + " (concatenated)"
    return key


def concatenation_key(combo: str) -> str:
    """"cell+niche" -> "X_spatia_cell+niche"."""
    return f"X_spatia_{combo}"


def read_labels(adata, column: str) -> np.ndarray:
    """obs[column] as an object array of str, None where missing; needs >= 2 distinct values."""
    if column not in adata.obs.columns:
        raise InputDataError(
            f"the AnnData has no obs column {column!r} for the labels",
            fix=f"choose one of the obs columns: {list(adata.obs.columns)[:20]}",
        )
    raw = adata.obs[column]
    labels = raw.astype(object).where(raw.notna(), None).to_numpy()
    labels = np.array([None if v is None else str(v) for v in labels], dtype=object)
    labelled = labels != None  # noqa: E711  (elementwise)
    n_classes = len(set(labels[labelled]))
    if n_classes < 2:
        raise InputDataError(f"the label column {column!r} has {n_classes} distinct value(s); 2 or more are needed",
                             fix="choose a column of cell types or clusters")
    return labels


EMBED_SPLIT_COLUMN = "split"
"""obs column of `spatia embed` outputs: the MIST dataset's split, the one the model trained on."""


def make_split(adata, config: EvaluateConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """train/test/buffer per cell and its summary: from `config.split`; when it is None, from the
    split `spatia embed` wrote (obs "split" beside `uns["spatia"]`: the cells the model trained on
    are the train cells, so every representation is scored on cells none has learned from);
    else spatial blocks."""
    split_column, split = config.split, None
    if split_column is None and EMBED_SPLIT_COLUMN in adata.obs.columns and "spatia" in adata.uns:
        try:  # refuses a column without train or without test cells
            split = split_from_column(adata.obs[EMBED_SPLIT_COLUMN].to_numpy(), column=EMBED_SPLIT_COLUMN)
            split_column = EMBED_SPLIT_COLUMN
            log.info("split: the dataset's own (obs %r, written by spatia embed), the one the model trained on",
                     EMBED_SPLIT_COLUMN)
        except InputDataError as error:
            log.info("obs %r (written by spatia embed) is no usable split (%s): a spatial block split instead",
                     EMBED_SPLIT_COLUMN, error)
    slide = None
    if config.slide is not None:
        if config.slide not in adata.obs.columns:
            raise InputDataError(f"the AnnData has no obs column {config.slide!r} for the slides",
                                 fix="name an existing obs column with --slide, or omit it")
        slide = adata.obs[config.slide].astype(str).to_numpy()
    spatial = adata.obsm[SPATIAL_KEY] if SPATIAL_KEY in adata.obsm else None
    if split_column is not None:
        if split_column not in adata.obs.columns:
            raise InputDataError(f"the AnnData has no obs column {split_column!r} for the split",
                                 fix="name an existing obs column with --split, or omit it for a spatial block split")
        if split is None:
            split = split_from_column(adata.obs[split_column].to_numpy(), column=split_column)
        summary = summarise_split(split, source=f"column:{split_column}", spatial_um=spatial, slide=slide)
        gap = summary.min_train_test_distance_um
        if gap is not None and gap < SPLIT_BUFFER_UM:
            log.warning("split column %r puts a train cell %.1f um from a test cell, closer than a niche "
                           "(%.0f um): niche and tissue embeddings of test cells then share context with training "
                           "cells; rebuild with --split-buffer-um %.0f or leave --split out", split_column, gap,
                           SPLIT_BUFFER_UM, SPLIT_BUFFER_UM)
    else:
        if spatial is None:
            raise InputDataError('the AnnData has no obsm["spatial"] to make a spatial split from',
                                 fix='store cell centroids in um in obsm["spatial"], or give a --split column')
        split = spatial_block_split(np.asarray(spatial), block_um=config.block_um, buffer_um=config.buffer_um,
                                    test_fraction=config.test_fraction, seed=config.seed, slide=slide)
        summary = summarise_split(split, source="spatial_blocks", spatial_um=spatial, slide=slide,
                                  block_um=config.block_um, buffer_um=config.buffer_um)
        if summary.n_test == 0 or summary.n_train == 0:
            raise InputDataError(
                f"the spatial block split left {summary.n_train} train and {summary.n_test} test cells "
                f"(tissue spans {summary.n_blocks} block(s) of {config.block_um} um)",
                fix="use a smaller block_um / buffer_um, or give a --split column",
            )
    return split, asdict(summary)


def check_embedding(name: str, x: Any, n: int, *, allow_nan: bool = False) -> np.ndarray:
    arr = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64 if allow_nan else np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputDataError(f'obsm["{name}"] has shape {arr.shape}, expected ({n}, D)',
                             fix="write one embedding row per cell")
    if not allow_nan and not np.isfinite(arr).all():
        raise InputDataError(f'obsm["{name}"] contains NaN or infinite values',
                             fix="re-run `spatia embed`, or drop the affected cells")
    return arr


def _spatia_keys(adata, config: EvaluateConfig) -> list[str]:
    if config.embeddings is not None:
        keys = list(config.embeddings)
        absent = [k for k in keys if k not in adata.obsm]
        if absent:
            raise InputDataError(f"the AnnData has no obsm embedding(s) {absent}",
                                 fix=f"choose among the obsm keys {list(adata.obsm.keys())}")
        return keys
    keys = [k for k in EMBEDDING_KEYS if k in adata.obsm]
    return keys + sorted(k for k in adata.obsm if k.startswith("X_spatia") and k not in keys)


def check_compare_rows(adata, config: EvaluateConfig) -> None:
    """Refuse, before any baseline is fit, a `config.compare` row this run cannot score: not an
    embedding of `adata` (or of `config.embeddings`), a level concatenation, a configured
    baseline or the morphology features."""
    names = {*_spatia_keys(adata, config), *config.baselines, "morphology", "pca+morphology",
             *(concatenation_key(combo) for combo in config.level_concatenations)}
    absent = sorted({row for pair in config.compare_pairs for row in pair} - names)
    if absent:
        raise ConfigError(f"'compare' names representation(s) {absent} that this run does not score",
                          fix=f"choose among {sorted(names)}; a gene-only or image-only view joins with "
                              "--gene-embeddings / --image-embeddings")


def _ablation_sorted(keys: list[str]) -> list[str]:
    rank = {k: i for i, k in enumerate(ABLATION_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), keys.index(k)))


def build_representations(adata, config: EvaluateConfig, counts: sp.csr_matrix, log_expr: sp.csr_matrix,
                          crops: CellCrops | None, split: np.ndarray
                          ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """SPATIA embeddings from obsm, level concatenations, and the baselines (PCA, autoencoder
    and scVI fit on the `split`'s train cells or on every cell: `config.baseline_fit`).

    Returns (representations, meta): meta[key] = {"source", "dim", "name"} for every
    representation, plus entries with dim 0 and source "skipped: <reason>" for baselines that
    could not be built.
    """
    n = adata.n_obs
    reps: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}

    def add(key: str, value: np.ndarray, source: str) -> None:
        reps[key] = value
        meta[key] = {"source": source, "dim": int(value.shape[1]), "name": display_name(key)}

    for key in _spatia_keys(adata, config):
        add(key, check_embedding(key, adata.obsm[key], n), f'obsm["{key}"]')
    for combo in config.level_concatenations:
        parts = [concatenation_key(level) for level in combo.split("+")]
        if all(p in reps for p in parts):
            add(concatenation_key(combo), baselines.concatenate_blocks(*(reps[p] for p in parts)),
                f"{' | '.join(parts)} side by side, each scaled to unit total variance")
    order = _ablation_sorted(list(reps))
    reps, meta = {k: reps[k] for k in order}, {k: meta[k] for k in order}

    fit_rows = (split == TRAIN) if config.baseline_fit == "train" else None
    fitted_on = (f"fit on the {int(fit_rows.sum())} train cells" if fit_rows is not None
                 else f"fit on all {n} cells")
    if "pca" in config.baselines:
        add("pca", expression_pca(log_expr, config.pca_components, seed=config.seed, fit_rows=fit_rows),
            f"baseline: PCA of log-normalised counts, {fitted_on}")
    if "autoencoder" in config.baselines:
        from spatia.evaluate.autoencoder import fit_count_autoencoder

        fit = fit_count_autoencoder(counts, epochs=config.autoencoder_epochs, hidden=config.autoencoder_hidden,
                                    latent=config.autoencoder_latent, input_dropout=config.autoencoder_input_dropout,
                                    batch_size=config.autoencoder_batch_size, lr=config.autoencoder_lr,
                                    seed=config.seed, n_threads=config.n_jobs, fit_rows=fit_rows)
        add("autoencoder", fit.embedding,
            f"baseline: count autoencoder G-{config.autoencoder_hidden}-{config.autoencoder_latent}, NB likelihood, "
            f"{config.autoencoder_epochs} epochs, {fitted_on} (final loss {fit.epoch_losses[-1]:.2f}, "
            f"{fit.seconds:.1f} s)" if fit.epoch_losses else "baseline: count autoencoder (0 epochs)")
        meta["autoencoder"]["train_seconds"] = round(fit.seconds, 2)
    if "scvi" in config.baselines:
        from spatia.evaluate.scvi_latent import ScviUnavailable, scvi_latent

        try:
            fit = scvi_latent(counts, n_latent=config.scvi_latent, epochs=config.scvi_epochs, seed=config.seed,
                              n_threads=config.n_jobs, fit_rows=fit_rows)
        except ScviUnavailable as error:
            meta["scvi"] = {"source": f"skipped: {error}", "dim": 0, "name": DISPLAY_NAMES["scvi"]}
            log.info("scVI baseline skipped: %s", error)
        else:
            add("scvi", fit.embedding, f"baseline: scVI (scvi-tools {fit.version}) latent, {config.scvi_latent} dims, "
                f"{config.scvi_epochs} epochs, {fitted_on} ({fit.seconds:.1f} s)")
            meta["scvi"]["train_seconds"] = round(fit.seconds, 2)

    morph = None
    if MORPHOLOGY_KEY in adata.obsm:
        morph = check_embedding(MORPHOLOGY_KEY, adata.obsm[MORPHOLOGY_KEY], n, allow_nan=True)
        morph_source = f'baseline: obsm["{MORPHOLOGY_KEY}"] (z-scored)'
    elif crops is not None:
        images, masks = align_crops(crops, adata.obs_names.to_numpy().astype(str))
        t0 = time.perf_counter()
        features = morphology_features(images, masks, channel_names=crops.channel_names)
        log.info("morphology features of %d crops in %.1f s", len(features), time.perf_counter() - t0)
        morph = features.to_numpy()
        morph_source = f"baseline: {features.shape[1]} morphology features of the crops (z-scored)"
    if morph is not None:
        add("morphology", baselines.standardise_features(morph), morph_source)
        if "pca" in reps:
            add("pca+morphology", baselines.concatenate_blocks(reps["pca"], reps["morphology"]),
                "baseline: PCA and morphology blocks, each scaled to unit total variance")
    else:
        meta["morphology"] = {"source": "skipped: no crops given and no obsm['X_morphology']", "dim": 0,
                              "name": DISPLAY_NAMES["morphology"]}
    return reps, meta


def embedded_cells(adata):
    """The cells of `adata` that got an embedding: `spatia embed` keeps the cells the MIST build
    skipped as rows flagged ``obs["spatia_embedded"] == False`` with NaN embeddings; evaluation
    uses the others. An AnnData without the flag is returned as it is."""
    if EMBEDDED_FLAG not in adata.obs.columns:
        return adata
    flag = adata.obs[EMBEDDED_FLAG].to_numpy(dtype=bool, na_value=False)
    if flag.all():
        return adata
    if not flag.any():
        raise InputDataError(f'no cell has an embedding (obs["{EMBEDDED_FLAG}"] is False for all {adata.n_obs})',
                             fix="embed the MIST dataset of these cells with `spatia embed`")
    log.info("evaluating the %d of %d cells with an embedding (the MIST build skipped the others)", int(flag.sum()),
             adata.n_obs)
    return adata[flag].copy()


def add_modality_embedding(adata, other, key: str, *, source_key: str | None = None,
                           source: str | Path | None = None) -> None:
    """Copy `other.obsm[source_key or key]` into `adata.obsm[key]`, matching cells by obs_names.

    `spatia embed --modality image` (or ``gene``) writes its embeddings under their own keys
    (``X_spatia_image``, ``X_spatia_image_niche``, ...; ``X_spatia_gene``, ...), so they merge
    with the unified embeddings' file. Every cell of `adata` must be in `other`. A file written
    before those keys existed (its embedding under ``X_spatia``) is refused, naming the fix.
    """
    source_key = source_key or key
    if source_key not in other.obsm:
        modality = next((m for m, base in EMBEDDING_KEY_OF_MODALITY.items()
                         if m != "both" and source_key.startswith(base)), None)
        written = str(other.uns.get("spatia", {}).get("modality", "")) if hasattr(other, "uns") else ""
        older = X_SPATIA in other.obsm and modality is not None and written == modality
        problem = (f'the AnnData has no obsm["{source_key}"]'
                   + (f' (an older `spatia embed --modality {modality}` kept it under "X_spatia")' if older else ""))
        fix = (f"re-run `spatia embed --modality {modality}` to write {source_key}" if modality is not None
               else f"give the .h5ad written by `spatia embed` with obsm['{source_key}']")
        raise InputDataError(problem, path=source, fix=fix)
    rows = pd.Index(other.obs_names.astype(str)).get_indexer(adata.obs_names.astype(str))
    missing = int((rows < 0).sum())
    if missing:
        raise InputDataError(f"{missing} of {adata.n_obs} evaluated cells are not in this AnnData", path=source,
                             fix="embed the same MIST dataset (all splits) with both modalities")
    values = other.obsm[source_key]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    adata.obsm[key] = values[rows].astype(np.float32)


def add_image_only_embeddings(adata, image, *, source: str | Path | None = None) -> None:
    """Merge the embeddings of `spatia embed --modality image` into `adata`: the unified image-only
    embedding (`X_spatia_image`), its cell level (`X_spatia_image_cell`: the per-cell morphology
    representation, since the unified one's niche and tissue context is noise for per-cell tasks)
    and its niche level (`X_spatia_image_niche`: the patch task's input), where written."""
    add_modality_embedding(adata, image, X_SPATIA_IMAGE, source=source)
    for key in (X_SPATIA_IMAGE_CELL, X_SPATIA_IMAGE_NICHE):
        if key in image.obsm:
            add_modality_embedding(adata, image, key, source=source)
