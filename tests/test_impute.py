"""`GeneDecoderImputer`: held-out genes never reach the model, predictions match a by-hand
forward pass through the gene decoder, do not depend on the batching, and bad input is refused.

Whether a *trained* decoder imputes better than an untrained one is tested with the learning
test (tests/test_train_learning.py), which trains long enough for it to matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from spatia.errors import ConfigError, DatasetError, InputDataError
from spatia.evaluate.tasks import hold_out_mask
from spatia.mist import MultiScaleDataset, collate_multiscale
from spatia.model import normalize_counts
from spatia.train import embed_dataset, load_model
from spatia.train.impute import GeneDecoderImputer


@pytest.fixture(scope="module")
def cells(simulated_mist, simulated_checkpoint):
    """The embedded AnnData (raw counts in X, obs_names as `spatia embed` writes them)."""
    return embed_dataset(simulated_mist, simulated_checkpoint, threads=1, progress_bar=False).adata


@pytest.fixture(scope="module")
def query(cells):
    """40 test cells spread over the section, their raw counts and a 10 % held-out mask."""
    test_rows = np.flatnonzero(cells.obs["split"].to_numpy() == "test")
    rows = np.sort(np.random.default_rng(0).choice(test_rows, size=40, replace=False))
    counts = sp.csr_matrix(cells.X[rows], dtype=np.float32).toarray()
    mask = hold_out_mask(*counts.shape, 0.1, seed=0)
    return rows, counts, mask


def _imputer(simulated_mist, simulated_checkpoint, cells, **kwargs):
    return GeneDecoderImputer.from_checkpoint(simulated_checkpoint, simulated_mist, cells.var_names, **kwargs)


def test_held_out_counts_never_reach_the_model(simulated_mist, simulated_checkpoint, cells, query):
    rows, counts, mask = query
    imputer = _imputer(simulated_mist, simulated_checkpoint, cells)
    names = cells.obs_names.to_numpy()[rows]
    hidden = sp.csr_matrix(np.where(mask, 0.0, counts).astype(np.float32))
    leaked = sp.csr_matrix(np.where(mask, counts + 50.0, counts).astype(np.float32))  # true (and inflated) values
    pred_hidden = imputer(hidden, mask, names)
    pred_leaked = imputer(leaked, mask, names)
    np.testing.assert_allclose(pred_hidden[mask], pred_leaked[mask], rtol=1e-5, atol=1e-6)
    assert np.isfinite(pred_hidden).all() and (pred_hidden[mask] >= 0).all()
    # entries that were not held out come back as given
    np.testing.assert_array_equal(pred_hidden[~mask], counts[~mask])
    # the prediction is not the zero the input held: the decoder filled it in
    assert (pred_hidden[mask] > 0).mean() > 0.9


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_matches_a_forward_pass_by_hand(simulated_mist, simulated_checkpoint, cells, query, weight):
    """One tissue region: hide the genes, embed the region, decode z: the share of the library
    (softmax over the panel), drawn toward the train cells' pooled shares as share ** w * prior **
    (1 - w) and renormalised over the panel, times the library estimated from the visible counts."""
    model, info = load_model(simulated_checkpoint)
    ds = MultiScaleDataset(simulated_mist, split=None)
    region = ds.tissue_cell_rows[0]
    names = ds.cell_index["cell_id"].astype(str).to_numpy()[region]  # the AnnData is in the bundle's order
    counts = cells[names].X.toarray().astype(np.float32)
    mask = hold_out_mask(*counts.shape, 0.2, seed=3)
    visible = np.where(mask, 0.0, counts).astype(np.float32)
    imputer = GeneDecoderImputer(model, simulated_mist, cells.var_names, levels=info.levels, decoder_weight=weight)
    pred = imputer(sp.csr_matrix(visible), mask, names)
    # the prior by hand: pooled counts + 1 over pooled libraries + G, from the train cells' raw counts
    train = cells[cells.obs["split"].to_numpy() == "train"].X.toarray().astype(np.float64)
    prior = (train.sum(axis=0) + 1.0) / (train.sum() + train.shape[1])

    batch = collate_multiscale([ds[k] for k in ds.keys_for([0], region.tolist())])
    panel = batch["cell_gene_measured"].clone()
    batch["cell_counts"] = torch.from_numpy(visible)  # var order is the vocabulary order here
    batch["cell_gene_measured"] = batch["cell_gene_measured"] & ~torch.from_numpy(mask)
    z = model.embed(batch, levels=info.levels).z
    for j in (0, len(region) // 2, len(region) - 1):
        genes = np.flatnonzero(mask[j])
        with torch.no_grad():
            logits = model.gene_decoder(z[j : j + 1], "cell")[0].double()
        logits[~panel[j]] = -np.inf
        share = torch.softmax(logits, 0).numpy()                  # the NB mean's share of the library
        tempered = np.where(panel[j].numpy(), share ** weight * prior ** (1.0 - weight), 0.0)
        share = (tempered / tempered.sum())[genes]
        visible_total = visible[j][batch["cell_gene_measured"][j].numpy()].sum()
        total = visible_total / (1.0 - min(share.sum(), 0.9))
        np.testing.assert_allclose(pred[j, genes], share * total, rtol=1e-4, atol=1e-6)
    if weight < 1.0:  # the prior is the one computed above (vocabulary order = var order here)
        np.testing.assert_allclose(imputer.prior, prior, rtol=1e-6)
    # the model's input normalisation ignores the hidden genes: totals over visible genes only
    values = normalize_counts(batch["cell_counts"], batch["cell_gene_measured"], model.config.gene.library_target())
    assert torch.all(values[torch.from_numpy(mask)] == 0)


def test_independent_of_batch_size_and_cell_order(simulated_mist, simulated_checkpoint, cells, query):
    rows, counts, mask = query
    names = cells.obs_names.to_numpy()[rows]
    hidden = sp.csr_matrix(np.where(mask, 0.0, counts).astype(np.float32))
    big = _imputer(simulated_mist, simulated_checkpoint, cells, batch_cells=4096)(hidden, mask, names)
    small = _imputer(simulated_mist, simulated_checkpoint, cells, batch_cells=1)(hidden, mask, names)
    np.testing.assert_allclose(big[mask], small[mask], rtol=1e-4, atol=1e-5)
    order = np.arange(len(rows))[::-1]
    reversed_pred = _imputer(simulated_mist, simulated_checkpoint, cells)(hidden[order], mask[order], names[order])
    np.testing.assert_allclose(reversed_pred[order][mask], big[mask], rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused(simulated_mist, simulated_checkpoint, cells, query):
    rows, counts, mask = query
    imputer = _imputer(simulated_mist, simulated_checkpoint, cells)
    hidden = sp.csr_matrix(np.where(mask, 0.0, counts).astype(np.float32))
    with pytest.raises(InputDataError, match="not in the MIST dataset"):
        imputer(hidden, mask, np.array(["no-such-cell"] * len(rows)))
    twice = np.r_[rows[:1], rows[:1]]
    with pytest.raises(InputDataError, match="more than once"):
        imputer(hidden[:2], mask[:2], cells.obs_names.to_numpy()[twice])
    with pytest.raises(InputDataError, match="must both be"):
        imputer(hidden[:, :-1], mask[:, :-1], cells.obs_names.to_numpy()[rows])
    with pytest.raises(InputDataError, match="not in the model's vocabulary"):
        GeneDecoderImputer.from_checkpoint(simulated_checkpoint, simulated_mist, ["NOT_A_GENE", *cells.var_names[:3]])
    for weight in (0.0, 1.5):
        with pytest.raises(ConfigError, match="decoder_weight must lie in"):
            GeneDecoderImputer.from_checkpoint(simulated_checkpoint, simulated_mist, cells.var_names,
                                               decoder_weight=weight)


def test_the_prior_needs_train_cells(simulated_mist, monkeypatch):
    from spatia.mist.datasets import CellDataset
    from spatia.train.impute import train_gene_shares

    monkeypatch.setattr(CellDataset, "__len__", lambda self: 0)
    with pytest.raises(DatasetError, match="no train cells"):
        train_gene_shares(simulated_mist, 10)


def test_the_evaluation_uses_the_imputer_default_and_refuses_a_bad_weight():
    from spatia.evaluate import EvaluateConfig
    from spatia.train.impute import DECODER_SHARE_WEIGHT

    assert EvaluateConfig().impute_decoder_weight == DECODER_SHARE_WEIGHT
    with pytest.raises(ConfigError, match="impute_decoder_weight"):
        EvaluateConfig(impute_decoder_weight=0.0).validate()


def test_tempered_shares_known_answers():
    """share ** w * prior ** (1 - w), renormalised over each cell's panel: w = 1 is the share; a
    uniform share leaves the prior's proportions; equal share and prior are unchanged; a cell with
    no panel gets zeros, not NaN."""
    from spatia.train.impute import temper_shares

    share = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    panel = np.array([[True, True, True, False], [True] * 4, [True] * 4, [False] * 4])
    np.testing.assert_array_equal(temper_shares(share, prior, panel, 1.0), np.where(panel, share, 0.0))
    out = temper_shares(share, prior, panel, 0.5)
    np.testing.assert_allclose(out[:3].sum(axis=1), 1.0)
    np.testing.assert_array_equal(out[3], 0.0)
    assert out[0, 3] == 0.0                                   # off the panel
    np.testing.assert_allclose(out[1], prior ** 0.5 / (prior ** 0.5).sum())   # uniform share: the prior's shape
    np.testing.assert_allclose(out[2], prior)                 # share = prior: unchanged
    first = np.sqrt(share[0, :3] * prior[:3])
    np.testing.assert_allclose(out[0, :3], first / first.sum())
