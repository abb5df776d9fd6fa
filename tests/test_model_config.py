"""SpatiaConfig: packaged configs, strict YAML loading, 'extends', validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from spatia.errors import ConfigError
from spatia.model import SpatiaConfig, SpatiaModel, config_from_dict, load_config, packaged_config_path


def _flat_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_packaged_configs_list_every_key(name):
    written = yaml.safe_load(packaged_config_path(name).read_text())
    expected = _flat_keys(SpatiaConfig().to_dict()) - {"name"}
    assert _flat_keys(written) == expected


def test_tiny_is_the_dataclass_default():
    config = load_config("tiny")
    assert config.name == "tiny"
    assert dataclasses.replace(config, name="x") == dataclasses.replace(SpatiaConfig(), name="x")
    assert config.image.cell_size_px == 64 and config.image.niche_size_px == 64
    assert config.image.tissue_size_px == 128


def test_base_has_table_10_sizes():
    c = load_config("base")
    assert (c.image.hidden_size, c.image.layers, c.image.mlp_size, c.image.patch_size) == (768, 12, 3072, 16)
    assert (c.image_decoder.hidden_size, c.image_decoder.layers, c.image_decoder.mlp_size) == (512, 8, 2048)
    assert (c.gene.dim, c.gene.layers, c.gene.mlp_size, c.gene.dropout) == (256, 8, 1024, 0.1)
    assert c.fusion.dim == 768 and c.fusion.dropout == 0.1
    assert c.gene_decoder.dim == 256 and c.gene_decoder.dropout == 0.1
    assert c.image.cell_size_px == c.image.niche_size_px == c.image.tissue_size_px == 224
    assert c.image.mask_ratio == 0.75


def test_base_instantiates_with_table_10_sizes():
    """Build base on the meta device (no memory, no compute) and count its parameters."""
    from transformers import ViTMAEConfig, ViTMAEModel

    config = load_config("base")
    vocabulary = [f"G{i}" for i in range(23122)]  # Table 10 vocabulary size
    with torch.device("meta"):
        model = SpatiaModel(config, vocabulary)
        reference = ViTMAEModel(ViTMAEConfig(num_channels=1, image_size=224))  # ViT-B/16 encoder
    reference_trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.cell_image_encoder.parameters()) == reference_trainable
    assert model.gene_encoder.embedding.weight.shape == (23122, 256)
    assert len(model.gene_encoder.blocks) == 8
    assert model.gene_encoder.blocks[0].mlp.fc1.weight.shape == (1024, 256)
    assert len(model.image_decoders["cell"].blocks) == 8
    assert model.image_decoders["cell"].blocks[0].mlp.fc1.weight.shape == (2048, 512)
    total = model.count_parameters()
    # 3 ViT-B encoders (85.25 M each) + 3 MAE decoders + gene, fusion, niche, tissue modules
    assert 400e6 < total < 425e6, total


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("extends: tiny\nimage:\n  hidden_sise: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "image.hidden_sise" in message and str(path) in message and "hidden_size" in message


def test_unknown_section(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("imagee:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'imagee'"):
        load_config(path)


def test_extends_overrides_only_given_keys(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("extends: base\nimage:\n  layers: 2\nloss:\n  tissue: {gene: 0.0}\n")
    config = load_config(path)
    base = load_config("base")
    assert config.image.layers == 2 and config.image.hidden_size == base.image.hidden_size
    assert config.loss.tissue.gene == 0.0 and config.loss.tissue.image == 1.0
    assert config.gene == base.gene


def test_wrong_type_and_impossible_sizes(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("image:\n  layers: two\n")
    with pytest.raises(ConfigError, match="'image.layers' must be an int"):
        load_config(path)
    path.write_text("image:\n  patch_size: 10\n")
    with pytest.raises(ConfigError, match="image.cell_size_px"):
        load_config(path)
    path.write_text("fusion:\n  heads: 3\n")
    with pytest.raises(ConfigError, match="fusion.heads"):
        load_config(path)
    path.write_text("image:\n  mask_ratio: 1.5\n")
    with pytest.raises(ConfigError, match="image.mask_ratio"):
        load_config(path)
    path.write_text("fusion:\n  morphometry_weight: 1.5\n")
    with pytest.raises(ConfigError, match=r"fusion.morphometry_weight.*\[0, 1\]"):
        load_config(path)
    path.write_text("fusion:\n  image_query_weight: -0.1\n")
    with pytest.raises(ConfigError, match=r"fusion.image_query_weight.*\[0, 1\]"):
        load_config(path)
    path.write_text("fusion:\n  context_ratio: 0\n")
    with pytest.raises(ConfigError, match=r"fusion.context_ratio.*above 0"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("image: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


def test_yaml_and_dict_round_trip(tmp_path):
    config = load_config("base")
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert dataclasses.replace(again, name="base") == config
    assert config_from_dict(config.to_dict()) == config
