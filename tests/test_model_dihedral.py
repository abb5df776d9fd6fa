"""The eight orientations of the cell crop: the group, the measures' invariance, training draws
that turn image and mask together, and embeddings that do not depend on how a cell lies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spatia.errors import ConfigError
from spatia.model import BatchSizes, SpatiaModel, load_config, synthetic_batch, synthetic_gene_symbols
from spatia.model.config import ORIENTATIONS, config_from_dict
from spatia.model.dihedral import orient, orient_each, oriented, random_orientations
from spatia.model.morphometry import morphometry_measures

N_GENES = 60


def square(side: int = 6) -> torch.Tensor:
    """An image whose 36 pixels are all different, so every orientation is told apart."""
    return torch.arange(side * side, dtype=torch.float32).reshape(1, 1, side, side)


def test_the_eight_codes_are_the_eight_orientations():
    x = square()
    views = [orient(x, code) for code in range(ORIENTATIONS)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == ORIENTATIONS
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], x.transpose(-2, -1))                      # the mirror image
    assert torch.equal(views[2], torch.rot90(x, 1, dims=(-2, -1)))         # a quarter turn
    # closed under composition: turning an oriented crop gives another of the eight
    for a in range(ORIENTATIONS):
        for b in range(ORIENTATIONS):
            twice = orient(views[a], b)
            assert any(torch.equal(twice, v) for v in views)


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="0..7"):
        orient(square(), 8)
    with pytest.raises(ValueError, match="one code per image"):
        orient_each(square().repeat(3, 1, 1, 1), torch.tensor([0, 1]))


def test_orient_each_turns_each_image_by_its_own_code():
    x = torch.rand(5, 2, 8, 8)
    codes = torch.tensor([0, 3, 7, 3, 5])
    out = orient_each(x, codes)
    for i, code in enumerate(codes.tolist()):
        assert torch.equal(out[i], orient(x[i], code))
    assert torch.equal(x, orient_each(x, torch.zeros(5, dtype=torch.long)))


def test_morphometry_measures_are_the_same_in_every_orientation():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(4, 1, 32, 32, generator=g)
    mask = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
    mask[:, :, 8:20, 10:26] = True          # an asymmetric cell: a bar with a bump
    mask[:, :, 5:8, 12:15] = True
    reference = morphometry_measures(image, mask)
    for code in range(1, ORIENTATIONS):
        turned = morphometry_measures(orient(image, code), orient(mask, code))
        torch.testing.assert_close(turned, reference, atol=1e-5, rtol=1e-5)


def test_random_orientations_turn_image_and_mask_together():
    config = load_config("tiny")
    batch = synthetic_batch(config, BatchSizes(n_tissues=2, cells_per_tissue=16, n_genes=N_GENES), seed=1)
    batch["cell_image"] = batch["cell_mask"].float() * torch.rand_like(batch["cell_image"])  # pixels only in the mask
    out = random_orientations(batch, torch.Generator().manual_seed(5))
    assert out["cell_image"].shape == batch["cell_image"].shape
    # every pixel outside the turned mask is still dark: the mask turned with its image
    assert (out["cell_image"][~out["cell_mask"]] == 0).all()
    # each crop is one orientation of itself, and the draws are not all the identity
    codes = []
    for i in range(len(batch["cell_id"])):
        matches = [c for c in range(ORIENTATIONS)
                   if torch.equal(out["cell_image"][i], orient(batch["cell_image"][i], c))]
        assert matches
        codes.append(matches[0])
    assert len(set(codes)) > 1
    # other entries are shared, and the same generator seed draws the same turns
    assert out["niche_image"] is batch["niche_image"] and out["cell_counts"] is batch["cell_counts"]
    again = random_orientations(batch, torch.Generator().manual_seed(5))
    assert torch.equal(again["cell_image"], out["cell_image"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SpatiaModel(load_config("tiny"), synthetic_gene_symbols(N_GENES))


@pytest.fixture()
def batch():
    return synthetic_batch(load_config("tiny"), BatchSizes(n_tissues=2, cells_per_tissue=16, n_genes=N_GENES), seed=3)


@pytest.mark.parametrize("modality", ["both", "image"])
def test_embeddings_do_not_depend_on_how_the_cell_lies(model, batch, modality):
    assert model.config.image.embed_orientations == ORIENTATIONS  # the default
    reference = model.embed(batch, modality=modality)
    for code in (1, 2, 5):
        turned = model.embed(oriented(batch, code), modality=modality)
        for name in ("z", "z_cell", "z_niche", "z_tissue", "niche_embeddings"):
            torch.testing.assert_close(getattr(turned, name), getattr(reference, name), atol=1e-4, rtol=1e-4)


def test_the_embedding_is_the_mean_over_the_eight_orientations(model, batch):
    single = SpatiaModel(dataclasses.replace(model.config, image=dataclasses.replace(model.config.image,
                                                                                    embed_orientations=1)),
                         list(model.gene_symbols))
    single.load_state_dict(model.state_dict())
    views = [single.embed(oriented(batch, code)) for code in range(ORIENTATIONS)]
    mean = model.embed(batch)
    for name in ("z", "z_cell", "z_tissue", "tissue_embeddings"):
        expected = torch.stack([getattr(v, name) for v in views]).mean(dim=0)
        torch.testing.assert_close(getattr(mean, name), expected, atol=1e-5, rtol=1e-5)
    # one orientation: the crop as is, which in general differs from the mean
    assert not torch.allclose(views[0].z_cell, mean.z_cell, atol=1e-4)
    assert mean.losses == {}


def test_embed_orientations_must_be_one_or_eight():
    with pytest.raises(ConfigError, match="embed_orientations"):
        config_from_dict({"image": {"embed_orientations": 4}})
    assert config_from_dict({"image": {"embed_orientations": 1}}).image.embed_orientations == 1
    for name in ("tiny", "base"):  # the defaults users get (plumbing tests embed with one: helpers.plumbing_config)
        assert load_config(name).train.cell_orientations is True
        assert load_config(name).image.embed_orientations == 8


def test_reuse_is_refused_for_masked_passes(model, batch):
    with pytest.raises(ValueError, match="without masking"):
        model(batch, reuse={}, compute_losses=False)
