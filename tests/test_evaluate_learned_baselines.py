"""Learned baselines: the count autoencoder (NB likelihood) and scVI's latent (optional extra)."""

import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

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
