"""Pretrained inputs from local paths: ViTMAE weight directories and gene-vector tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEModel

from spatia.errors import ConfigError, InputDataError
from spatia.model import SpatiaModel, load_config, read_gene_table, synthetic_batch
from spatia.model.image import ImageEncoder, load_vitmae_weights
from spatia.model.layers import sincos_2d



@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


def _vitmae_config(config, **changes) -> ViTMAEConfig:
    im = config.image
    values = dict(hidden_size=im.hidden_size, num_hidden_layers=im.layers, num_attention_heads=im.heads,
                  intermediate_size=im.mlp_size, patch_size=im.patch_size, image_size=im.cell_size_px,
                  num_channels=im.channels, mask_ratio=0.0)
    values.update(changes)
    return ViTMAEConfig(**values)


def _reference_tokens(reference: ViTMAEModel, images: torch.Tensor) -> torch.Tensor:
    """ViTMAE's own encoding with masking off (mask_ratio 0, identity patch order)."""
    n_patches = reference.embeddings.patch_embeddings.num_patches
    noise = torch.arange(n_patches, dtype=torch.float32).expand(images.shape[0], -1)
    with torch.no_grad():
        return reference(pixel_values=images, noise=noise).last_hidden_state


def _mae_sincos(dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of the original MAE code (facebookresearch/mae util/pos_embed.py)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_table_matches_mae():
    for grid, dim in ((4, 128), (14, 768), (8, 64)):
        assert np.allclose(sincos_2d(grid, dim).numpy(), _mae_sincos(dim, grid), atol=1e-6)


def test_position_table_for_other_grids(config):
    from spatia.model.image import resize_position_table

    sincos = sincos_2d(14, 128)
    assert torch.allclose(resize_position_table(sincos, 4), sincos_2d(4, 128))   # rebuilt exactly
    learned = torch.randn(16, 128)
    assert resize_position_table(learned, 4) is learned
    resized = resize_position_table(learned, 8)
    assert resized.shape == (64, 128) and not torch.allclose(resized, sincos_2d(8, 128))


def test_loaded_encoder_reproduces_vitmae(tmp_path, config):
    torch.manual_seed(0)
    reference = ViTMAEModel(_vitmae_config(config)).eval()
    with torch.no_grad():  # give the (otherwise zero) CLS token and positions real values
        reference.embeddings.cls_token.normal_()
        reference.embeddings.position_embeddings.normal_()
    reference.save_pretrained(tmp_path / "vit")
    encoder = ImageEncoder(config.image, 64).eval()
    report = load_vitmae_weights(encoder, tmp_path / "vit", config.image)
    assert report["channels_adapted"] is False
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        ours = encoder(images)
    assert torch.allclose(ours, _reference_tokens(reference, images), atol=1e-5)
    # the check can fail: an encoder without the weights differs
    with torch.no_grad():
        assert not torch.allclose(ImageEncoder(config.image, 64)(images), ours, atol=1e-3)


def test_rgb_weights_on_grey_images_and_other_image_size(tmp_path, config):
    torch.manual_seed(1)
    reference = ViTMAEModel(_vitmae_config(config, num_channels=3)).eval()
    reference.save_pretrained(tmp_path / "rgb")
    encoder = ImageEncoder(config.image, 64).eval()
    assert load_vitmae_weights(encoder, tmp_path / "rgb", config.image)["channels_adapted"] is True
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(grey), _reference_tokens(reference, grey.expand(-1, 3, -1, -1)), atol=1e-5)
    # weights saved at 32 px (2 x 2 patches) with the sine-cosine table load into a 64 px encoder
    small = ViTMAEModel(_vitmae_config(config, image_size=32))
    with torch.no_grad():
        small.embeddings.position_embeddings[0, 1:] = sincos_2d(2, config.image.hidden_size)
    small.save_pretrained(tmp_path / "small")
    encoder = ImageEncoder(config.image, 64)
    assert load_vitmae_weights(encoder, tmp_path / "small", config.image)["source_image_size"] == 32
    assert torch.equal(encoder.blocks[0].mlp.fc1.weight, small.layers[0].mlp.fc1.weight)
    assert torch.allclose(encoder.position_table, sincos_2d(4, config.image.hidden_size))


def test_model_loads_weights_into_every_level(tmp_path, config):
    torch.manual_seed(2)
    ViTMAEModel(_vitmae_config(config)).save_pretrained(tmp_path / "vit")
    model = SpatiaModel(config, [f"G{i}" for i in range(20)])
    report = model.load_pretrained(image_weights=tmp_path / "vit")
    assert "image_weights" in report
    for level in ("cell", "niche", "tissue"):
        enc = model.image_encoder(level)
        assert torch.equal(enc.patch_embed.weight, model.cell_image_encoder.patch_embed.weight)
    # the 128 px tissue encoder got the 64 px table resized (here: zeros, as this transformers
    # version saves a fresh ViTMAEModel)
    assert model.tissue_image_encoder.position_table.shape == (64, config.image.hidden_size)
    batch = synthetic_batch(config, n_genes=20)
    assert torch.isfinite(model(batch).losses["total"])


