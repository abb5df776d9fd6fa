"""Baselines and building blocks: normalisation, feature blocks, imputers, Leiden."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from spatia.evaluate import ExpressionKnnImputer, GeneMeanImputer, KnnImputer, hold_out_mask
from spatia.evaluate.baselines import concatenate_blocks, standardise_features
from spatia.evaluate.leiden import LeidenGraph, knn_adjacency
from spatia.expression import log_normalise, median_library


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    return sp.csr_matrix(rng.poisson(rng.gamma(1.0, 2.0, size=(200, 30))).astype(np.float32))


def test_log_normalise_matches_scanpy(counts):
    holder = ad.AnnData(counts.copy())
    sc.pp.normalize_total(holder)
    sc.pp.log1p(holder)
    assert np.allclose(log_normalise(counts).toarray(), holder.X.toarray(), atol=1e-5)


def test_median_library_ignores_empty_cells():
    counts = np.array([[0, 0], [1, 2], [4, 0], [0, 0], [5, 5]], dtype=np.float32)  # totals 0, 3, 4, 0, 10
    assert median_library(counts) == 4.0
    assert median_library(sp.csr_matrix(counts)) == 4.0
    assert median_library(np.zeros((3, 2))) == 1.0                      # no counts at all: no scaling
    # log_normalise's default target is that median: a 4-count cell keeps its counts
    assert np.allclose(log_normalise(counts)[2], np.log1p([4.0, 0.0]))


def test_feature_blocks():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 3, size=(100, 4))
    x[:, 2] = 7.0  # constant: dropped
    x[3, 0] = np.nan  # filled with the column median
    z = standardise_features(x)
    assert z.shape == (100, 3) and np.isfinite(z).all()
    assert np.allclose(z.mean(axis=0), 0, atol=1e-5) and np.allclose(z.std(axis=0), 1, atol=1e-4)
    both = concatenate_blocks(rng.normal(size=(100, 50)) * 10, rng.normal(size=(100, 3)))
    assert both.shape == (100, 53)
    assert (both[:, :50] ** 2).sum() / 100 == pytest.approx(1.0, rel=1e-4)  # each block unit total variance
    assert (both[:, 50:] ** 2).sum() / 100 == pytest.approx(1.0, rel=1e-4)


def test_knn_imputer_reconstructs_a_reference_cell_exactly(counts):
    # k = 1 and no shrinkage: a reference cell's nearest neighbour is itself, and scaling its
    # profile by visible counts / visible profile mass restores its true held-out counts
    names = np.array([f"c{i}" for i in range(counts.shape[0])])
    emb = np.random.default_rng(2).normal(size=(counts.shape[0], 5))
    imputer = KnnImputer(emb, names, np.ones(counts.shape[0], bool), counts, k=1, prior_cells=0.0)
    query = counts[:20].toarray()
    mask = hold_out_mask(20, 30, 0.2, seed=0)
    visible = sp.csr_matrix(np.where(mask, 0, query).astype(np.float32))
    pred = imputer(visible, mask, names[:20])
    assert np.allclose(pred[mask], query[mask], atol=1e-4)


def test_mean_and_expression_knn_imputers(counts):
    mask = hold_out_mask(50, 30, 0.1, seed=1)
    query = counts[150:].toarray()
    visible = sp.csr_matrix(np.where(mask, 0, query).astype(np.float32))
    names = np.array([f"q{i}" for i in range(50)])
    mean_pred = GeneMeanImputer(counts[:150])(visible, mask, names)
    profile = np.asarray(counts[:150].toarray() / counts[:150].sum(axis=1)).mean(axis=0)
    # every cell's prediction is the train mean profile, scaled to the cell's library
    ratio = mean_pred / profile
    assert np.allclose(ratio, ratio[:, :1], rtol=1e-4)
    knn = ExpressionKnnImputer(counts[:150], k=10, prior_cells=5)(visible, mask, names)
    assert knn.shape == query.shape and np.isfinite(knn).all() and (knn >= 0).all()
    # infinite shrinkage is the mean imputer
    inf = ExpressionKnnImputer(counts[:150], k=10, prior_cells=1e9)(visible, mask, names)
    assert np.allclose(inf, mean_pred, rtol=1e-4)


def test_leiden_graph_is_seeded_and_agrees_with_scanpy():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=6, size=(4, 10))
    x = (centres[np.repeat(np.arange(4), 100)] + rng.normal(size=(400, 10))).astype(np.float32)
    adjacency = knn_adjacency(x, 15)
    assert (adjacency != adjacency.T).nnz == 0 and adjacency.diagonal().sum() == 0
    graph = LeidenGraph(adjacency)
    a, b = graph.leiden(0.5, seed=1), graph.leiden(0.5, seed=1)
    assert np.array_equal(a, b)
    truth = np.repeat(np.arange(4), 100)
    assert adjusted_rand_score(truth, a) > 0.95
    holder = ad.AnnData(obs={"i": np.arange(400).astype(str)})
    sc.tl.leiden(holder, resolution=0.5, adjacency=adjacency, flavor="igraph", n_iterations=2, directed=False,
                 random_state=1)
    assert adjusted_rand_score(holder.obs["leiden"].astype(int), a) > 0.95
    assert graph.modularity(truth) > graph.modularity(rng.permutation(truth)) + 0.3
