"""Velocity network, guidance, sampling and the autoencoder on small synthetic tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatia.errors import ConfigError
from spatia.flow.autoencoder import CropAutoencoder, LatentStats, decode_all, encode_all, latent_stats, train_autoencoder
from spatia.flow.config import AutoencoderConfig, FlowModelConfig
from spatia.flow.model import VelocityNet
from spatia.flow.sample import integrate


def _net(z_dim: int | None = 6) -> VelocityNet:
    torch.manual_seed(0)
    return VelocityNet(FlowModelConfig(width=8, blocks=2, cond_dim=16), latent_channels=4, z_dim=z_dim,
                       n_transitions=3, n_coords=2)


def _inputs(b: int = 5):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=gen)
    t = torch.rand(b, generator=gen)
    z = torch.randn(b, 6, generator=gen)
    trans = torch.tensor([0, 1, 2, 1, 0])[:b]
    coords = torch.randn(3, 2, generator=gen)[trans]
    return x, t, z, trans, coords


def test_initial_velocity_is_exactly_zero_and_blocks_start_as_identity():
    net = _net()
    x, t, z, trans, coords = _inputs()
    assert torch.equal(net(x, t, z, trans, coords), torch.zeros_like(x))
    for block in net.blocks:
        assert torch.count_nonzero(block.film.weight) == 0 and torch.count_nonzero(block.film.bias) == 0


def _perturb(net: VelocityNet) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_guidance_one_equals_conditional_and_formula_holds():
    net = _perturb_net = _net()
    _perturb(net)
    x, t, z, trans, coords = _inputs()
    v_cond = net(x, t, z, trans, coords)
    assert torch.equal(net.guided(x, t, z, trans, coords, 1.0), v_cond)
    ones = torch.ones(len(x), dtype=torch.bool)
    v_null = net(x, t, z, trans, coords, drop_z=ones, drop_pert=ones)
    assert not torch.allclose(v_null, v_cond)
    assert torch.allclose(net.guided(x, t, z, trans, coords, 2.5), v_null + 2.5 * (v_cond - v_null), atol=1e-6)
    # a dropped condition does not depend on its input
    other_z = torch.randn_like(z)
    assert torch.equal(net(x, t, z, trans, coords, drop_z=ones), net(x, t, other_z, trans, coords, drop_z=ones))


def test_unconditional_net_ignores_the_embedding():
    net = _net(z_dim=None)
    _perturb(net)
    x, t, _, trans, coords = _inputs()
    assert net.z_proj is None
    assert net(x, t, None, trans, coords).shape == x.shape


def test_euler_is_exact_on_a_constant_field_and_midpoint_on_a_linear_one():
    x0 = torch.randn(3, 2, 4, 4)
    c = torch.randn(1, 2, 4, 4)
    for steps in (1, 3, 7):
        assert torch.allclose(integrate(lambda x, t: c.expand_as(x), x0, steps, "euler"), x0 + c, atol=1e-6)
    # dx/dt = t * c  ->  x(1) = x0 + c / 2, exact for midpoint at any step count
    field = lambda x, t: t.view(-1, 1, 1, 1) * c  # noqa: E731
    assert torch.allclose(integrate(field, x0, 3, "midpoint"), x0 + c / 2, atol=1e-6)
    assert not torch.allclose(integrate(field, x0, 3, "euler"), x0 + c / 2, atol=1e-3)
    # dx/dt = x -> e; midpoint (2nd order) beats Euler
    e = torch.exp(torch.tensor(1.0))
    ones = torch.ones(1, 1)
    err_euler = abs(integrate(lambda x, t: x, ones, 10, "euler") - e)
    err_mid = abs(integrate(lambda x, t: x, ones, 10, "midpoint") - e)
    assert err_mid < err_euler / 10
    with pytest.raises(ConfigError):
        integrate(field, x0, 0)


def test_autoencoder_shapes_stats_and_learning():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    images, masks = [], []
    for _ in range(64):
        r = rng.uniform(5, 10)
        m = (yy - 16) ** 2 + (xx - 16) ** 2 < r**2
        masks.append(m)
        images.append((m * rng.uniform(80, 250)).astype(np.uint8))
    images, masks = np.stack(images), np.stack(masks)
    config = AutoencoderConfig(latent_channels=4, downsamples=2, width=8, steps=150, batch_size=16, lr=3e-3)
    untrained = CropAutoencoder(config, 32).eval()
    model, history = train_autoencoder(images, masks, config, seed=0)
    assert model.latent_shape == (4, 8, 8)
    lat = encode_all(model, images, masks)
    assert lat.shape == (64, 4, 8, 8)
    stats = latent_stats(lat)
    z = stats.standardise(lat)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(stats.unstandardise(z), lat, atol=1e-5)
    recon, recon_masks = decode_all(model, lat)
    assert recon.dtype == np.uint8 and recon.shape == images.shape and recon_masks.dtype == bool
    assert not np.any(recon[~recon_masks])  # zero outside the decoded mask
    # training reduces the reconstruction error well below the untrained decoder's
    before, _ = decode_all(untrained, encode_all(untrained, images, masks))
    err = lambda a: np.mean((a.astype(float) - images) ** 2)  # noqa: E731
    assert err(recon) < 0.3 * err(before)
    assert history[-1]["image_mse"] < history[0]["image_mse"]
    assert isinstance(LatentStats(**stats.to_dict()), LatentStats)


def test_autoencoder_refuses_sizes_it_cannot_halve():
    with pytest.raises(ConfigError):
        CropAutoencoder(AutoencoderConfig(downsamples=3), 60)


def test_validation_split_is_per_transition_disjoint_and_seeded():
    import pandas as pd

    from spatia.flow.train import split_validation

    train = pd.DataFrame({"transition": np.repeat([0, 1, 2], [40, 10, 1]), "ctrl_row": np.arange(51)})
    assert split_validation(train, 0.0, 0)[1] is None
    fit, val = split_validation(train, 0.2, 0)
    assert val["transition"].value_counts().sort_index().tolist() == [8, 2]  # one pair: nothing to spare
    assert set(fit["ctrl_row"]).isdisjoint(val["ctrl_row"]) and len(fit) + len(val) == len(train)
    assert split_validation(train, 0.2, 0)[1]["ctrl_row"].tolist() == val["ctrl_row"].tolist()


def test_validation_loss_of_the_initial_net_is_the_mean_squared_target_velocity():
    """The initial field is exactly 0, so the validation FM loss is mean ||l1 - l0||^2, at any t."""
    import pandas as pd

    from spatia.flow.train import validation_loss

    net = _net(z_dim=6)
    gen = torch.Generator().manual_seed(2)
    lat = torch.randn(10, 4, 8, 8, generator=gen)
    z_all = torch.randn(10, 6, generator=gen)
    coords = torch.randn(3, 2, generator=gen)
    val = pd.DataFrame({"ctrl_row": [0, 1, 2, 3], "tgt_row": [5, 6, 7, 8], "transition": [0, 1, 2, 0]})
    expected = float((lat[[5, 6, 7, 8]] - lat[[0, 1, 2, 3]]).pow(2).mean())
    assert validation_loss(net, val, lat, z_all, coords, seed=0) == pytest.approx(expected, rel=1e-6)
    _perturb(net)
    assert validation_loss(net, val, lat, z_all, coords, seed=0) == validation_loss(net, val, lat, z_all, coords, seed=0)


def test_patched_net_keeps_the_latent_shape_and_starts_at_zero():
    torch.manual_seed(0)
    net = VelocityNet(FlowModelConfig(width=8, blocks=2, cond_dim=16, patch=2), latent_channels=4, z_dim=6,
                      n_transitions=3, n_coords=2)
    x, t, z, trans, coords = _inputs()
    assert torch.equal(net(x, t, z, trans, coords), torch.zeros_like(x))
    _perturb(net)
    v = net(x, t, z, trans, coords)
    assert v.shape == x.shape and torch.count_nonzero(v) > 0
