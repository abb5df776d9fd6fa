"""SpatiaModel forward pass at tiny size: shapes, MAE masking, gene panel, the negative-binomial
whole-panel gene loss, modalities, levels, the final fusion's residual and context bound."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spatia.errors import ConfigError, DatasetError
from spatia.model import BatchSizes, SpatiaModel, load_config, synthetic_batch, synthetic_gene_symbols
from spatia.model.config import FusionConfig
from spatia.model.decoders import gene_loss, image_loss, nb_log_prob
from spatia.model.fusion import CellFusion, FinalFusion
from spatia.model.gene import normalize_counts, select_genes, split_masked
from spatia.model.image import random_patch_mask
from spatia.model.morphometry import morphometry_measures

N_GENES = 120



@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return SpatiaModel(config, synthetic_gene_symbols(N_GENES))


@pytest.fixture()
def batch(config):
    return synthetic_batch(config, BatchSizes(n_tissues=2, cells_per_tissue=32, n_genes=N_GENES), seed=3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_shapes(model, batch, config):
    b, bn, bt = len(batch["cell_id"]), len(batch["niche_id"]), len(batch["tissue_id"])
    d = config.fusion.dim
    out = model(batch, generator=gen())
    for name in ("z", "z_cell", "z_niche", "z_tissue"):
        assert getattr(out, name).shape == (b, d), name
        assert torch.isfinite(getattr(out, name)).all()
    assert out.niche_embeddings.shape == (bn, d)
    assert out.niche_tissue_embeddings.shape == (bn, d)
    assert out.tissue_embeddings.shape == (bt, d)
    expected = {f"{lv}/{kind}" for lv in ("cell", "niche", "tissue") for kind in ("image", "gene")} | {"total"}
    expected |= {"cell/morphometry"} if config.loss.cell.morphometry > 0 else set()
    assert set(out.losses) == expected
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    for level, n, side in (("cell", b, 64), ("niche", bn, 64), ("tissue", bt, 128)):
        rec = out.reconstructions[level]
        assert rec.image.shape == (n, 1, side, side)
        assert rec.patch_masked.shape == (n, (side // 16) ** 2)
        assert rec.gene_mean.shape == rec.gene_counts.shape == rec.gene_measured.shape == (n, N_GENES)
        assert rec.gene_dispersion.shape == (N_GENES,) and (rec.gene_dispersion > 0).all()
        # the NB means over the measured panel sum to the library size
        library = rec.gene_counts.sum(1)
        assert torch.allclose(rec.gene_mean.sum(1), library, rtol=1e-4)
    # total is the weighted sum of the parts
    weights = {f"{lv}/{kind}": getattr(getattr(config.loss, lv), kind) for lv in ("cell", "niche", "tissue")
               for kind in ("image", "gene", "morphometry")}
    parts = sum(weights[k] * v for k, v in out.losses.items() if k != "total")
    assert torch.allclose(out.losses["total"], parts)


def test_mask_ratio_respected(model, batch):
    out = model(batch, generator=gen())
    for level in ("cell", "niche", "tissue"):
        masked = out.reconstructions[level].patch_masked
        per_image = masked.sum(dim=1)
        n_patches = masked.shape[1]
        assert (per_image == n_patches - int(n_patches * 0.25)).all()
    keep, masked = random_patch_mask(5, 64, 0.75, generator=gen())
    assert keep.shape == (5, 16) and masked.sum() == 5 * 48
    assert not torch.gather(masked, 1, keep).any()


def test_image_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 32, 32)
    target = images.reshape(3, 1, 2, 16, 2, 16).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, 256)
    masked = torch.tensor([[True, False, False, True]] * 3)
    pred = target.clone()
    pred[~masked] += 5.0  # wrong only on visible patches
    assert image_loss(pred, images, masked, 16).item() == pytest.approx(0.0, abs=1e-7)
    pred = target.clone()
    pred[masked] += 0.5
    assert image_loss(pred, images, masked, 16).item() == pytest.approx(0.25, rel=1e-5)


def test_masked_pixels_do_not_reach_visible_tokens(model, batch):
    out = model(batch, generator=gen(7))
    masked = out.reconstructions["cell"].patch_masked          # (B, 16) row-major 4 x 4 patches
    pixel_mask = masked.reshape(-1, 1, 4, 1, 4, 1).expand(-1, 1, 4, 16, 4, 16).reshape(-1, 1, 64, 64)
    noisy = dict(batch)
    noisy["cell_image"] = torch.where(pixel_mask, torch.rand_like(batch["cell_image"]), batch["cell_image"])
    again = model(noisy, generator=gen(7))
    assert torch.equal(again.reconstructions["cell"].patch_masked, masked)
    # the one path from masked pixels to z_cell is the morphometry input: measures of the whole
    # crop (fusion.morphometry_residual, docs/model.md); take it out and nothing else moved
    morph = model.cell_fusion.morphometry
    mask = batch["cell_mask"]
    through_measures = morph(morphometry_measures(noisy["cell_image"], mask)) - \
        morph(morphometry_measures(batch["cell_image"], mask))
    assert through_measures.abs().max() > 1e-3
    assert torch.allclose(again.z_cell - through_measures, out.z_cell, atol=1e-5)
    assert not torch.allclose(again.losses["cell/image"], out.losses["cell/image"])  # targets changed
    # the check can fail: changing visible pixels does change the encoding
    visible_noise = dict(batch)
    visible_noise["cell_image"] = torch.where(~pixel_mask, torch.rand_like(batch["cell_image"]), batch["cell_image"])
    assert not torch.allclose(model(visible_noise, generator=gen(7)).z_cell, out.z_cell, atol=1e-4)


def test_unmeasured_genes_change_nothing(model, batch):
    out = model(batch, generator=gen(11))
    changed = dict(batch)
    for level in ("cell", "niche", "tissue"):
        counts, measured = batch[f"{level}_counts"], batch[f"{level}_gene_measured"]
        assert (~measured).any()
        junk = torch.poisson(torch.full_like(counts, 50.0))
        changed[f"{level}_counts"] = torch.where(measured, counts, junk)
    again = model(changed, generator=gen(11))
    for name in ("z", "z_cell", "z_niche", "z_tissue"):
        assert torch.equal(getattr(again, name), getattr(out, name)), name
    for key, value in out.losses.items():
        assert torch.equal(again.losses[key], value), key
    for level in ("cell", "niche", "tissue"):  # unmeasured genes are never targets
        rec = out.reconstructions[level]
        measured = batch[f"{level}_gene_measured"]
        assert torch.equal(rec.gene_measured, measured)
        assert (rec.gene_mean[~measured] == 0).all() and (rec.gene_counts[~measured] == 0).all()
    # the check can fail: measured genes do matter
    measured_change = dict(batch)
    measured_change["cell_counts"] = batch["cell_counts"] * 3 + 1
    assert not torch.allclose(model(measured_change, generator=gen(11)).z_cell, out.z_cell)


def test_gene_selection_and_masking():
    counts = torch.tensor([[5.0, 0, 0, 3, 0, 0, 9, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    measured = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    counts[0, 4] = 100.0  # unmeasured
    values = normalize_counts(counts, measured, 100.0)
    assert values[0, 4] == 0 and torch.allclose(values[0, 6], torch.log1p(torch.tensor(9 / 17 * 100)))
    priority = torch.linspace(0, 0.9, 8)
    sel = select_genes(values, measured, 4, randomize=False, zero_priority=priority)
    assert sel.index[0].tolist() == [6, 0, 3, 7]   # expression order, then zeros by priority
    assert sel.valid.tolist() == [[True] * 4, [True, True, False, False]]
    for seed in range(5):
        sel = select_genes(values, measured, 4, randomize=True, zero_priority=priority, generator=gen(seed))
        chosen = set(sel.index[0].tolist())
        assert {0, 3, 6} <= chosen and 4 not in chosen and 5 not in chosen
        kept, masked = split_masked(sel, 0.5, generator=gen(seed))
        assert kept.valid.sum(1).tolist() == [2, 1] and masked.valid.sum(1).tolist() == [2, 1]
        row0 = set(kept.index[0][kept.valid[0]].tolist()) | set(masked.index[0][masked.valid[0]].tolist())
        assert row0 == chosen


def test_profile_embedding_is_the_linear_read_of_the_visible_profile_before_attention(model):
    """The gene residual's input: Linear(G, dim) of the token values scattered into the panel,
    untouched by which zero genes were drawn as tokens (or their order), 0 for a cell without
    genes; the profile *token* after attention does depend on them."""
    encoder = model.gene_encoder
    index = torch.tensor([[5, 17, 40, 0], [3, 0, 0, 0]])
    values = torch.tensor([[1.5, 0.7, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    with torch.no_grad():
        out = encoder(index, values, valid)
        profile = torch.zeros(2, N_GENES)
        profile[0, [5, 17, 40]] = torch.tensor([1.5, 0.7, 2.0])
        assert torch.allclose(out.profile[0], encoder.profile(profile)[0], atol=1e-6)
        assert torch.equal(out.profile[1], torch.zeros(encoder.dim))            # no genes -> 0
        # other zero genes as tokens, in another order: same profile embedding, other tokens
        other = encoder(torch.tensor([[77, 40, 5, 17, 90]]), torch.tensor([[0.0, 2.0, 1.5, 0.7, 0.0]]),
                        torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(other.profile[0], out.profile[0], atol=1e-6)
    assert not torch.allclose(other.tokens[0, 0], out.tokens[0, 0], atol=1e-4)
    assert out.tokens.shape == (2, 5, encoder.dim) and out.valid[:, 0].tolist() == [True, False]


def test_gene_residual_adds_the_profile_embedding_to_z_cell(config, batch):
    """z_cell = (image queries x gene tokens, pooled) + gene_summary(profile embedding) + ..."""
    torch.manual_seed(0)
    model = SpatiaModel(config, synthetic_gene_symbols(N_GENES)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.cell_fusion.gene_summary.weight)
        z_cell = model.embed(batch, levels=("cell",)).z_cell
        weight = model.cell_fusion.gene_summary.weight.clone()
        bias = model.cell_fusion.gene_summary.bias.clone()
        model.cell_fusion.gene_summary.weight.zero_()
        model.cell_fusion.gene_summary.bias.zero_()
        without = model.embed(batch, levels=("cell",)).z_cell
        measured = batch["cell_gene_measured"].bool()
        values = normalize_counts(batch["cell_counts"], measured, config.gene.library_target())
        selection = select_genes(values, measured, config.gene.max_tokens, randomize=False,
                                 zero_priority=model.gene_encoder.zero_priority)
        profile = model.gene_encoder(selection.index, selection.take(values), selection.valid).profile
    assert torch.allclose(z_cell - without, profile @ weight.T + bias, atol=1e-4)


def test_image_only_embedding_ignores_genes(model, batch):
    emb = model.embed(batch, modality="image")
    changed = dict(batch)
    changed["cell_counts"] = torch.poisson(torch.full_like(batch["cell_counts"], 7.0))
    changed["cell_gene_measured"] = torch.ones_like(batch["cell_gene_measured"])
    again = model.embed(changed, modality="image")
    for name in ("z", "z_cell", "z_niche", "z_tissue"):
        assert torch.equal(getattr(again, name), getattr(emb, name)), name
    assert not torch.allclose(model.embed(changed).z_cell, model.embed(batch).z_cell)


def test_gene_only_embedding_ignores_images(model, batch):
    emb = model.embed(batch, modality="gene")
    changed = dict(batch)
    for level in ("cell", "niche", "tissue"):
        changed[f"{level}_image"] = torch.rand_like(batch[f"{level}_image"])
    again = model.embed(changed, modality="gene")
    for name in ("z", "z_cell", "z_niche", "z_tissue"):
        assert torch.equal(getattr(again, name), getattr(emb, name)), name
    assert not torch.allclose(model.embed(changed).z_cell, model.embed(batch).z_cell)


def test_withheld_modality_becomes_the_target(model, batch):
    out = model(batch, modality="image", generator=gen())
    rec = out.reconstructions["cell"]
    assert torch.equal(rec.gene_measured, batch["cell_gene_measured"])  # the whole measured panel
    out = model(batch, modality="gene", generator=gen())
    assert out.reconstructions["cell"].patch_masked.all()


def test_nb_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    counts = torch.poisson(torch.rand(50, 30) * 20)
    mean = torch.rand(50, 30) * 15 + 0.05
    theta = torch.rand(30) * 5 + 0.1
    reference = torch.distributions.NegativeBinomial(total_count=theta.expand_as(mean),
                                                     logits=mean.log() - theta.log()).log_prob(counts)
    assert torch.allclose(nb_log_prob(counts, mean, theta), reference, atol=1e-4, rtol=1e-4)
    # a zero mean (a row without counts) scores a zero count as certain, without NaN
    assert nb_log_prob(torch.zeros(3), torch.zeros(3), torch.ones(3)).abs().max() < 1e-6


def test_gene_loss_scores_the_measured_panel_with_library_size():
    torch.manual_seed(1)
    logits = torch.randn(4, 6)
    theta = torch.rand(6) + 0.5
    counts = torch.tensor([[3.0, 0, 1, 7, 0, 2], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [9, 0, 0, 0, 4, 0]])
    measured = torch.ones(4, 6, dtype=torch.bool)
    measured[0, 4:] = False
    loss, mean = gene_loss(logits, theta, counts, measured)
    # by hand: softmax over each row's measured genes times its measured library
    expected = []
    for i in range(4):
        m = measured[i]
        mu = torch.softmax(logits[i][m], 0) * counts[i][m].sum()
        assert torch.allclose(mean[i][m], mu, atol=1e-5) and (mean[i][~m] == 0).all()
        dist = torch.distributions.NegativeBinomial(total_count=theta[m], logits=(mu + 1e-12).log() - theta[m].log())
        expected.append(-dist.log_prob(counts[i][m]))
    assert torch.allclose(loss, torch.cat(expected).mean(), atol=1e-4)
    # counts of unmeasured genes are never targets
    junk = counts.clone()
    junk[0, 4:] = 1000.0
    assert torch.equal(gene_loss(logits, theta, junk, measured)[0], loss)


def test_withheld_cells_see_no_gene_tokens(config):
    """`gene.withhold_ratio`: those training cells' embeddings ignore their genes entirely."""
    import dataclasses

    all_withheld = dataclasses.replace(config, gene=dataclasses.replace(config.gene, withhold_ratio=0.999))
    torch.manual_seed(0)
    model = SpatiaModel(all_withheld, synthetic_gene_symbols(N_GENES))
    batch = synthetic_batch(config, BatchSizes(n_tissues=1, cells_per_tissue=8, n_genes=N_GENES), seed=5)
    changed = dict(batch)
    changed["cell_counts"] = torch.poisson(torch.full_like(batch["cell_counts"], 7.0)) * batch["cell_gene_measured"]
    a = model(batch, levels=("cell",), generator=gen(2))
    b = model(changed, levels=("cell",), generator=gen(2))
    assert torch.equal(a.z_cell, b.z_cell)
    assert not torch.equal(a.losses["cell/gene"], b.losses["cell/gene"])  # targets still the counts


