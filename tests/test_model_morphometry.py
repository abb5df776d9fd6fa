"""Morphometry measures (known answers on drawn shapes), the auxiliary loss, the morphometry input
of z_cell and the gene residual."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from spatia.model import BatchSizes, SpatiaModel, load_config, synthetic_batch, synthetic_gene_symbols
from spatia.model.morphometry import (
    INTENSITY_NAMES,
    SHAPE_NAMES,
    MorphometryInput,
    morphometry_measures,
    n_morphometry_features,
    standardise_over_batch,
)


def _column(name: str) -> int:
    names = list(SHAPE_NAMES) + list(INTENSITY_NAMES)
    return names.index(name)


def test_rectangle_shape_measures_match_closed_forms():
    s = 64
    mask = torch.zeros(1, 1, s, s, dtype=torch.bool)
    mask[..., 16:48, 20:44] = True                     # 32 rows x 24 columns
    image = mask.float() * 0.5
    t = morphometry_measures(image, mask)[0]
    assert t.shape == (n_morphometry_features(1),)
    assert t[_column("area_fraction")] == pytest.approx(32 * 24 / s**2)
    # uniform rectangle of side L: variance L^2/12, axis = 4 sqrt(var) = L / sqrt(3) * 2
    assert t[_column("major_axis")] == pytest.approx(4 * math.sqrt((32 / s) ** 2 / 12), rel=1e-3)
    assert t[_column("minor_axis")] == pytest.approx(4 * math.sqrt((24 / s) ** 2 / 12), rel=1e-3)
    assert t[_column("boundary_fraction")] == pytest.approx((2 * (32 + 24) - 4) / (32 * 24))
    assert t[_column("mean")] == pytest.approx(0.5) and t[_column("std")] == pytest.approx(0.0, abs=1e-6)
    assert t[_column("q50")] == pytest.approx(0.5)
    assert t[_column("integrated")] == pytest.approx(0.5 * 32 * 24 / s**2)
    assert t[_column("dark_fraction")] == pytest.approx(0.0)
    assert t[_column("edge_mean")] == pytest.approx(0.5)


def test_edge_mean_reads_the_boundary_ring():
    """A nucleus with a bright rim (peripheral chromatin) and one with a bright centre: same
    mean intensity order reversed on the boundary."""
    s = 64
    mask = torch.zeros(1, 1, s, s, dtype=torch.bool)
    mask[..., 16:48, 16:48] = True
    ring = mask & ~torch.nn.functional.pad(mask[..., 1:-1, 1:-1] & mask[..., :-2, 1:-1] & mask[..., 2:, 1:-1]
                                           & mask[..., 1:-1, :-2] & mask[..., 1:-1, 2:], (1, 1, 1, 1))
    rim = torch.where(ring, 0.9, 0.2) * mask
    centre = torch.where(ring, 0.2, 0.9) * mask
    t = morphometry_measures(torch.cat([rim, centre]), torch.cat([mask, mask]))
    assert ring.sum() == 4 * 32 - 4
    assert t[0, _column("edge_mean")] == pytest.approx(0.9, abs=1e-6)
    assert t[1, _column("edge_mean")] == pytest.approx(0.2, abs=1e-6)


def test_measures_rank_size_brightness_and_texture():
    s = 64
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    small = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 8**2)[None, None]
    large = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 20**2)[None, None]
    smooth = torch.full((1, 1, s, s), 0.4)
    textured = 0.4 + 0.3 * torch.sign(torch.sin(xx.float()))[None, None]
    masks = torch.cat([small, large, large, large])
    images = torch.cat([smooth, smooth, smooth * 2, textured]) * masks
    t = morphometry_measures(images, masks)
    assert t[1, _column("area_fraction")] > t[0, _column("area_fraction")]           # larger disc
    assert t[1, _column("elongation")] == pytest.approx(1.0, abs=0.02)               # a disc is round
    assert t[2, _column("mean")] == pytest.approx(2 * t[1, _column("mean")])         # brighter
    assert t[3, _column("gradient_mean")] > 5 * t[1, _column("gradient_mean")]       # texture
    assert t[3, _column("std")] > 0.2 and t[1, _column("std")] < 1e-5


def test_extent_quantiles_and_mass_displacement_match_references():
    """Extent against the bounding box counted with numpy, the intensity order statistics against
    numpy's quantiles of the pixels inside the mask, and the mass displacement of a nucleus
    whose chromatin sits in its left half (a known shift of a quarter of the square's side)."""
    s = 64
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disc = ((yy - 30) ** 2 + (xx - 33) ** 2 <= 12**2)[None, None]
    square = torch.zeros(1, 1, s, s, dtype=torch.bool)
    square[..., 16:48, 16:48] = True
    ramp = (xx.float() + 0.5 * yy.float()) / 100
    images = torch.cat([ramp[None, None] * disc, (xx < 32).float()[None, None] * square,
                        torch.full((1, 1, s, s), 0.6) * square])
    masks = torch.cat([disc, square, square])
    t = morphometry_measures(images, masks)
    d = disc[0, 0].numpy()
    rows, cols = np.flatnonzero(d.any(axis=1)), np.flatnonzero(d.any(axis=0))
    bbox = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    assert t[0, _column("extent")] == pytest.approx(d.sum() / bbox)
    assert t[1, _column("extent")] == pytest.approx(1.0)
    inside = images[0, 0].numpy()[d]
    for name, q in (("min", 0.0), ("q25", 0.25), ("q50", 0.5), ("q75", 0.75), ("max", 1.0)):
        assert t[0, _column(name)] == pytest.approx(np.quantile(inside, q), abs=1e-5), name
    assert t[2, _column("mass_displacement")] == pytest.approx(0.0, abs=1e-6)       # uniform
    assert t[1, _column("mass_displacement")] == pytest.approx(8 / s, abs=1e-5)     # left half: 8 px off
    assert t[1, _column("min")] == 0.0 and t[1, _column("max")] == 1.0


def test_empty_mask_uses_the_whole_crop_and_gives_finite_values():
    image = torch.rand(2, 2, 32, 32)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    t = morphometry_measures(image, mask)
    assert t.shape == (2, n_morphometry_features(2)) and torch.isfinite(t).all()
    assert t[0, _column("area_fraction")] == pytest.approx(1.0)


def test_standardise_over_batch():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    z = standardise_over_batch(x)
    assert torch.allclose(z[:, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)
    assert torch.equal(z[:, 1], torch.zeros(2))                                    # constant -> 0


def _model(morphometry: float = 0.0, gene_residual: bool = False, morphometry_residual: bool = False,
           morphometry_weight: float | None = None):
    config = load_config("tiny")
    config = dataclasses.replace(
        config, fusion=dataclasses.replace(config.fusion, gene_residual=gene_residual,
                                           morphometry_residual=morphometry_residual,
                                           morphometry_weight=morphometry_weight,
                                           image_query_weight=1.0),  # the measures' weight alone varies
        loss=dataclasses.replace(config.loss, cell=dataclasses.replace(config.loss.cell, morphometry=morphometry)))
    torch.manual_seed(0)
    batch = synthetic_batch(config, BatchSizes(n_tissues=2, cells_per_tissue=16, n_genes=40), seed=0)
    return SpatiaModel(config, synthetic_gene_symbols(40)), batch


def test_morphometry_loss_is_logged_trained_and_off_by_weight():
    model, batch = _model(morphometry=1.0)
    out = model(batch, levels=("cell",), generator=torch.Generator().manual_seed(0))
    assert "cell/morphometry" in out.losses and out.losses["cell/morphometry"] > 0
    out.losses["total"].backward()
    assert model.morphometry_head.weight.grad.abs().sum() > 0
    assert model.cell_image_encoder.patch_embed.weight.grad is not None
    plain, batch = _model()
    assert plain.morphometry_head is None
    assert "cell/morphometry" not in plain(batch, levels=("cell",)).losses


def test_gene_residual_carries_genes_and_stays_out_of_image_only_embeddings():
    model, batch = _model(gene_residual=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.cell_fusion.gene_summary.weight)
    shuffled = dict(batch, cell_counts=batch["cell_counts"].flip(0))
    both = model.embed(batch, levels=("cell",)).z_cell
    both_shuffled = model.embed(shuffled, levels=("cell",)).z_cell
    assert not torch.allclose(both, both_shuffled)                               # genes reach z_cell
    image = model.embed(batch, modality="image", levels=("cell",)).z_cell
    image_shuffled = model.embed(shuffled, modality="image", levels=("cell",)).z_cell
    assert torch.allclose(image, image_shuffled)                                 # and not without them


def test_morphometry_input_standardises_with_the_set_statistics():
    torch.manual_seed(0)
    layer = MorphometryInput(3, 4)
    x = torch.tensor([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0]])
    assert torch.allclose(layer(x), layer.proj(x))                         # 0 / 1 until set
    layer.set_statistics([2.0, 20.0, 5.0], [1.0, 10.0, 0.0])             # a constant measure: std 1
    expected = layer.proj(torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]))
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer(x[:1]), expected[:1], atol=1e-6)         # no batch statistics
    state = layer.state_dict()
    assert torch.equal(state["mean"], torch.tensor([2.0, 20.0, 5.0]))  # saved with the weights
    with pytest.raises(ValueError, match="3 values"):
        layer.set_statistics([0.0, 0.0], [1.0, 1.0])


