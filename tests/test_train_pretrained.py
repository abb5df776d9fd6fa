"""Pretrained inputs through `pretrain`: a tiny ViTMAE directory and a gene-vector table that the
test writes, loaded from local paths only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEModel

from spatia.errors import ConfigError
from spatia.model import SpatiaModel, load_config
from spatia.train import pretrain, read_checkpoint
from spatia.train.checkpoints import model_state_dict


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, simulated_mist):
    """A ViTMAE directory sized like tiny's image encoder (RGB, as published weights are) and a
    TSV of 16-dimensional vectors for half of the dataset's genes plus unknown ones."""
    root = tmp_path_factory.mktemp("weights")
    im = load_config("tiny").image
    torch.manual_seed(1)
    vitmae = ViTMAEModel(ViTMAEConfig(hidden_size=im.hidden_size, num_hidden_layers=im.layers,
                                      num_attention_heads=im.heads, intermediate_size=im.mlp_size,
                                      patch_size=im.patch_size, image_size=im.cell_size_px, num_channels=3))
    vitmae.save_pretrained(root / "vitmae")
    genes = json.loads((simulated_mist / "manifest.json").read_text())["genes"]
    rng = np.random.default_rng(0)
    rows = [f"{g}\t" + "\t".join(f"{v:.5f}" for v in rng.normal(size=16)) for g in genes[::2]]
    rows += ["NOT_A_GENE\t" + "\t".join(["1.0"] * 16)]
    (root / "genes.tsv").write_text("\n".join(rows) + "\n")
    return root / "vitmae", root / "genes.tsv", vitmae


def test_pretrain_starts_from_the_given_weights(simulated_mist, inputs, tmp_path):
    vitmae_dir, gene_table, vitmae = inputs
    run = pretrain(simulated_mist, tmp_path / "run", stage="cell", image_weights=vitmae_dir, gene_embeddings=gene_table,
                   train_overrides=dict(max_steps=1, lr=1e-30, warmup_steps=0, lr_schedule="constant",
                                        val_batches=0, cells_per_tissue=8), threads=1, progress_bar=False)
    record = json.loads((tmp_path / "run" / "spatia_run.json").read_text())
    report = record["config"]["pretrained_report"]
    assert "image_weights" in report and "gene_embeddings" in report

    # after one step at a vanishing learning rate the weights are the loaded ones
    genes = (tmp_path / "run" / "genes.txt").read_text().split()
    reference = SpatiaModel(load_config("tiny"), genes)
    reference.load_pretrained(image_weights=vitmae_dir, gene_embeddings=gene_table)
    trained = model_state_dict(read_checkpoint(run.last_checkpoint))
    expected = reference.state_dict()
    for key in ("cell_image_encoder.patch_embed.weight", "niche_image_encoder.blocks.0.qkv.weight",
                "tissue_image_encoder.norm.weight"):
        torch.testing.assert_close(trained[key], expected[key], rtol=0, atol=1e-6)
    matched = slice(0, None, 2)  # genes with a table row; the others keep their random initialisation
    torch.testing.assert_close(trained["gene_encoder.embedding.weight"][matched],
                               expected["gene_encoder.embedding.weight"][matched], rtol=0, atol=1e-6)
    # the RGB patch projection was summed over its channels for the grey images
    rgb = vitmae.embeddings.patch_embeddings.projection.weight.detach()
    torch.testing.assert_close(trained["cell_image_encoder.patch_embed.weight"],
                               rgb.sum(dim=1).reshape(rgb.shape[0], -1), rtol=0, atol=1e-5)


def test_pretrained_inputs_only_for_fresh_runs(simulated_mist, inputs, tmp_path):
    vitmae_dir, gene_table, _ = inputs
    first = pretrain(simulated_mist, tmp_path / "a", stage="cell", train_overrides=dict(max_steps=1, val_batches=0,
                                                                                 cells_per_tissue=8),
                     threads=1, progress_bar=False)
    with pytest.raises(ConfigError, match="fresh run"):
        pretrain(simulated_mist, tmp_path / "b", init_from=first.last_checkpoint, image_weights=vitmae_dir,
                 progress_bar=False)