def test_final_fusion_starts_as_the_cell_level(model, batch):
    """z = z_cell + a zero-initialised projection of the fused context (Eq. 4 with a residual)."""
    torch.manual_seed(0)
    fresh = SpatiaModel(model.config, model.gene_symbols)
    emb = fresh.embed(batch)
    assert torch.equal(emb.z, emb.z_cell)


def test_final_fusion_clips_the_context_to_a_share_of_the_cell_level():
    """fusion.context_ratio r: |z - z_cell| <= r |z_cell| per cell; a context inside the bound
    passes unchanged; None leaves it unbounded; the clip keeps gradients finite from the zero start."""
    torch.manual_seed(0)
    z_cell, z_niche, z_tissue = (torch.randn(16, 32) for _ in range(3))
    config = FusionConfig(dim=32, heads=2, mlp_size=64, context_ratio=0.25)
    clipped = FinalFusion(config)
    clipped.reset_parameters()
    z_cell.requires_grad_(True)
    clipped(z_cell, z_niche, z_tissue).sum().backward()  # out = 0: context 0, gradients defined
    assert torch.isfinite(z_cell.grad).all() and clipped.out.weight.grad.abs().sum() > 0
    z_cell = z_cell.detach()

    unbounded = FinalFusion(dataclasses.replace(config, context_ratio=None))
    unbounded.load_state_dict(clipped.state_dict())
    with torch.no_grad():
        for fusion in (clipped, unbounded):
            torch.nn.init.normal_(fusion.out.weight, std=1.0)  # a context far larger than z_cell
        unbounded.out.weight.copy_(clipped.out.weight)
        raw = unbounded(z_cell, z_niche, z_tissue) - z_cell
        bounded = clipped(z_cell, z_niche, z_tissue) - z_cell
    share = bounded.norm(dim=-1) / z_cell.norm(dim=-1)
    assert (raw.norm(dim=-1) > 0.25 * z_cell.norm(dim=-1)).all()
    assert torch.allclose(share, torch.full_like(share, 0.25), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(bounded, raw, dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)  # same direction, shorter
    with torch.no_grad():
        clipped.out.weight.mul_(1e-4)
        unbounded.out.weight.copy_(clipped.out.weight)
        small = unbounded(z_cell, z_niche, z_tissue) - z_cell
        assert (small.norm(dim=-1) < 0.25 * z_cell.norm(dim=-1)).all()
        assert torch.equal(clipped(z_cell, z_niche, z_tissue) - z_cell, small)


def test_embed_is_deterministic_and_restores_mode(model, batch):
    model.train()
    a, b = model.embed(batch), model.embed(batch)
    assert model.training
    assert torch.equal(a.z, b.z) and a.losses == {}


def test_levels_select_the_stage(model, config, batch):
    cell_only = {k: v for k, v in batch.items() if k.startswith("cell_")}
    out = model(cell_only, levels=("cell",), generator=gen())
    assert out.z_niche is None and out.z_tissue is None
    assert set(out.losses) == {"cell/image", "cell/gene", "cell/morphometry", "total"}  # tiny: morphometry 0.3
    out = model(batch, levels=("cell", "niche"), generator=gen())
    assert out.z_niche is not None and out.z_tissue is None
    with pytest.raises(ValueError):
        model(batch, levels=("cell", "tissue"))
    with pytest.raises(ValueError):
        model(batch, modality="text")


def test_empty_niche_uses_its_image_only(model, batch):
    counts = torch.bincount(batch["cell_niche_index"], minlength=len(batch["niche_id"]))
    empty = (counts == 0).nonzero()[:, 0]
    assert len(empty) > 0
    emb = model.embed(batch, levels=("cell", "niche"))
    changed = dict(batch)
    changed["cell_image"] = torch.rand_like(batch["cell_image"])
    again = model.embed(changed, levels=("cell", "niche"))
    assert torch.allclose(again.niche_embeddings[empty], emb.niche_embeddings[empty], atol=1e-6)
    full = (counts > 0).nonzero()[:, 0]
    assert not torch.allclose(again.niche_embeddings[full], emb.niche_embeddings[full], atol=1e-4)


def test_zero_loss_weight_skips_decoder(config, batch):
    import dataclasses

    loss = dataclasses.replace(config.loss, niche=dataclasses.replace(config.loss.niche, image=0.0))
    model = SpatiaModel(dataclasses.replace(config, loss=loss), synthetic_gene_symbols(N_GENES))
    out = model(batch, generator=gen())
    assert "niche/image" not in out.losses and "niche/gene" in out.losses


def test_parameter_groups_partition_the_model(model):
    groups = model.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_batch_mismatch_errors(model, batch, config):
    wrong = dict(batch)
    wrong["cell_image"] = torch.zeros(len(batch["cell_id"]), 1, 32, 32)
    with pytest.raises(ConfigError, match="cell_size_px"):
        model(wrong)
    wrong = dict(batch)
    wrong["cell_counts"] = batch["cell_counts"][:, :10]
    with pytest.raises(DatasetError, match="vocabulary"):
        model(wrong)
    wrong = dict(batch)
    wrong["cell_niche_index"] = batch["cell_niche_index"] + 1000
    with pytest.raises(DatasetError, match="cell_niche_index"):
        model(wrong)
    wrong = {k: v for k, v in batch.items() if not k.startswith("tissue_")}
    with pytest.raises(DatasetError, match="tissue"):
        model(wrong)


def test_cell_fusion_shares_its_pool_with_an_image_free_gene_query():
    """fusion.image_query_weight w < 1: z_cell's pool = w mean(image queries) + (1 - w) gene query;
    the gene query never sees the image and does not change the image tokens' outputs; w = 1 (and
    a config with neither weight set) builds the paper's fusion, without the query."""
    assert FusionConfig().image_query_share() == 1.0
    assert FusionConfig(morphometry_weight=0.2).image_query_share() == 0.2    # null: the measured weight
    assert FusionConfig(morphometry_weight=0.2, image_query_weight=0.7).image_query_share() == 0.7
    config = FusionConfig(dim=32, heads=2, mlp_size=64, gene_residual=False, morphometry_residual=False)
    assert CellFusion(dataclasses.replace(config, image_query_weight=1.0), 24, 16).gene_query is None

    torch.manual_seed(0)
    fusion = CellFusion(dataclasses.replace(config, image_query_weight=0.3), 24, 16)
    fusion.reset_parameters()
    image, other_image = torch.randn(6, 5, 24), torch.randn(6, 5, 24)
    genes, valid = torch.randn(6, 7, 16), torch.rand(6, 7) > 0.3

    def pool(share, image_tokens):
        fusion.image_query_share = share
        return fusion(image_tokens, genes, valid)

    with torch.no_grad():
        fused, z_mixed = pool(0.3, image)
        _, z_image = pool(1.0, image)
        _, z_gene = pool(0.0, image)
        _, z_gene_other = pool(0.0, other_image)
        query = fusion.gene_query
        fusion.gene_query = None                                   # the same weights without the query
        fused_alone, _ = fusion(image, genes, valid)
        fusion.gene_query = query
    assert fused.shape == (6, 5, 32)
    assert torch.allclose(z_mixed, 0.3 * z_image + 0.7 * z_gene, atol=1e-6)
    assert torch.allclose(z_gene, z_gene_other)                      # w = 0: the image has no say
    assert not torch.allclose(z_image, pool(1.0, other_image)[1])
    assert torch.allclose(fused, fused_alone, atol=1e-6)             # no attention between queries
    fusion.image_query_share = 0.3
    fusion(image, genes, valid)[1].sum().backward()
    assert fusion.gene_query.grad.abs().sum() > 0                    # trained through z_cell