def test_morphometry_residual_carries_the_nucleus_into_image_embeddings_and_not_gene_only_ones():
    model, batch = _model(morphometry_residual=True)
    assert model.cell_fusion.morphometry is not None
    assert _model()[0].cell_fusion.morphometry is None
    # the same pixels under another cell mask: only the measures see the mask
    other = dict(batch, cell_mask=batch["cell_mask"].roll(1, dims=0))
    for modality in ("image", "both"):
        a = model.embed(batch, modality=modality, levels=("cell",)).z_cell
        b = model.embed(other, modality=modality, levels=("cell",)).z_cell
        measures = morphometry_measures(batch["cell_image"], batch["cell_mask"])
        moved = morphometry_measures(other["cell_image"], other["cell_mask"])
        through = model.cell_fusion.morphometry(moved) - model.cell_fusion.morphometry(measures)
        assert through.abs().max() > 1e-3 and torch.allclose(b - a, through, atol=1e-5)
    gene_only = model.embed(batch, modality="gene", levels=("cell",)).z_cell
    assert torch.allclose(gene_only, model.embed(other, modality="gene", levels=("cell",)).z_cell)
    plain, _ = _model()
    assert torch.allclose(plain.embed(batch, modality="image", levels=("cell",)).z_cell,
                          plain.embed(other, modality="image", levels=("cell",)).z_cell)


def test_morphometry_weight_scales_the_measures_term_of_z_cell():
    full, batch = _model(morphometry_residual=True)                     # null weight: full (1)
    assert full.cell_fusion.morphometry.weight == 1.0
    measures = morphometry_measures(batch["cell_image"], batch["cell_mask"])
    term = full.cell_fusion.morphometry(measures)
    for weight in (0.25, 0.0):
        model, _ = _model(morphometry_residual=True, morphometry_weight=weight)  # same seed: same weights
        assert torch.allclose(model.cell_fusion.morphometry(measures), weight * term, atol=1e-6)
        z_full = full.embed(batch, modality="both", levels=("cell",)).z_cell
        z = model.embed(batch, modality="both", levels=("cell",)).z_cell
        assert torch.allclose(z_full - z, (1 - weight) * term, atol=1e-5)  # only the term changes
    off, _ = _model(morphometry_residual=True, morphometry_weight=0.0)
    other = dict(batch, cell_mask=batch["cell_mask"].roll(1, dims=0))   # weight 0: the mask has no say
    assert torch.allclose(off.embed(batch, modality="image", levels=("cell",)).z_cell,
                          off.embed(other, modality="image", levels=("cell",)).z_cell)
