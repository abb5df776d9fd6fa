"""Learned baselines: the count autoencoder (NB likelihood) and scVI's latent (optional extra)."""

import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from spatia.errors import ConfigError
from spatia.evaluate import EvaluateConfig, evaluate
from spatia.evaluate.autoencoder import CountAutoencoder, fit_count_autoencoder
from spatia.model.decoders import nb_log_prob as negative_binomial_log_prob
from spatia.evaluate.scvi_latent import ScviUnavailable, scvi_available, scvi_latent
from spatia.evaluate.synthetic import synthetic_evaluation_data

FAST = dict(n_seeds=1, leiden_resolutions=(0.5,), layout="none", mlp_hidden=(32,), level_concatenations=(),
            tasks=("annotation",), embeddings=("X_spatia",))


def test_negative_binomial_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean = torch.rand(50, 7, generator=gen) * 20 + 0.01
    dispersion = torch.rand(7, generator=gen) * 5 + 0.05
    counts = torch.poisson(mean, generator=gen)
    ours = negative_binomial_log_prob(counts, mean, dispersion)
    reference = torch.distributions.NegativeBinomial(total_count=dispersion.expand_as(mean),
                                                     logits=mean.log() - dispersion.log()).log_prob(counts)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-5)
    # a zero mean (a cell without counts) gives probability 1 to zero counts, not NaN
    zero = negative_binomial_log_prob(torch.zeros(3), torch.zeros(3), torch.ones(3))
    assert torch.allclose(zero, torch.zeros(3), atol=1e-6)


def test_autoencoder_mean_is_library_times_proportions():
    model = CountAutoencoder(n_genes=12, hidden=16, latent=4, input_dropout=0.0).eval()
    library = torch.tensor([10.0, 250.0])
    _, mean = model(torch.rand(2, 12), library)
    assert mean.shape == (2, 12) and torch.all(mean > 0)
    assert torch.allclose(mean.sum(dim=1), library)


def test_autoencoder_beats_a_random_embedding_and_is_seeded():
    adata, _ = synthetic_evaluation_data(800, n_genes=60, n_types=4, signal=0.6, seed=3)
    types = adata.obs["cell_type"].to_numpy()
    fit = fit_count_autoencoder(adata.X, epochs=25, hidden=64, latent=16, seed=0)
    assert fit.embedding.shape == (800, 16) and np.isfinite(fit.embedding).all()
    assert fit.epoch_losses[-1] < fit.epoch_losses[0]  # the NB likelihood was optimised
    train, test = np.arange(800) < 500, np.arange(800) >= 500

    def accuracy(x):
        model = LogisticRegression(max_iter=2000).fit(x[train], types[train])
        return model.score(x[test], types[test])

    random = np.random.default_rng(0).normal(size=fit.embedding.shape)
    assert accuracy(fit.embedding) > 0.8 > accuracy(random) + 0.3
    again = fit_count_autoencoder(adata.X, epochs=25, hidden=64, latent=16, seed=0)
    assert np.array_equal(fit.embedding, again.embedding)


def test_autoencoder_baseline_is_scored_beside_the_embeddings():
    adata, _ = synthetic_evaluation_data(500, n_genes=40, n_types=3, seed=4)
    config = EvaluateConfig(labels="cell_type", baselines=("pca", "autoencoder"), autoencoder_epochs=5,
                            autoencoder_latent=8, **FAST)
    results = evaluate(adata, config)
    assert set(results["tasks"]["annotation"]["results"]) == {"X_spatia", "pca", "autoencoder"}
    assert results["embeddings"]["autoencoder"]["dim"] == 8
    assert results["timings_s"]["train_autoencoder"] >= 0


def test_scvi_is_skipped_with_a_reason_when_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "scvi", None)  # import scvi raises ImportError
    ok, reason = scvi_available()
    assert not ok and "spatia[scvi]" in reason
    with pytest.raises(ScviUnavailable, match="not installed"):
        scvi_latent(np.ones((5, 3)))
    adata, _ = synthetic_evaluation_data(300, n_genes=30, n_types=3, seed=5)
    results = evaluate(adata, EvaluateConfig(labels="cell_type", baselines=("pca", "scvi"), **FAST))
    assert results["embeddings"]["scvi"]["source"].startswith("skipped: scvi-tools is not installed")
    assert "scvi" not in results["tasks"]["annotation"]["results"]


