"""The SPATIA model: image and gene encoders, multi-scale attention, dual decoders, configs.

Typical use::

    from spatia.model import SpatiaModel, load_config
    config = load_config("tiny")
    model = SpatiaModel(config, gene_symbols)           # vocabulary from the dataset manifest
    model.load_pretrained(image_weights="vitmae_dir", gene_embeddings="genes.tsv")
    out = model(batch)                                  # training: masked, with losses
    out.losses["total"].backward()
    emb = model.embed(batch)                            # inference: emb.z, emb.z_cell, ...
"""

from spatia.model.batch import MultiScaleBatch
from spatia.model.config import SpatiaConfig, config_from_dict, load_config, packaged_config_path, validate_config
from spatia.model.flops import flop_counter, flops_per_batch
from spatia.model.gene import match_gene_vectors, normalize_counts, read_gene_table
from spatia.model.image import load_vitmae_weights, random_patch_mask
from spatia.model.spatia import LEVELS, MODALITIES, LevelReconstruction, SpatiaModel, SpatiaOutput, check_levels
from spatia.model.synthetic import BatchSizes, synthetic_batch, synthetic_gene_symbols

__all__ = [
    "LEVELS",
    "MODALITIES",
    "BatchSizes",
    "LevelReconstruction",
    "MultiScaleBatch",
    "SpatiaConfig",
    "SpatiaModel",
    "SpatiaOutput",
    "check_levels",
    "config_from_dict",
    "flop_counter",
    "flops_per_batch",
    "load_config",
    "load_vitmae_weights",
    "match_gene_vectors",
    "normalize_counts",
    "packaged_config_path",
    "random_patch_mask",
    "read_gene_table",
    "synthetic_batch",
    "synthetic_gene_symbols",
    "validate_config",
]
