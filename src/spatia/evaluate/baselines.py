"""Baseline representations and imputers scored beside SPATIA's embeddings.

(The log-normalisation and the PCA of expression are `spatia.expression`'s; the count
autoencoder and scVI baselines are in `spatia.evaluate.autoencoder` and `scvi_latent`.)

- `standardise_features`: z-scored morphology features (NaN -> column median, constant
  columns dropped, clipped to +-10), the morphology baseline.
- `concatenate_blocks`: the PCA + morphology baseline, each block scaled to unit total
  variance so neither dominates distances by its number of columns or units.
- Imputers with the `Imputer` contract: `KnnImputer` (average of the k nearest reference
  cells in any embedding), `ExpressionKnnImputer` (neighbours found from the cell's own
  visible expression) and `GeneMeanImputer` (the reference cells' mean profile).

`Imputer` contract: ``imputer(counts, held_out_mask, obs_names) -> predictions`` where
``counts`` is a float32 CSR (Q, G) of raw counts with the held-out entries set to zero,
``held_out_mask`` bool (Q, G) marks them, ``obs_names`` (Q,) are the cells' IDs (rows of the
AnnData) and ``predictions`` is a float (Q, G) array of predicted raw counts (expected counts
on the scale of ``.X``); only the held-out entries are read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from spatia.errors import InputDataError
from spatia.expression import library_sizes, log_normalise, median_library

Imputer = Callable[[sp.csr_matrix, np.ndarray, np.ndarray], np.ndarray]


def standardise_features(features: pd.DataFrame | np.ndarray, clip: float = 10.0) -> np.ndarray:
    """Z-score each column; NaN -> column median; constant columns dropped; clip to +-clip.

    Returns:
        float32 (N, F') with F' <= F.
    """
    x = np.asarray(features, dtype=np.float64).copy()
    medians = np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)
    medians = np.where(np.isfinite(medians), medians, 0.0)
    bad = ~np.isfinite(x)
    x[bad] = np.take(medians, np.nonzero(bad)[1])
    std = x.std(axis=0)
    keep = std > 1e-12
    z = (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]
    return np.clip(z, -clip, clip).astype(np.float32)


def concatenate_blocks(*blocks: np.ndarray) -> np.ndarray:
    """Concatenate feature blocks after scaling each to unit total variance, float32."""
    scaled = []
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        b = b - b.mean(axis=0)
        total = float(np.sqrt((b**2).sum() / max(len(b), 1)))
        scaled.append(b / total if total > 0 else b)
    return np.concatenate(scaled, axis=1).astype(np.float32)


def _predict_from_profiles(profiles: np.ndarray, counts: sp.csr_matrix, held_out_mask: np.ndarray) -> np.ndarray:
    """Scale per-cell expected profiles (Q, G) (fractions of library) to each cell's library.

    The library size is estimated from the visible counts and the fraction of the profile
    that is visible: L = visible_total / sum(profile over visible genes).
    """
    visible_total = library_sizes(counts)
    visible_fraction = (profiles * ~held_out_mask).sum(axis=1)
    library = np.divide(visible_total, visible_fraction, out=np.zeros_like(visible_total),
                        where=visible_fraction > 1e-12)
    return (profiles * library[:, None]).astype(np.float32)


def _reference_profiles(reference_counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    x = sp.csr_matrix(reference_counts, dtype=np.float64)
    totals = library_sizes(x)
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.asarray((sp.diags(scale) @ x).todense())


def _neighbour_mean(profiles: np.ndarray, indices: np.ndarray, prior_cells: float) -> np.ndarray:
    """Mean profile of each query's neighbours, shrunk toward the mean of all reference cells.

    (sum of the k neighbour profiles + prior_cells * reference mean) / (k + prior_cells): with
    a few counts per cell, a plain k-neighbour average is mostly sampling noise.
    """
    q, k = indices.shape
    weights = sp.csr_matrix(
        (np.full(q * k, 1.0), indices.ravel(), np.arange(0, q * k + 1, k)), shape=(q, profiles.shape[0])
    )
    total = np.asarray(weights @ profiles) + prior_cells * profiles.mean(axis=0)
    return total / (k + prior_cells)


class GeneMeanImputer:
    """Predicts every held-out entry from the reference cells' mean expression profile."""

    def __init__(self, reference_counts: sp.spmatrix | np.ndarray):
        self.profile = _reference_profiles(reference_counts).mean(axis=0)

    def __call__(self, counts: sp.csr_matrix, held_out_mask: np.ndarray, obs_names: np.ndarray) -> np.ndarray:
        profiles = np.broadcast_to(self.profile, held_out_mask.shape)
        return _predict_from_profiles(profiles, counts, held_out_mask)


class KnnImputer:
    """Mean profile of the k nearest reference cells in an embedding, scaled to the cell's library.

    Args:
        embedding: (N, D) embedding of all cells of the AnnData, rows matching `obs_names`.
        obs_names: (N,) cell IDs of those rows.
        reference: bool (N,) cells whose expression may be used (the train split).
        counts: raw counts (N, G) of all cells (only reference rows are read).
        k: neighbours.
        prior_cells: weight, in cells, of the reference mean profile the neighbour average is
            shrunk toward (0: plain kNN average).

    The embedding of a query cell must not have seen its held-out genes (use image-only
    embeddings or morphology features, not gene or unified embeddings, for a fair score).
    """

    def __init__(self, embedding: np.ndarray, obs_names: np.ndarray, reference: np.ndarray,
                 counts: sp.spmatrix | np.ndarray, k: int = 15, prior_cells: float = 5.0):
        embedding = np.asarray(embedding, dtype=np.float32)
        reference = np.asarray(reference, dtype=bool)
        mu, sd = embedding.mean(axis=0), embedding.std(axis=0)
        self._embedding = (embedding - mu) / np.where(sd > 0, sd, 1.0)
        self._row = pd.Index(np.asarray(obs_names).astype(str))
        self.prior_cells = float(prior_cells)
        self._profiles = _reference_profiles(sp.csr_matrix(counts)[np.flatnonzero(reference)])
        self._nn = NearestNeighbors(n_neighbors=min(k, int(reference.sum()))).fit(self._embedding[reference])

    def __call__(self, counts: sp.csr_matrix, held_out_mask: np.ndarray, obs_names: np.ndarray) -> np.ndarray:
        rows = self._row.get_indexer(np.asarray(obs_names).astype(str))
        if (rows < 0).any():
            raise InputDataError("KnnImputer was asked about cells it has no embedding for",
                                 fix="build the imputer from the same AnnData that is evaluated")
        _, idx = self._nn.kneighbors(self._embedding[rows])
        profiles = _neighbour_mean(self._profiles, idx, self.prior_cells)
        return _predict_from_profiles(profiles, counts, held_out_mask)


class ExpressionKnnImputer:
    """Neighbours from the query cell's own visible expression (PCA of log-normalised counts).

    The PCA is fitted on the reference cells; the query's held-out entries are zero in the
    counts it receives, so it never sees them. `prior_cells` as in `KnnImputer`.
    """

    def __init__(self, reference_counts: sp.spmatrix | np.ndarray, k: int = 15, n_components: int = 30, seed: int = 0,
                 prior_cells: float = 5.0):
        from sklearn.decomposition import TruncatedSVD

        ref = sp.csr_matrix(reference_counts, dtype=np.float32)
        self.prior_cells = float(prior_cells)
        self._target_sum = median_library(ref)
        log_ref = log_normalise(ref, self._target_sum)
        self._mean = np.asarray(log_ref.mean(axis=0)).ravel()
        n_comp = int(max(1, min(n_components, min(ref.shape) - 1)))
        self._svd = TruncatedSVD(n_components=n_comp, random_state=seed).fit(log_ref.toarray() - self._mean)
        self._profiles = _reference_profiles(ref)
        ref_emb = self._svd.transform(log_ref.toarray() - self._mean)
        self._nn = NearestNeighbors(n_neighbors=min(k, ref.shape[0])).fit(ref_emb)

    def __call__(self, counts: sp.csr_matrix, held_out_mask: np.ndarray, obs_names: np.ndarray) -> np.ndarray:
        log_q = sp.csr_matrix(log_normalise(counts, self._target_sum)).toarray() - self._mean
        _, idx = self._nn.kneighbors(self._svd.transform(log_q))
        profiles = _neighbour_mean(self._profiles, idx, self.prior_cells)
        return _predict_from_profiles(profiles, counts, held_out_mask)