@pytest.mark.slow
@pytest.mark.skipif(not scvi_available()[0], reason="scvi-tools is not installed (optional extra spatia[scvi])")
def test_scvi_latent_separates_types():
    import logging

    adata, _ = synthetic_evaluation_data(600, n_genes=40, n_types=3, seed=6)
    names = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric")
    before = [logging.getLogger(n).level for n in names]
    fit = scvi_latent(adata.X, n_latent=6, epochs=15, seed=0)
    assert [logging.getLogger(n).level for n in names] == before  # the caller's logging is left as it was
    assert fit.embedding.shape == (600, 6) and np.isfinite(fit.embedding).all()
    types = adata.obs["cell_type"].to_numpy()
    model = LogisticRegression(max_iter=2000).fit(fit.embedding[:400], types[:400])
    assert model.score(fit.embedding[400:], types[400:]) > 0.8


def _dense_counts(adata) -> np.ndarray:
    return np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float32)


def _with_other_cells_changed(counts: np.ndarray, fit_rows: np.ndarray, seed: int = 9) -> np.ndarray:
    """The same counts for the fitted cells, new ones (another depth) for the rest."""
    changed = np.array(counts, dtype=np.float32, copy=True)
    changed[~fit_rows] = np.random.default_rng(seed).poisson(3 * changed[~fit_rows] + 1)
    return changed


def test_pca_fit_on_train_rows_projects_every_cell_on_their_components():
    from sklearn.decomposition import PCA

    from spatia.expression import expression_pca, log_normalise

    adata, _ = synthetic_evaluation_data(400, n_genes=30, n_types=3, seed=7)
    log_expr = np.asarray(log_normalise(_dense_counts(adata)))
    fit_rows = np.arange(400) % 3 != 0
    ours = expression_pca(log_expr, 10, fit_rows=fit_rows)
    reference = PCA(10, svd_solver="covariance_eigh").fit(log_expr[fit_rows]).transform(log_expr)
    assert ours.shape == (400, 10)
    assert np.allclose(np.abs(ours), np.abs(reference), atol=1e-4)  # up to each component's sign
    assert not np.allclose(np.abs(ours), np.abs(expression_pca(log_expr, 10)), atol=1e-3)  # not fit on all


def test_autoencoder_fit_on_train_rows_never_sees_the_other_cells():
    adata, _ = synthetic_evaluation_data(300, n_genes=30, n_types=3, seed=8)
    counts = _dense_counts(adata)
    fit_rows = np.arange(300) < 200
    kwargs = dict(epochs=3, hidden=16, latent=4, seed=0, fit_rows=fit_rows)
    fit = fit_count_autoencoder(counts, **kwargs)
    other = fit_count_autoencoder(_with_other_cells_changed(counts, fit_rows), **kwargs)
    assert fit.embedding.shape == (300, 4)                      # every cell is embedded
    assert np.array_equal(fit.embedding[fit_rows], other.embedding[fit_rows])  # training saw only these
    assert not np.allclose(fit.embedding[~fit_rows], other.embedding[~fit_rows])
    whole = fit_count_autoencoder(counts, epochs=3, hidden=16, latent=4, seed=0)
    assert not np.allclose(whole.embedding[fit_rows], fit.embedding[fit_rows])


@pytest.mark.skipif(not scvi_available()[0], reason="scvi-tools is not installed (optional extra spatia[scvi])")
def test_scvi_fit_on_train_rows_never_sees_the_other_cells():
    adata, _ = synthetic_evaluation_data(300, n_genes=30, n_types=3, seed=8)
    counts = _dense_counts(adata)
    fit_rows = np.arange(300) < 200
    fit = scvi_latent(counts, n_latent=4, epochs=3, seed=0, fit_rows=fit_rows)
    other = scvi_latent(_with_other_cells_changed(counts, fit_rows), n_latent=4, epochs=3, seed=0, fit_rows=fit_rows)
    assert fit.embedding.shape == (300, 4)
    assert np.allclose(fit.embedding[fit_rows], other.embedding[fit_rows], atol=1e-5)


def test_evaluation_fits_baselines_on_the_train_split_by_default():
    adata, _ = synthetic_evaluation_data(500, n_genes=40, n_types=3, seed=4)
    adata.obs["split"] = np.where(np.arange(500) < 300, "train", np.where(np.arange(500) < 350, "buffer", "test"))
    common = dict(labels="cell_type", split="split", baselines=("pca", "autoencoder"), autoencoder_epochs=3,
                  autoencoder_latent=8, **FAST)
    results = evaluate(adata, EvaluateConfig(**common))
    assert results["config"]["baseline_fit"] == "train"
    for key in ("pca", "autoencoder"):
        assert "fit on the 300 train cells" in results["embeddings"][key]["source"]
    everything = evaluate(adata, EvaluateConfig(**common, baseline_fit="all"))
    assert "fit on all 500 cells" in everything["embeddings"]["autoencoder"]["source"]
    with pytest.raises(ConfigError, match="baseline_fit"):
        EvaluateConfig(labels="cell_type", baseline_fit="test")
