"""`EvaluateConfig`: the settings of one evaluation run (saved with the report).

Built with `spatia.config.load_config(EvaluateConfig, file_or_mapping, overrides=...)`, which
refuses unknown keys and wrong types; `validate()` holds the rules between fields (the loader
calls it, and so does `evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from spatia.errors import ConfigError
from spatia.keys import SPLIT_BUFFER_UM

RIDGE_ALPHAS = tuple(10.0 ** (k / 2) for k in range(-4, 11))
"""Ridge penalties tried by the expression tasks: 0.01 to 100,000 in half-decades. On breast's
~200 train cells the chosen penalty is 10-1,000 for every representation (docs/evaluate.md)."""

LOGREG_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths tried by the annotation's logistic regression, in decades. A fixed C suits
some inputs and not others: on region1's seed-0 split, C = 1 was too weak for the 256-dimensional
level concatenations (docs/evaluate.md)."""

TASKS = ("annotation", "clustering", "expression", "imputation", "patch_expression")
LAYOUTS = ("umap", "pca", "none")
BASELINES = ("pca", "autoencoder", "scvi")
BASELINE_FITS = ("train", "all")
LEVEL_NAMES = ("cell", "niche", "tissue")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation run.

    Attributes:
        labels: obs column(s) with cell labels (cell types, clusters, states, domains). A
            string or a list; annotation and clustering are scored against each column, the
            first is the primary one (``results["tasks"]``), all are in ``results["by_label"]``.
        split: obs column with train/test(/buffer) values; None: the split a `spatia embed`
            output carries (obs "split" beside uns["spatia"], the one its model trained on),
            else a spatial block split.
        slide: obs column naming each cell's slide/section (blocks never span slides).
        embeddings: obsm keys to score; None takes every ``X_spatia*`` key present.
        level_concatenations: level combinations scored as one representation: "cell+niche"
            is ``X_spatia_cell`` and ``X_spatia_niche`` side by side (each block scaled to unit
            total variance), key ``X_spatia_cell+niche``. Niche and tissue embeddings are shared
            by all cells of a niche / tissue region, so alone they describe the context, not the
            cell; next to the cell's own embedding they show what the context adds.
        baselines: baseline representations: "pca" (PCA of log-normalised counts),
            "autoencoder" (the count autoencoder, `spatia.evaluate.autoencoder`), "scvi"
            (scVI's latent; skipped with a reason when scvi-tools is not installed).
        baseline_fit: the cells the learned baselines (PCA, autoencoder, scVI) are fit on.
            "train" (default): the split's train cells, then every cell is transformed, as
            `spatia pretrain` trains on the MIST dataset's train split only (a `spatia embed`
            output is scored on that split by default, so the cells match). "all":
            every cell, test cells included (transductive; a baseline then has seen up to twice
            the cells the SPATIA model has, docs/results.md).
        seed: split seed and first model seed; models run with seeds seed .. seed+n_seeds-1.
        n_seeds: number of seeds for the stochastic models (MLP, Leiden, KMeans, masks).
        tasks: which tasks to run.
        block_um, buffer_um, test_fraction: spatial block split (see `spatial_block_split`).
        max_cells: evaluate a seeded random subset of at most this many cells (None: all).
        min_class_train_cells: classes with fewer train cells are left out of annotation.
        pca_components: PCA baseline dimensions.
        autoencoder_epochs, autoencoder_hidden, autoencoder_latent, autoencoder_input_dropout,
            autoencoder_batch_size, autoencoder_lr: the count autoencoder (G-hidden-latent MLP,
            NB likelihood); scvi_epochs, scvi_latent: scVI (same epoch budget by default).
        mlp_hidden, mlp_max_iter, mlp_alpha: MLP classifier (adam, early stopping on 10 % of
            train after 15 epochs without gain, mini-batches of n_train / 20 clipped to 32..256).
        logreg_cs, logreg_cv_folds, logreg_cv_max_cells: the logistic regression's inverse L2
            strengths tried; the one with the best mean macro-F1 over a seeded stratified k-fold
            split of the train cells (of a seeded subsample of at most logreg_cv_max_cells of
            them; sklearn's LogisticRegressionCV) is refit on every train cell, so each input
            is scored at the penalty that suits it, not at one fixed C; one value fixes it.
        leiden_resolutions, n_neighbors: Leiden (modularity, igraph) on the symmetric binary
            kNN graph (euclidean) of each representation.
        cluster_max_dim: embeddings wider than this are PCA-reduced before clustering.
        expression_inputs: representations for expression-from-morphology (image-only ones).
        n_hvg: highly variable genes predicted (selected on train cells, among the genes detected
            in at least hvg_min_detection of them).
        xgb_estimators, xgb_max_depth: XGBoost as the paper (100 trees of depth 3 per gene);
        xgb_max_train_cells: seeded subsample of train cells for XGBoost; xgb_max_bin: histogram
        bins (64 halves the time of the default 256); ridge_alphas: the ridge penalties tried; the
        one with the lowest leave-one-out error on the train cells (sklearn's RidgeCV, one
        penalty for all genes) is used, so wide embeddings on few train cells are not scored
        under-regularised (docs/evaluate.md); one value fixes it.
        niche_column: obs column with each cell's niche ID (written by `spatia embed`); the
            patch-level task pools cells by it. patch_inputs: per-niche image-only inputs of
            that task (the mean over the niche's cells of each obsm key; "niche_morphology" is
            the hand-made features of the niche image, which needs niche crops).
        impute_fraction: fraction of each cell's genes held out; impute_max_cells: test cells
        used; knn_k: neighbours of the kNN imputers; knn_prior_cells: weight (in cells) of the
        train mean profile their neighbour average is shrunk toward; impute_decoder_weight: the
        gene-decoder imputer's `decoder_weight` (w in `share ** w * prior ** (1 - w)`, the
        decoder's share drawn toward the train cells' profile; 1: the decoder alone; the
        default is `spatia.train.impute.DECODER_SHARE_WEIGHT`, docs/evaluate.md).
        bootstrap_resamples: paired bootstrap resamples of the test units behind each verdict of
            annotation and expression from morphology (cell and niche): SPATIA's row minus the
            best baseline's, and on annotation the image-only row minus the hand-made features',
            each with its 95 % interval (`spatia.evaluate.bootstrap`); 0 skips it.
        compare: more annotation pairs to bootstrap beside the verdicts', each "ROW_A:ROW_B"
            (representation keys, e.g. "X_spatia_gene:autoencoder": A's MLP macro-F1 minus
            B's), for every label column; they join the task's ``comparisons`` in metrics.json.
        layout: 2-D layout of each representation for the report's figure: "umap" (umap-learn;
            its numba compilation costs ~30-50 s once per process on 2 cores), "pca" (first two
            principal components, instant) or "none"; layout_max_cells: cells drawn.
        n_jobs: threads for XGBoost, BLAS, OpenMP and torch (limit for the whole run).
            1 by default: on a shared 2-core machine 2 threads made XGBoost 10x slower.
    """

    labels: str | tuple[str, ...] = ()
    split: str | None = None
    slide: str | None = None
    embeddings: tuple[str, ...] | None = None
    level_concatenations: tuple[str, ...] = ("cell+niche", "cell+niche+tissue")
    baselines: tuple[str, ...] = BASELINES
    baseline_fit: str = "train"
    seed: int = 0
    n_seeds: int = 3
    tasks: tuple[str, ...] = TASKS
    block_um: float = 200.0
    buffer_um: float = SPLIT_BUFFER_UM
    test_fraction: float = 0.3
    max_cells: int | None = None
    min_class_train_cells: int = 10
    pca_components: int = 50
    autoencoder_epochs: int = 40
    autoencoder_hidden: int = 256
    autoencoder_latent: int = 64
    autoencoder_input_dropout: float = 0.25
    autoencoder_batch_size: int = 256
    autoencoder_lr: float = 1e-3
    scvi_epochs: int = 40
    scvi_latent: int = 10
    mlp_hidden: tuple[int, ...] = (128,)
    mlp_max_iter: int = 200
    mlp_alpha: float = 1e-4
    logreg_cs: tuple[float, ...] = LOGREG_CS
    logreg_cv_folds: int = 3
    logreg_cv_max_cells: int | None = 2000
    leiden_resolutions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)
    n_neighbors: int = 15
    cluster_max_dim: int = 50
    expression_inputs: tuple[str, ...] = ("X_spatia_image_cell", "X_spatia_image", "morphology")
    n_hvg: int = 50
    hvg_min_detection: float = 0.02
    xgb_estimators: int = 100
    xgb_max_depth: int = 3
    xgb_max_train_cells: int | None = 5000
    xgb_max_bin: int = 64
    ridge_alphas: tuple[float, ...] = RIDGE_ALPHAS
    niche_column: str = "niche_id"
    patch_inputs: tuple[str, ...] = ("X_spatia_image_niche", "X_spatia_image", "niche_morphology")
    impute_fraction: float = 0.1
    impute_max_cells: int = 2000
    impute_decoder_weight: float = 0.7  # = impute.DECODER_SHARE_WEIGHT (tested); a literal: no torch import
    knn_k: int = 15
    knn_prior_cells: float = 15.0
    bootstrap_resamples: int = 1000
    compare: tuple[str, ...] = ()
    layout: str = "umap"
    layout_max_cells: int = 2000
    n_jobs: int = 1

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(self.labels)

    @property
    def compare_pairs(self) -> tuple[tuple[str, str], ...]:
        """`compare` as (row A, row B) pairs, scored as A minus B."""
        return tuple(tuple(pair.split(":", 1)) for pair in self.compare)

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            object.__setattr__(self, "labels", (self.labels,))
        for name in ("labels", "embeddings", "level_concatenations", "baselines", "tasks", "mlp_hidden",
                     "leiden_resolutions", "expression_inputs", "patch_inputs", "ridge_alphas",
                     "logreg_cs", "compare"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._check_values()

    def _check_values(self) -> None:
        """Rules every instance obeys, the defaults included (run on construction)."""
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ConfigError(f"unknown evaluation task(s) {unknown}", fix=f"choose from {list(TASKS)}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"'baselines': unknown baseline(s) {unknown}", fix=f"choose from {list(BASELINES)}")
        if self.baseline_fit not in BASELINE_FITS:
            raise ConfigError(f"'baseline_fit' must be one of {list(BASELINE_FITS)}; got {self.baseline_fit!r}",
                              fix="use 'train' (fit on the train split's cells, as SPATIA is) or 'all'")
        for combo in self.level_concatenations:
            parts = combo.split("+")
            if len(parts) < 2 or any(p not in LEVEL_NAMES for p in parts) or len(set(parts)) != len(parts):
                raise ConfigError(f"'level_concatenations': {combo!r} is not two or more distinct levels joined by '+'",
                                  fix=f"use e.g. 'cell+niche' (levels: {', '.join(LEVEL_NAMES)})")
        if self.n_seeds < 1:
            raise ConfigError(f"'n_seeds' must be >= 1; got {self.n_seeds}", fix="use e.g. n_seeds=3")
        if self.max_cells is not None and self.max_cells < 2:
            raise ConfigError(f"'max_cells' must be at least 2 (or unset for every cell); got {self.max_cells}",
                              fix="give a positive number of cells, e.g. --max-cells 5000, or leave it out")
        if not 0.0 < self.impute_fraction < 1.0:
            raise ConfigError(f"'impute_fraction' must be in (0, 1); got {self.impute_fraction}",
                              fix="use e.g. impute_fraction=0.1")
        if not 0.0 < self.impute_decoder_weight <= 1.0:
            raise ConfigError(f"'impute_decoder_weight' must be in (0, 1]; got {self.impute_decoder_weight}",
                              fix="use 1 for the decoder's share alone, or e.g. 0.7 (the default)")
        if not 0.0 <= self.autoencoder_input_dropout < 1.0:
            raise ConfigError(f"'autoencoder_input_dropout' must be in [0, 1); got {self.autoencoder_input_dropout}",
                              fix="use e.g. 0.25")
        if self.bootstrap_resamples < 0:
            raise ConfigError(f"'bootstrap_resamples' must be >= 0; got {self.bootstrap_resamples}",
                              fix="use e.g. 1000, or 0 to skip the paired bootstrap")
        for pair in self.compare:
            rows = pair.split(":")
            if len(rows) != 2 or not all(rows) or rows[0] == rows[1]:
                raise ConfigError(f"'compare': {pair!r} is not two different representation keys joined by ':'",
                                  fix="use e.g. 'X_spatia_gene:autoencoder' (scored as the first minus the second)")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}", fix=f"choose one of {list(LAYOUTS)}")
        if not self.leiden_resolutions or min(self.leiden_resolutions) <= 0:
            raise ConfigError("'leiden_resolutions' must be positive numbers", fix="use e.g. [0.25, 0.5, 1.0]")
        if not self.ridge_alphas or min(self.ridge_alphas) <= 0:
            raise ConfigError(f"'ridge_alphas' must be positive numbers; got {list(self.ridge_alphas)}",
                              fix="use e.g. [0.1, 1, 10, 100, 1000] (the penalty with the lowest leave-one-out "
                                  "error on the train cells is used), or one value to fix it")
        if not self.logreg_cs or min(self.logreg_cs) <= 0:
            raise ConfigError(f"'logreg_cs' must be positive numbers; got {list(self.logreg_cs)}",
                              fix="use e.g. [0.01, 0.1, 1, 10, 100] (the one with the best cross-validated macro-F1 "
                                  "on the train cells is used), or one value to fix it")
        if self.logreg_cv_folds < 2:
            raise ConfigError(f"'logreg_cv_folds' must be at least 2; got {self.logreg_cv_folds}",
                              fix="use e.g. 3 (each fold keeps every class's share of the train cells)")
        if self.logreg_cv_max_cells is not None and self.logreg_cv_max_cells < 2 * self.logreg_cv_folds:
            raise ConfigError(f"'logreg_cv_max_cells' must be at least 2 x logreg_cv_folds "
                              f"({2 * self.logreg_cv_folds}); got {self.logreg_cv_max_cells}",
                              fix="use e.g. 2000, or leave it unset to choose C on every train cell")

    def validate(self) -> None:
        """Rules between fields, checked once the config is complete (`load_config` and `evaluate`)."""
        self._check_values()
        if not self.labels:
            raise ConfigError("'labels' is not set: no obs column of cell labels to score against",
                              fix="give one or more obs columns, e.g. labels: cell_type (or --labels cell_type)")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"'labels' names a column twice: {list(self.labels)}", fix="list each column once")
        if self.split is not None and self.split in self.labels:
            raise ConfigError(f"the split column {self.split!r} is also a label column",
                              fix="score labels other than the split")
