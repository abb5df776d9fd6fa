"""Closed-form checks of the flow's path, target, loss, negatives and pair noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatia.errors import ConfigError
from spatia.flow.data import signature_coordinates, swap_targets
from spatia.flow.paths import bridge, check_contrastive_weight, contrastive_fm_loss, draw_negatives, target_velocity


def test_bridge_and_target_on_a_hand_example():
    l0 = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    l1 = torch.tensor([[4.0, 2.0], [3.0, 1.0]])
    t = torch.tensor([0.25, 1.0])
    assert torch.equal(bridge(l0, l1, t), torch.tensor([[1.0, 2.0], [3.0, 1.0]]))
    assert torch.equal(target_velocity(l0, l1), torch.tensor([[4.0, 0.0], [2.0, 2.0]]))
    # t = 0 is the control, and u is the time derivative of the bridge
    assert torch.equal(bridge(l0, l1, torch.zeros(2)), l0)
    h = 1e-3
    numeric = (bridge(l0, l1, t + h) - bridge(l0, l1, t)) / h
    assert torch.allclose(numeric, target_velocity(l0, l1), atol=1e-3)


def test_weighted_fm_loss_by_hand():
    v = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    u = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    w = torch.tensor([3.0, 1.0])
    # per-pair mean squared errors 0.5 and 2.0, weights 3/4 and 1/4
    loss, parts = contrastive_fm_loss(v, u, w)
    assert loss.item() == pytest.approx(0.75 * 0.5 + 0.25 * 2.0)
    assert parts["contrastive"] == 0.0


def test_contrastive_term_is_subtracted_and_masked():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    u_neg = torch.tensor([[0.0, 2.0], [4.0, 1.0]])
    w = torch.ones(2)
    lam = 0.5
    loss, parts = contrastive_fm_loss(v, u, w, u_neg=u_neg, has_neg=torch.tensor([True, False]), contrastive_weight=lam)
    fm = torch.tensor([0.0, 0.5])
    neg = torch.tensor([(1.0 + 4.0) / 2, 0.0])  # pair 2 has no negative
    assert loss.item() == pytest.approx(((fm - lam * neg) / 2).sum().item())
    assert parts["fm"] == pytest.approx(0.25)
    assert parts["contrastive"] == pytest.approx(1.25)


def test_contrastive_minimiser_is_closed_form():
    # argmin_v ||v - u||^2 - lam ||v - u'||^2 = (u - lam u') / (1 - lam)
    u, u_neg, lam = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]]), 0.3
    v = torch.zeros(1, 2, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        loss, _ = contrastive_fm_loss(v, u, torch.ones(1), u_neg=u_neg, has_neg=torch.tensor([True]), contrastive_weight=lam)
        loss.backward()
        opt.step()
    assert torch.allclose(v.detach(), (u - lam * u_neg) / (1 - lam), atol=1e-4)


@pytest.mark.parametrize("lam", [1.0, 1.5, -0.1])
def test_lambda_outside_unit_interval_is_refused(lam):
    with pytest.raises(ConfigError, match="outside"):
        check_contrastive_weight(lam)
    with pytest.raises(ConfigError):
        contrastive_fm_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), contrastive_weight=lam)


def test_negatives_differ_in_transition_or_niche():
    gen = torch.Generator().manual_seed(0)
    transition = torch.tensor([0, 0, 1, 1, 0])
    niche = torch.tensor([0, 0, 0, 1, 1])
    for _ in range(20):
        j, has = draw_negatives(transition, niche, gen)
        assert has.all()
        assert ((transition[j] != transition) | (niche[j] != niche)).all()
    j, has = draw_negatives(torch.tensor([2, 2]), torch.tensor([1, 1]), gen)
    assert not has.any() and torch.equal(j, torch.arange(2))


def test_pair_noise_swaps_within_groups_only():
    tgt = np.arange(100, 140)
    groups = np.repeat(["a", "b"], 20)
    new, swapped = swap_targets(tgt, groups, 0.5, seed=3)
    assert swapped.sum() >= 16  # 20 chosen; a group with one chosen pair cannot swap
    assert (new[~swapped] == tgt[~swapped]).all()
    # targets stay within their group, and form a permutation of the chosen ones
    assert set(new[:20]) <= set(tgt[:20]) and set(new[20:]) <= set(tgt[20:])
    assert sorted(new) == sorted(tgt)
    same, none = swap_targets(tgt, groups, 0.0, seed=3)
    assert (same == tgt).all() and not none.any()


def test_signature_coordinates_keep_the_geometry():
    delta = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    coords = signature_coordinates(delta, 8)
    assert coords.shape == (3, 3)
    d = np.linalg.norm(delta[:, None] - delta[None], axis=-1)
    c = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    assert np.allclose(c / c.max(), d / d.max(), atol=1e-6)  # an orthogonal projection, rescaled
    assert signature_coordinates(delta[:1], 8).shape == (1, 1)


def test_variant_configs_and_names_round_trip():
    from dataclasses import asdict

    from spatia.flow.config import FlowAblateConfig, FlowTrainConfig, variant_train_config
    from spatia.flow.evaluate import variant_name

    for variant in FlowAblateConfig().variants:
        config = variant_train_config(FlowTrainConfig(), variant)
        assert variant_name(asdict(config)) == variant
    assert variant_train_config(FlowTrainConfig(), "cell_only").condition == "cell"
    assert variant_train_config(FlowTrainConfig(), "spatia").condition == "levels"
    assert variant_train_config(FlowTrainConfig(), "spatia_unified").condition == "unified"
    assert variant_train_config(FlowTrainConfig(), "no_contrastive").condition == "levels"
    assert FlowTrainConfig().condition == "levels"
    assert variant_train_config(FlowTrainConfig(), "pair_noise_0.2").pair_noise == 0.2
    with pytest.raises(ConfigError):
        variant_train_config(FlowTrainConfig(), "bogus")


def test_levels_condition_uses_the_spatial_levels_the_embeddings_have(caplog):
    from spatia.flow.train import condition_keys

    full = dict.fromkeys(("X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"))
    assert condition_keys("levels", full) == ("X_spatia", "X_spatia_niche", "X_spatia_tissue")
    assert condition_keys("cell", full) == ("X_spatia_cell",)
    assert condition_keys("none", full) == ()
    no_tissue = {k: v for k, v in full.items() if k != "X_spatia_tissue"}
    with caplog.at_level("WARNING", logger="spatia.flow.train"):
        assert condition_keys("levels", no_tissue) == ("X_spatia", "X_spatia_niche")
    assert "X_spatia_tissue" in caplog.text
    # a required key stays in even when absent, so flow_train refuses it with the file's name
    assert condition_keys("unified", {}) == ("X_spatia",)
    assert condition_keys("levels", {}) == ("X_spatia",)