def test_vitmae_mismatch_errors(tmp_path, config):
    ViTMAEModel(_vitmae_config(config, hidden_size=64, intermediate_size=256)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError) as info:
        load_vitmae_weights(ImageEncoder(config.image, 64), tmp_path / "wide", config.image)
    assert "image.hidden_size: config 128, weights 64" in str(info.value)
    assert "image.mlp_size" in str(info.value)
    with pytest.raises(InputDataError, match="config.json"):
        load_vitmae_weights(ImageEncoder(config.image, 64), tmp_path / "absent", config.image)
    two = dataclasses.replace(config.image, channels=2)
    ViTMAEModel(_vitmae_config(config, num_channels=3)).save_pretrained(tmp_path / "rgb")
    with pytest.raises(InputDataError, match="channel"):
        load_vitmae_weights(ImageEncoder(two, 64), tmp_path / "rgb", two)


def _write_tsv(path, symbols, vectors, header=True):
    lines = ["symbol\t" + "\t".join(f"d{i}" for i in range(vectors.shape[1]))] if header else []
    lines += [s + "\t" + "\t".join(f"{v:.6f}" for v in row) for s, row in zip(symbols, vectors)]
    path.write_text("\n".join(lines) + "\n")


def test_gene_vectors_from_tsv_same_width(tmp_path, config):
    vocabulary = ["CD3E", "MS4A1", "PTPRC", "NOVEL1"]
    rng = np.random.default_rng(0)
    table_symbols = ["PTPRC", "cd3e", "MS4A1", "NOTINVOCAB"]
    vectors = rng.normal(size=(4, config.gene.dim)).astype(np.float32)
    _write_tsv(tmp_path / "genes.tsv", table_symbols, vectors)
    model = SpatiaModel(config, vocabulary)
    before = model.gene_encoder.embedding.weight.detach().clone()
    report = model.load_pretrained(gene_embeddings=tmp_path / "genes.tsv")["gene_embeddings"]
    assert report["found"] == 3 and report["found_ignoring_case"] == 1 and report["missing"] == 1
    assert report["projected_from"] is None
    weight = model.gene_encoder.embedding.weight.detach()
    scaled = vectors / vectors.astype(np.float64).std()
    assert np.allclose(weight[0].numpy(), scaled[1], atol=1e-5)   # CD3E <- cd3e (case rule)
    assert np.allclose(weight[1].numpy(), scaled[2], atol=1e-5)   # MS4A1
    assert np.allclose(weight[2].numpy(), scaled[0], atol=1e-5)   # PTPRC
    assert torch.equal(weight[3], before[3])                      # NOVEL1 keeps its initialisation


def test_gene_vectors_from_parquet_projected(tmp_path, config):
    rng = np.random.default_rng(1)
    symbols = [f"G{i}" for i in range(300)]
    vectors = rng.normal(size=(300, 2 * config.gene.dim)).astype(np.float32)
    frame = pd.DataFrame(vectors, columns=[f"e{i}" for i in range(vectors.shape[1])])
    frame.insert(0, "gene_symbol", symbols)
    frame.to_parquet(tmp_path / "genes.parquet")
    read_symbols, read_vectors = read_gene_table(tmp_path / "genes.parquet")
    assert read_symbols == symbols and np.allclose(read_vectors, vectors)
    model = SpatiaModel(config, symbols[:50] + ["UNKNOWN"])
    report = model.load_pretrained(gene_embeddings=tmp_path / "genes.parquet")["gene_embeddings"]
    assert report["found"] == 50 and report["projected_from"] == 2 * config.gene.dim
    weight = model.gene_encoder.embedding.weight.detach().numpy()[:50].astype(np.float64)
    # PCA keeps the geometry of the leading components: distances correlate with the originals
    original = vectors[:50].astype(np.float64)
    d_new = np.linalg.norm(weight[:, None] - weight[None], axis=-1)[np.triu_indices(50, 1)]
    d_old = np.linalg.norm(original[:, None] - original[None], axis=-1)[np.triu_indices(50, 1)]
    assert np.corrcoef(d_new, d_old)[0, 1] > 0.6
    # a list column is read too
    pd.DataFrame({"symbol": symbols[:5], "embedding": list(vectors[:5])}).to_parquet(tmp_path / "list.parquet")
    assert read_gene_table(tmp_path / "list.parquet")[1].shape == (5, vectors.shape[1])


def test_gene_table_errors(tmp_path, config):
    _write_tsv(tmp_path / "other.tsv", ["X1", "X2"], np.ones((2, 4), dtype=np.float32), header=False)
    model = SpatiaModel(config, ["CD3E", "MS4A1"])
    with pytest.raises(InputDataError, match="none of the 2 vocabulary genes"):
        model.load_pretrained(gene_embeddings=tmp_path / "other.tsv")
    _write_tsv(tmp_path / "dup.tsv", ["CD3E", "CD3E"], np.ones((2, 4), dtype=np.float32))
    with pytest.raises(InputDataError, match="duplicate"):
        read_gene_table(tmp_path / "dup.tsv")
    (tmp_path / "bad.tsv").write_text("CD3E\t1.0\t2.0\nMS4A1\t1.0\tx\n")
    with pytest.raises(InputDataError, match="MS4A1"):
        read_gene_table(tmp_path / "bad.tsv")
    (tmp_path / "genes.json").write_text("{}")
    with pytest.raises(InputDataError, match="unsupported"):
        read_gene_table(tmp_path / "genes.json")
    with pytest.raises(InputDataError, match="not found"):
        read_gene_table(tmp_path / "missing.tsv")
