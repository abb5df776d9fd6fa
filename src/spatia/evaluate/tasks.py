"""Downstream evaluation of SPATIA embeddings against baselines, on one spatially disjoint split.

`evaluate(adata, config)` runs, in one pass and on the same cells:

- annotation: MLP (one fit per seed) and logistic regression classifiers on each embedding,
  trained on the train split and scored on the test split (macro-F1, macro-precision,
  accuracy);
- clustering: Leiden at several resolutions (one run per seed) and KMeans with k = number of
  labels (one run per seed) on all labelled cells; ARI and NMI against the labels, at the best
  resolution and at the resolution chosen without labels (highest mean modularity);
- expression from morphology: from image-only inputs (SPATIA image-only embedding,
  morphology features) predict the log-normalised expression of the top highly variable genes
  with XGBoost and ridge regression; per-gene Pearson and Spearman on the test split,
  averaged;
- gene imputation: hold out a random fraction of each test cell's genes, predict them with the
  model's gene decoder (`imputer`) and with kNN / mean baselines; Pearson and Spearman on the
  held-out entries.

Every metric is reported as mean, standard deviation and the per-seed values. Deterministic
models (logistic regression, ridge, XGBoost without subsampling) are fitted once and say so
(``n_runs = 1``). The result is a plain dict; `spatia.evaluate.report.write_report` writes it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.console import progress
from spatia.errors import ConfigError, InputDataError
from spatia.evaluate import baselines
from spatia.evaluate.baselines import Imputer
from spatia.evaluate.crops import CellCrops, align_crops
from spatia.evaluate.morphology import morphology_features
from spatia.evaluate.splits import TEST, TRAIN, spatial_block_split, split_from_column, summarise_split

log = logging.getLogger(__name__)

SPATIA_KEYS = ("X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue", "X_spatia_image", "X_spatia_gene")
DISPLAY_NAMES = {
    "X_spatia": "SPATIA (unified)",
    "X_spatia_cell": "SPATIA cell level (no niche/tissue)",
    "X_spatia_niche": "SPATIA niche level",
    "X_spatia_tissue": "SPATIA tissue level",
    "X_spatia_image": "SPATIA image-only",
    "X_spatia_gene": "SPATIA gene-only",
    "pca": "PCA (50) of log-expression",
    "morphology": "Morphology features",
    "pca+morphology": "PCA + morphology",
}
TASKS = ("annotation", "clustering", "expression", "imputation")
LAYOUTS = ("umap", "pca", "none")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation run (saved with the report).

    Attributes:
        labels: obs column with the cell labels (cell types or reference clusters).
        split: obs column with train/test(/buffer) values; None makes a spatial block split.
        slide: obs column naming each cell's slide/section (blocks never span slides).
        embeddings: obsm keys to score; None takes every ``X_spatia*`` key present.
        seed: split seed and first model seed; models run with seeds seed .. seed+n_seeds-1.
        n_seeds: number of seeds for the stochastic models (MLP, Leiden, KMeans, masks).
        tasks: which tasks to run.
        block_um, buffer_um, test_fraction: spatial block split (see `spatial_block_split`).
        max_cells: evaluate a seeded random subset of at most this many cells (None: all).
        min_class_train_cells: classes with fewer train cells are left out of annotation.
        pca_components: PCA baseline dimensions.
        mlp_hidden, mlp_max_iter, mlp_alpha: MLP classifier (adam, early stopping on 10 % of
            train after 15 epochs without gain, mini-batches of n_train / 20 clipped to 32..256).
        logreg_c: inverse L2 strength of the logistic regression.
        leiden_resolutions, n_neighbors: Leiden (modularity, igraph) on the symmetric binary
            kNN graph (euclidean) of each representation.
        cluster_max_dim: embeddings wider than this are PCA-reduced before clustering.
        expression_inputs: representations for expression-from-morphology (image-only ones).
        n_hvg: highly variable genes predicted (selected on train cells, among the genes detected
            in at least hvg_min_detection of them).
        xgb_estimators, xgb_max_depth: XGBoost as the paper (100 trees of depth 3 per gene);
        xgb_max_train_cells: seeded subsample of train cells for XGBoost; xgb_max_bin: histogram
        bins (64 halves the time of the default 256); ridge_alpha: ridge penalty.
        impute_fraction: fraction of each cell's genes held out; impute_max_cells: test cells
        used; knn_k: neighbours of the kNN imputers; knn_prior_cells: weight (in cells) of the
        train mean profile their neighbour average is shrunk toward.
        layout: 2-D layout of each representation for the report's figure: "umap" (umap-learn;
            its numba compilation costs ~30-50 s once per process on 2 cores), "pca" (first two
            principal components, instant) or "none"; layout_max_cells: cells drawn.
        n_jobs: threads for XGBoost, BLAS and OpenMP (threadpoolctl limit for the whole run).
            1 by default: on a shared 2-core machine 2 threads made XGBoost 10x slower.
    """

    labels: str
    split: str | None = None
    slide: str | None = None
    embeddings: tuple[str, ...] | None = None
    seed: int = 0
    n_seeds: int = 3
    tasks: tuple[str, ...] = TASKS
    block_um: float = 200.0
    buffer_um: float = 50.0
    test_fraction: float = 0.3
    max_cells: int | None = None
    min_class_train_cells: int = 10
    pca_components: int = 50
    mlp_hidden: tuple[int, ...] = (128,)
    mlp_max_iter: int = 200
    mlp_alpha: float = 1e-4
    logreg_c: float = 1.0
    leiden_resolutions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)
    n_neighbors: int = 15
    cluster_max_dim: int = 50
    expression_inputs: tuple[str, ...] = ("X_spatia_image", "morphology")
    n_hvg: int = 50
    hvg_min_detection: float = 0.02
    xgb_estimators: int = 100
    xgb_max_depth: int = 3
    xgb_max_train_cells: int | None = 5000
    xgb_max_bin: int = 64
    ridge_alpha: float = 1.0
    impute_fraction: float = 0.1
    impute_max_cells: int = 2000
    knn_k: int = 15
    knn_prior_cells: float = 15.0
    layout: str = "umap"
    layout_max_cells: int = 2000
    n_jobs: int = 1

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    def __post_init__(self) -> None:
        for name in ("embeddings", "tasks", "mlp_hidden", "leiden_resolutions", "expression_inputs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ConfigError(f"unknown evaluation task(s) {unknown}", fix=f"choose from {list(TASKS)}")
        if self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be >= 1; got {self.n_seeds}", fix="use e.g. n_seeds=3")
        if not 0.0 < self.impute_fraction < 1.0:
            raise ConfigError(f"impute_fraction must be in (0, 1); got {self.impute_fraction}",
                              fix="use e.g. impute_fraction=0.1")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}", fix=f"choose one of {list(LAYOUTS)}")
        if not self.leiden_resolutions or min(self.leiden_resolutions) <= 0:
            raise ConfigError("leiden_resolutions must be positive numbers", fix="use e.g. [0.25, 0.5, 1.0]")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, path: str | Path | None = None) -> EvaluateConfig:
        """Build from a dict (e.g. a YAML file), rejecting unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown evaluate setting(s) {unknown}", path=path,
                              fix=f"use only these keys: {sorted(names)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ConfigError(f"invalid evaluate settings: {error}", path=path, fix="check the keys and values") from None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _stat(values: Sequence[float], *, deterministic: bool = False) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if finite.size else None,
        "values": [None if not np.isfinite(v) else float(v) for v in arr],
        "n_runs": int(arr.size),
        "deterministic": deterministic,
    }


def _counts_matrix(adata) -> sp.csr_matrix:
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if x is None:
        raise InputDataError("the AnnData has no expression matrix", fix="store raw counts in .X or layers['counts']")
    x = sp.csr_matrix(x, dtype=np.float32)
    if x.nnz and x.data.min() < 0:
        raise InputDataError("the expression matrix has negative values; raw counts are expected",
                             fix="store raw counts in .X or layers['counts'] (not scaled or log data)")
    return x


def _per_column_corr(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _masked_column_pearson(true: np.ndarray, pred: np.ndarray, mask: np.ndarray, min_entries: int = 5) -> np.ndarray:
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


def _pooled_corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def _status_ok(**extra: Any) -> dict[str, Any]:
    return {"status": "ok", **extra}


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": f"skipped: {reason}"}


# ---------------------------------------------------------------------------------------------
# inputs: labels, split, embeddings
# ---------------------------------------------------------------------------------------------


def _labels(adata, column: str) -> np.ndarray:
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


def _make_split(adata, config: EvaluateConfig) -> tuple[np.ndarray, dict[str, Any]]:
    slide = None
    if config.slide is not None:
        if config.slide not in adata.obs.columns:
            raise InputDataError(f"the AnnData has no obs column {config.slide!r} for the slides",
                                 fix="name an existing obs column with --slide, or omit it")
        slide = adata.obs[config.slide].astype(str).to_numpy()
    spatial = adata.obsm["spatial"] if "spatial" in adata.obsm else None
    if config.split is not None:
        if config.split not in adata.obs.columns:
            raise InputDataError(f"the AnnData has no obs column {config.split!r} for the split",
                                 fix="name an existing obs column with --split, or omit it for a spatial block split")
        split = split_from_column(adata.obs[config.split].to_numpy(), column=config.split)
        summary = summarise_split(split, source=f"column:{config.split}", spatial_um=spatial, slide=slide)
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


def _check_embedding(name: str, x: Any, n: int) -> np.ndarray:
    arr = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputDataError(f'obsm["{name}"] has shape {arr.shape}, expected ({n}, D)',
                             fix="write one embedding row per cell")
    if not np.isfinite(arr).all():
        raise InputDataError(f'obsm["{name}"] contains NaN or infinite values',
                             fix="re-run `spatia embed`, or drop the affected cells")
    return arr


def build_representations(adata, config: EvaluateConfig, counts: sp.csr_matrix, log_expr: sp.csr_matrix,
                          crops: CellCrops | None) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """SPATIA embeddings from obsm plus the baselines, all (N, D) float32 on the same cells."""
    n = adata.n_obs
    reps: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    if config.embeddings is not None:
        keys = list(config.embeddings)
        absent = [k for k in keys if k not in adata.obsm]
        if absent:
            raise InputDataError(f"the AnnData has no obsm embedding(s) {absent}",
                                 fix=f"choose among the obsm keys {list(adata.obsm.keys())}")
    else:
        keys = [k for k in SPATIA_KEYS if k in adata.obsm]
        keys += sorted(k for k in adata.obsm if k.startswith("X_spatia") and k not in keys)
    for key in keys:
        reps[key] = _check_embedding(key, adata.obsm[key], n)
        meta[key] = {"source": f'obsm["{key}"]', "dim": int(reps[key].shape[1]), "name": DISPLAY_NAMES.get(key, key)}

    reps["pca"] = baselines.pca_embedding(log_expr, config.pca_components, seed=config.seed)
    meta["pca"] = {"source": "baseline: PCA of log-normalised counts", "dim": int(reps["pca"].shape[1]),
                   "name": DISPLAY_NAMES["pca"]}
    morph = None
    if "X_morphology" in adata.obsm:
        morph = _check_embedding_allow_nan("X_morphology", adata.obsm["X_morphology"], n)
        morph_source = 'baseline: obsm["X_morphology"] (z-scored)'
    elif crops is not None:
        images, masks = align_crops(crops, adata.obs_names.to_numpy().astype(str))
        t0 = time.perf_counter()
        features = morphology_features(images, masks, channel_names=crops.channel_names)
        log.info("morphology features of %d crops in %.1f s", len(features), time.perf_counter() - t0)
        morph = features.to_numpy()
        morph_source = f"baseline: {features.shape[1]} morphology features of the crops (z-scored)"
    if morph is not None:
        reps["morphology"] = baselines.standardise_features(morph)
        meta["morphology"] = {"source": morph_source, "dim": int(reps["morphology"].shape[1]),
                              "name": DISPLAY_NAMES["morphology"]}
        reps["pca+morphology"] = baselines.concatenate_blocks(reps["pca"], reps["morphology"])
        meta["pca+morphology"] = {"source": "baseline: PCA and morphology blocks, each scaled to unit total variance",
                                  "dim": int(reps["pca+morphology"].shape[1]), "name": DISPLAY_NAMES["pca+morphology"]}
    else:
        meta["morphology"] = {"source": "skipped: no crops given and no obsm['X_morphology']", "dim": 0,
                              "name": DISPLAY_NAMES["morphology"]}
    return reps, meta


def _check_embedding_allow_nan(name: str, x: Any, n: int) -> np.ndarray:
    arr = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputDataError(f'obsm["{name}"] has shape {arr.shape}, expected ({n}, F)', fix="write one feature row per cell")
    return arr


def add_modality_embedding(adata, other, target_key: str, *, source_key: str = "X_spatia",
                           source: str | Path | None = None) -> None:
    """Copy `other.obsm[source_key]` into `adata.obsm[target_key]`, matching cells by obs_names.

    `spatia embed --modality image` (or ``gene``) writes its embedding as ``X_spatia`` of its
    own AnnData; this puts it beside the unified embeddings as ``X_spatia_image`` (or
    ``X_spatia_gene``). Every cell of `adata` must be in `other`.
    """
    if source_key not in other.obsm:
        raise InputDataError(f'the AnnData has no obsm["{source_key}"] to take the {target_key} embedding from',
                             path=source, fix="give the .h5ad written by `spatia embed --modality image|gene`")
    rows = pd.Index(other.obs_names.astype(str)).get_indexer(adata.obs_names.astype(str))
    missing = int((rows < 0).sum())
    if missing:
        raise InputDataError(f"{missing} of {adata.n_obs} evaluated cells are not in this AnnData", path=source,
                             fix="embed the same MIST dataset (all splits) with both modalities")
    values = other.obsm[source_key]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    adata.obsm[target_key] = values[rows].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


def annotation_task(reps: dict[str, np.ndarray], labels: np.ndarray, split: np.ndarray,
                    config: EvaluateConfig, advance=lambda: None) -> dict[str, Any]:
    """MLP and logistic regression per representation; macro-F1, macro-precision, accuracy."""
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
        return _skipped(f"{len(kept)} class(es) with >= {config.min_class_train_cells} train cells and "
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
        for seed in config.seeds:
            mlp = MLPClassifier(hidden_layer_sizes=config.mlp_hidden, alpha=config.mlp_alpha, early_stopping=True,
                                validation_fraction=0.1, n_iter_no_change=15, max_iter=config.mlp_max_iter,
                                batch_size=batch_size, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                mlp.fit(x_train, y_train)
            for key, value in scores(mlp.predict(x_test)).items():
                per_seed[key].append(value)
        logreg = LogisticRegression(C=config.logreg_c, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            logreg.fit(x_train, y_train)
        lr_scores = scores(logreg.predict(x_test))
        results[name] = {
            "mlp": {k: _stat(v) for k, v in per_seed.items()},
            "logreg": {k: _stat([v], deterministic=True) for k, v in lr_scores.items()},
        }
        advance()
    return _status_ok(n_train=int(train.sum()), n_test=int(test.sum()), classes=kept, excluded_classes=excluded,
                      chance_accuracy=float(pd.Series(y_test).value_counts(normalize=True).max()), results=results)


def _cluster_space(x: np.ndarray, config: EvaluateConfig) -> np.ndarray:
    if x.shape[1] <= config.cluster_max_dim:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=config.cluster_max_dim, random_state=config.seed).fit_transform(x).astype(np.float32)


def knn_adjacency(x: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """Symmetric binary kNN graph (euclidean), CSR (N, N) float32 without self-loops."""
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, x.shape[0] - 1)
    graph = NearestNeighbors(n_neighbors=k).fit(x).kneighbors_graph(mode="connectivity")
    graph = graph.maximum(graph.T).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph.astype(np.float32)


class LeidenGraph:
    """An undirected graph ready for repeated, seeded Leiden runs (igraph's implementation).

    The same algorithm as ``scanpy.tl.leiden(flavor="igraph", n_iterations=2)`` (modularity
    objective, igraph's `community_leiden`), with the igraph graph built once instead of on
    every call (four times faster over several resolutions and seeds).

    Args:
        adjacency: symmetric CSR (N, N), edge weights in the values.
    """

    def __init__(self, adjacency: sp.csr_matrix):
        import igraph

        upper = sp.triu(adjacency, k=1).tocoo()
        self.graph = igraph.Graph(n=adjacency.shape[0], edges=np.stack([upper.row, upper.col], axis=1).tolist(),
                                  directed=False)
        self.weights = upper.data.astype(np.float64).tolist()

    def leiden(self, resolution: float, seed: int) -> np.ndarray:
        """Communities, int (N,) numbered from 0, for one resolution and seed."""
        import random

        import igraph

        igraph.set_random_number_generator(random.Random(seed))
        try:
            partition = self.graph.community_leiden(objective_function="modularity", weights=self.weights,
                                                    resolution=resolution, n_iterations=2)
        finally:
            igraph.set_random_number_generator(random)
        return np.asarray(partition.membership, dtype=np.int64)

    def modularity(self, membership: np.ndarray) -> float:
        """Newman modularity (resolution 1) of a partition."""
        return float(self.graph.modularity(membership.tolist(), weights=self.weights))


def clustering_task(reps: dict[str, np.ndarray], labels: np.ndarray, config: EvaluateConfig,
                    advance=lambda: None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Leiden (several resolutions) and KMeans (k = number of labels); ARI and NMI.

    The label-free resolution is the one whose partitions have the highest mean modularity
    (resolution 1) on the kNN graph. Returns the results and, per representation, the Leiden
    clusters at the label-free resolution for the first seed (for the report's spatial map).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labelled = labels != None  # noqa: E711
    y = labels[labelled].astype(str)
    n_labels = len(set(y))
    n = int(labelled.sum())
    results: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    for name, full in reps.items():
        x = _cluster_space(full[labelled], config)
        graph = LeidenGraph(knn_adjacency(x, config.n_neighbors))
        per_res = []
        clusters_by_res = {}
        for res in config.leiden_resolutions:
            ari, nmi, mod, ncl = [], [], [], []
            for seed in config.seeds:
                c = graph.leiden(res, seed)
                if seed == config.seeds[0]:
                    clusters_by_res[res] = c
                ari.append(adjusted_rand_score(y, c))
                nmi.append(normalized_mutual_info_score(y, c))
                ncl.append(int(c.max() + 1))
                mod.append(graph.modularity(c))
            per_res.append({"resolution": res, "n_clusters": _stat(ncl), "ari": _stat(ari), "nmi": _stat(nmi),
                            "modularity": _stat(mod)})
        best = max(per_res, key=lambda r: r["ari"]["mean"])
        chosen = max(per_res, key=lambda r: r["modularity"]["mean"])
        maps[name] = clusters_by_res[chosen["resolution"]]
        km_ari, km_nmi = [], []
        for seed in config.seeds:
            c = KMeans(n_clusters=n_labels, n_init=3, random_state=seed).fit_predict(x)
            km_ari.append(adjusted_rand_score(y, c))
            km_nmi.append(normalized_mutual_info_score(y, c))
        results[name] = {
            "leiden_best": {"resolution": best["resolution"], "ari": best["ari"], "nmi": best["nmi"],
                            "n_clusters": best["n_clusters"]},
            "leiden_label_free": {"resolution": chosen["resolution"], "criterion": "max mean modularity",
                                  "ari": chosen["ari"], "nmi": chosen["nmi"], "n_clusters": chosen["n_clusters"]},
            "kmeans": {"k": n_labels, "ari": _stat(km_ari), "nmi": _stat(km_nmi)},
            "per_resolution": per_res,
            "cluster_dim": int(x.shape[1]),
        }
        advance()
    return _status_ok(n_cells=n, n_labels=n_labels, results=results), maps


def expression_task(reps: dict[str, np.ndarray], log_expr: sp.csr_matrix, gene_names: np.ndarray,
                    split: np.ndarray, config: EvaluateConfig, advance=lambda: None) -> dict[str, Any]:
    """Predict log-normalised HVG expression from image-only representations (XGBoost, ridge)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    inputs = [name for name in config.expression_inputs if name in reps]
    if not inputs:
        return _skipped(f"none of the image-only inputs {list(config.expression_inputs)} is available "
                        "(run `spatia embed --modality image`, or give crops / obsm['X_morphology'])")
    train, test = split == TRAIN, split == TEST
    genes_idx = select_hvgs(log_expr[train], gene_names, config.n_hvg, config.hvg_min_detection)
    genes = gene_names[genes_idx].tolist()
    y = log_expr[:, genes_idx].toarray()
    y_train, y_test = y[train], y[test]

    try:
        import xgboost
    except ImportError:  # the dependency is declared; guard a broken install
        xgboost = None

    rng = np.random.default_rng(config.seed)
    train_rows = np.flatnonzero(train)
    if config.xgb_max_train_cells is not None and train_rows.size > config.xgb_max_train_cells:
        xgb_rows = np.sort(rng.choice(train_rows, size=config.xgb_max_train_cells, replace=False))
    else:
        xgb_rows = train_rows
    results: dict[str, Any] = {}
    for name in inputs:
        x = reps[name]
        scaler = StandardScaler().fit(x[train])
        x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
        entry: dict[str, Any] = {}
        ridge = Ridge(alpha=config.ridge_alpha).fit(x_train, y_train)
        entry["ridge"] = _regression_scores(y_test, ridge.predict(x_test))
        if xgboost is None:
            entry["xgboost"] = _skipped("xgboost is not installed")
        else:
            model = xgboost.XGBRegressor(n_estimators=config.xgb_estimators, max_depth=config.xgb_max_depth,
                                         tree_method="hist", max_bin=config.xgb_max_bin, n_jobs=config.n_jobs,
                                         random_state=config.seed)
            model.fit(scaler.transform(x[xgb_rows]), y[xgb_rows])
            entry["xgboost"] = _regression_scores(y_test, model.predict(x_test).reshape(y_test.shape))
            entry["xgboost"]["n_train"] = int(xgb_rows.size)
        results[name] = entry
        advance()
    return _status_ok(genes=genes, n_train=int(train.sum()), n_test=int(test.sum()),
                      target="log1p(counts / total * median total)", results=results)


def select_hvgs(log_expr_train: sp.csr_matrix, gene_names: np.ndarray, n_top: int, min_detection: float) -> np.ndarray:
    """Indices of the top highly variable genes (scanpy "seurat" normalised dispersion).

    Candidates are the genes detected in at least `min_detection` of the cells: on sparse
    single-cell panels (a few counts per cell) the highest dispersions otherwise belong to
    genes seen in a handful of cells, which no representation can predict.
    """
    import anndata as ad
    import scanpy as sc

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


def _regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    pearson, spearman = _per_column_corr(y_true, y_pred)
    return {
        "status": "ok",
        "pearson": _stat([np.nanmean(pearson) if np.isfinite(pearson).any() else np.nan], deterministic=True),
        "spearman": _stat([np.nanmean(spearman) if np.isfinite(spearman).any() else np.nan], deterministic=True),
        "n_genes_scored": int(np.isfinite(pearson).sum()),
        "per_gene_pearson": [None if not np.isfinite(v) else float(v) for v in pearson],
        "per_gene_spearman": [None if not np.isfinite(v) else float(v) for v in spearman],
    }


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
            p, s = _pooled_corr(truth[mask], logged[mask])
            per_gene = _masked_column_pearson(truth, logged, mask)
            per[name]["pearson"].append(p)
            per[name]["spearman"].append(s)
            per[name]["pearson_per_gene"].append(float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() else np.nan)
        advance()
    results: dict[str, Any] = {}
    for name, fn in imputers.items():
        if fn is None:
            results[name] = _skipped("no model given")
        else:
            results[name] = {"status": "ok", **{k: _stat(v) for k, v in per[name].items()}}
    return _status_ok(n_cells=int(test_rows.size), n_genes=int(query.shape[1]),
                      n_held_out_per_cell=int(max(1, round(config.impute_fraction * query.shape[1]))),
                      scale="log1p of raw counts", results=results)


def layouts_2d(reps: dict[str, np.ndarray], rows: np.ndarray, config: EvaluateConfig,
               advance=lambda: None) -> dict[str, np.ndarray]:
    """2-D coordinates (len(rows), 2) float32 of each representation (UMAP or PCA)."""
    from sklearn.decomposition import PCA

    out = {}
    for name, x in reps.items():
        space = _cluster_space(x[rows], config)
        if config.layout == "umap":
            import umap

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = umap.UMAP(n_neighbors=min(config.n_neighbors, len(rows) - 1), random_state=config.seed,
                                  n_epochs=200)
                out[name] = model.fit_transform(space).astype(np.float32)
        else:
            out[name] = PCA(n_components=2, random_state=config.seed).fit_transform(space).astype(np.float32)
        advance()
    return out


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def evaluate(adata, config: EvaluateConfig, *, crops: CellCrops | None = None,
             imputer: Imputer | None = None) -> dict[str, Any]:
    """Score SPATIA's embeddings and the baselines on annotation, clustering, expression and imputation.

    Args:
        adata: AnnData with raw counts (``.X`` or ``layers["counts"]``), ``obs[config.labels]``,
            ``obsm["spatial"]`` (um; needed without a split column), and embeddings in
            ``obsm["X_spatia*"]``; optional ``obsm["X_morphology"]``.
        config: the run's settings.
        crops: per-cell crops for the morphology baseline (ignored when obsm has X_morphology).
        imputer: the model's gene decoder with the `Imputer` contract; None reports the model
            row of the imputation task as "skipped: no model given".

    Returns:
        A dict: ``config``, ``seeds``, ``dataset``, ``split``, ``embeddings``, ``tasks`` (one
        entry per task with ``status`` and ``results``), ``timings_s`` and ``plots`` (numpy
        arrays for the report; left out of metrics.json).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=config.n_jobs):
        return _evaluate(adata, config, crops, imputer)


def _evaluate(adata, config: EvaluateConfig, crops: CellCrops | None, imputer: Imputer | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    labels = _labels(adata, config.labels)
    if config.max_cells is not None and adata.n_obs > config.max_cells:
        keep = np.sort(np.random.default_rng(config.seed).choice(adata.n_obs, size=config.max_cells, replace=False))
        if crops is not None and crops.cell_ids is None:
            crops = CellCrops(np.asarray(crops.images)[keep], np.asarray(crops.masks)[keep], None, crops.channel_names)
        adata = adata[keep].copy()
        labels = labels[keep]
    counts = _counts_matrix(adata)
    obs_names = adata.obs_names.to_numpy().astype(str)
    gene_names = adata.var_names.to_numpy().astype(str)
    split, split_summary = _make_split(adata, config)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log_expr = baselines.log_normalise(counts)
    reps, meta = build_representations(adata, config, counts, log_expr, crops)
    timings["representations"] = time.perf_counter() - t0

    labelled = labels != None  # noqa: E711
    results: dict[str, Any] = {
        "config": asdict(config),
        "seeds": config.seeds,
        "dataset": {
            "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "label_column": config.labels,
            "n_labelled": int(labelled.sum()), "n_labels": int(len(set(labels[labelled]))),
            "label_counts": {str(k): int(v) for k, v in pd.Series(labels[labelled]).value_counts().items()},
        },
        "split": split_summary,
        "embeddings": meta,
        "tasks": {},
    }
    plots: dict[str, Any] = {
        "spatial": np.asarray(adata.obsm["spatial"], dtype=np.float32)[:, :2] if "spatial" in adata.obsm else None,
        "labels": labels, "split": split, "names": {k: meta[k]["name"] for k in reps},
    }
    steps = {
        "annotation": len(reps), "clustering": len(reps),
        "expression": len([k for k in config.expression_inputs if k in reps]), "imputation": config.n_seeds,
    }
    total = sum(steps[t] for t in config.tasks) + (len(reps) if config.layout != "none" else 0)
    with progress() as bar:
        task_id = bar.add_task("evaluate", total=total)

        def advance() -> None:
            bar.advance(task_id)

        for task in TASKS:
            if task not in config.tasks:
                results["tasks"][task] = _skipped("not requested")
                continue
            bar.update(task_id, description=f"evaluate: {task}")
            t0 = time.perf_counter()
            if task == "annotation":
                results["tasks"][task] = annotation_task(reps, labels, split, config, advance)
            elif task == "clustering":
                results["tasks"][task], plots["clusters"] = clustering_task(reps, labels, config, advance)
                plots["clusters_rows"] = np.flatnonzero(labelled)
            elif task == "expression":
                results["tasks"][task] = expression_task(reps, log_expr, gene_names, split, config, advance)
            elif task == "imputation":
                results["tasks"][task] = imputation_task(counts, obs_names, split, reps, config, imputer, advance)
            timings[task] = time.perf_counter() - t0
            log.info("%s done in %.1f s", task, timings[task])
        if config.layout != "none":
            bar.update(task_id, description=f"evaluate: {config.layout} layout")
            t0 = time.perf_counter()
            rows = np.flatnonzero(labelled)
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
