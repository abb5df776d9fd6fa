"""SPATIA model configuration: nested dataclasses loaded from YAML.

`load_config("tiny" | "base" | path)` returns a validated `SpatiaConfig`. The packaged configs
live in `spatia/configs/*.yaml`. A user file may name a packaged config (or another file) under
`extends:` and override only some keys; keys it leaves out come from that config (default:
`tiny`). Unknown keys, wrong types and impossible sizes raise `ConfigError` naming the key and
the file. Every size in the model is a value here, never a constant in code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from spatia.config import merge_config
from spatia.errors import ConfigError

PACKAGED_CONFIGS = ("tiny", "base")


@dataclass
class ImageConfig:
    """ViT-MAE image encoders (cell, niche and tissue images) and their input sizes."""

    cell_size_px: int = 64          # Sc: side of the square cell crop fed to the model
    niche_size_px: int = 64         # Sn: side of the niche image
    tissue_size_px: int = 128       # St: side of the tissue-region image
    channels: int = 1               # image channels (Xenium morphology: 1)
    patch_size: int = 16
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    mlp_size: int = 512
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12   # ViTMAE's value, so pretrained weights behave as trained
    mask_ratio: float = 0.75        # MAE: fraction of patches hidden from the encoder
    share_encoder: bool = False     # one ViT for all three levels instead of one per level
    # embeddings are the mean over this many orientations of the cell crop: 1 (as is) or 8 (every
    # rotation by 90 degrees and its mirror image; spatia.model.dihedral, docs/model.md)
    embed_orientations: int = 8
    # encoder input and MAE targets = (pixels - mean) / std; null: measured on the dataset's
    # train cell crops when pretraining starts (`spatia.train.data.dataset_statistics`)
    pixel_mean: float | None = None
    pixel_std: float | None = None

    def pixel_stats(self) -> tuple[float, float]:
        """(mean, std) the pixels are standardised with; (0, 1) while not yet measured."""
        return (0.0 if self.pixel_mean is None else self.pixel_mean,
                1.0 if self.pixel_std is None else self.pixel_std)


ORIENTATIONS = 8
"""Orientations of a square crop: the dihedral group's rotations by 90 degrees and mirror images."""

EMBED_ORIENTATION_CHOICES = (1, ORIENTATIONS)
"""`image.embed_orientations` values: 1 (the crop as is) or all eight orientations."""


UNMEASURED_TARGET_SUM = 10000.0
"""`gene.target_sum` of a model built before it was measured (e.g. by hand, outside `spatia pretrain`)."""


@dataclass
class GeneConfig:
    """scPRINT-style gene encoder: gene-ID embedding + value encoder + transformer."""

    dim: int = 128
    layers: int = 1
    heads: int = 4
    mlp_size: int = 512
    dropout: float = 0.0
    # gene tokens per cell: all nonzero (up to this) + sampled zeros; null: the 99th percentile
    # of nonzero measured genes per train cell, measured when pretraining starts (no cap until then)
    max_tokens: int | None = None
    mask_ratio: float = 0.5         # masked gene modelling: share of the selected tokens hidden
    withhold_ratio: float = 0.15    # share of training cells whose genes are all hidden (image-only)
    profile_token: bool = True      # one more token: Linear(G, dim) of the cell's visible profile
    # expression = log1p(counts / total_measured * target_sum); null: the median library (total
    # measured counts) of the train cells, measured when pretraining starts
    # (`spatia.train.data.dataset_statistics`), scanpy's default; docs/model.md has the measurement
    target_sum: float | None = None
    max_value: float = 12.0         # normalised values are clipped here before the value encoder
    freeze_embeddings: bool = False  # freeze the gene-ID embedding (e.g. after loading vectors)

    def library_target(self) -> float:
        """The library size counts are scaled to; `UNMEASURED_TARGET_SUM` while not yet measured."""
        return UNMEASURED_TARGET_SUM if self.target_sum is None else self.target_sum


@dataclass
class FusionConfig:
    """Cell-level image<-gene cross-attention and the final fusion (Eq. 4); `dim` is D."""

    dim: int = 128                  # D: size of every embedding (z, z_cell, z_niche, z_tissue)
    heads: int = 4
    mlp_size: int = 512
    layers: int = 1                 # cross-attention blocks of the cell fusion
    final_layers: int = 1           # cross-attention blocks of the final fusion (Eq. 4)
    dropout: float = 0.0
    gene_residual: bool = True      # z_cell += W * (the gene encoder's profile embedding, before its
                                    # attention): the whole visible profile reaches z_cell linearly
    morphometry_residual: bool = True  # z_cell += W * (the crop's standardised morphometry measures)
                                    # when images are used: nuclear measures a small ViT misses
    # the measures' weight in that sum; null: min(1, R2 / 0.1) ** 2, R2 the share of the train cells'
    # expression variance the measures explain, measured when pretraining starts
    # (`spatia.train.data.dataset_statistics`): near 0 where the DAPI cannot tell cells apart
    morphometry_weight: float | None = None
    # the share of z_cell's attention pool whose queries are the image tokens (the paper's); the
    # rest is pooled by one learned, image-free query over the same gene tokens. null: the
    # measured morphometry weight (1 where the images explain the expression; docs/model.md)
    image_query_weight: float | None = None
    # the final fusion's context is clipped per cell to at most this share of |z_cell| (null:
    # unbounded); keeps the cell level the larger part of the unified embedding (docs/model.md)
    context_ratio: float | None = 0.15

    def image_query_share(self) -> float:
        """`image_query_weight`, else `morphometry_weight`, else 1 (a model built outside `pretrain`)."""
        for weight in (self.image_query_weight, self.morphometry_weight):
            if weight is not None:
                return float(weight)
        return 1.0


@dataclass
class NicheConfig:
    """Niche cross-attention (Eq. 5): mean member z_cell attends to niche image tokens."""

    layers: int = 1
    heads: int = 4
    mlp_size: int = 512
    dropout: float = 0.0


@dataclass
class TissueConfig:
    """Tissue transformer over the grid of niche embeddings + tissue image tokens (Eq. 6)."""

    grid_size: int = 4              # niches per side of a tissue region
    layers: int = 2
    heads: int = 4
    mlp_size: int = 512
    dropout: float = 0.0


@dataclass
class ImageDecoderConfig:
    """MAE pixel decoder (one per level), conditioned on the level's embedding."""

    hidden_size: int = 128
    layers: int = 1
    heads: int = 4
    mlp_size: int = 512
    dropout: float = 0.0
    norm_pix_loss: bool = False     # per-patch normalised targets (MAE option)


@dataclass
class GeneDecoderConfig:
    """Whole-panel negative-binomial decoder (scVI's): an MLP of the embedding -> gene logits."""

    dim: int = 256                  # hidden width of the MLP
    layers: int = 1                 # hidden layers (Linear, LayerNorm, GELU, dropout)
    dropout: float = 0.0


@dataclass
class LevelLossWeights:
    """lambda_cell (image reconstruction) and lambda_gene (masked gene modelling) of one level;
    `morphometry` (cell level only): predicting the crop's hand-made measures from the image
    encoder (`spatia.model.morphometry`; not in the paper)."""

    image: float = 1.0
    gene: float = 1.0
    morphometry: float = 0.0


@dataclass
class LossConfig:
    # the cell gene loss is a mean over ~G entries per cell (most of them zero counts), 10-100x
    # smaller than the standardised image losses; weight 10 puts its gradient on z_cell on a par
    # with the niche and tissue gene losses (measured, docs/model.md)
    # morphometry 0.3: the auxiliary target of spatia.model.morphometry (measured, docs/model.md)
    cell: LevelLossWeights = field(default_factory=lambda: LevelLossWeights(image=1.0, gene=10.0, morphometry=0.3))
    niche: LevelLossWeights = field(default_factory=LevelLossWeights)
    tissue: LevelLossWeights = field(default_factory=LevelLossWeights)


@dataclass
class TrainConfig:
    """Optimiser and batch composition (read by the trainer and by `synthetic_batch`)."""

    lr: float = 1e-3                # AdamW, as in the paper (appendix C)
    weight_decay: float = 0.05
    tissues_per_batch: int = 2      # tissue regions per localised batch (all their niches)
    cells_per_tissue: int = 64      # cells sampled per tissue region: 2 x 64 = 128 cells
    # --- training loop (spatia.train; `spatia pretrain` options override these)
    max_steps: int = 2000           # optimiser steps of one stage
    max_epochs: int | None = None   # optional cap in epochs (one epoch = every train tissue once)
    lr_schedule: str = "cosine"     # "cosine" (to min_lr_ratio * lr at max_steps) or "constant"
    warmup_steps: int = 50          # linear warm-up from 0 (not in the paper)
    min_lr_ratio: float = 0.1
    grad_clip_norm: float = 1.0     # clip the global gradient norm; 0 = off
    val_every_n_steps: int = 200    # validation on the dataset's val split
    val_batches: int = 8            # localised batches per validation (fixed draws)
    checkpoint_every_n_steps: int = 200
    log_every_n_steps: int = 10
    num_workers: int = 0            # DataLoader worker processes per training process
    precision: str = "auto"         # auto: bf16-mixed on CUDA, 32-true on CPU; or any Lightning value
    # each step shows every cell crop (and its mask) in a random one of its 8 orientations
    # (rotations by 90 degrees, mirror images; spatia.model.dihedral, docs/model.md)
    cell_orientations: bool = True


@dataclass
class SpatiaConfig:
    """Everything that sizes the SPATIA model. `name` is the packaged name or the file path."""

    name: str = "tiny"
    image: ImageConfig = field(default_factory=ImageConfig)
    gene: GeneConfig = field(default_factory=GeneConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    niche: NicheConfig = field(default_factory=NicheConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    image_decoder: ImageDecoderConfig = field(default_factory=ImageDecoderConfig)
    gene_decoder: GeneDecoderConfig = field(default_factory=GeneDecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready), e.g. for run records and checkpoints."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text that `load_config` reads back unchanged."""
        data = self.to_dict()
        data.pop("name")
        return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def packaged_config_path(name: str) -> Path:
    """Path of a packaged config (`tiny` or `base`)."""
    return Path(str(resources.files("spatia") / "configs" / f"{name}.yaml"))


def load_config(name_or_path: str | Path) -> SpatiaConfig:
    """Load and validate a config: a packaged name (`tiny`, `base`) or a YAML file path."""
    return _load(name_or_path, seen=())


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> SpatiaConfig:
    """Build a validated config from a nested dict (e.g. one stored in a checkpoint).

    Keys left out take the `SpatiaConfig()` defaults (the tiny values); `extends` is honoured.
    """
    data = dict(data)
    base = _load(data.pop("extends"), seen=(source,)) if "extends" in data else SpatiaConfig()
    name = data.pop("name", source)
    config = merge_config(base, data, source=source)
    config.name = str(name)
    validate_config(config, source=source)
    return config


def _load(name_or_path: str | Path, seen: tuple[str, ...]) -> SpatiaConfig:
    text_name = str(name_or_path)
    if text_name in PACKAGED_CONFIGS:
        path = packaged_config_path(text_name)
        display = text_name
    else:
        path = Path(name_or_path).expanduser()
        display = str(path)
        if not path.is_file():
            raise ConfigError(
                "config file not found",
                path=path,
                fix=f"give one of the packaged configs ({', '.join(PACKAGED_CONFIGS)}) or the path "
                "of an existing YAML file",
            )
    if display in seen:
        raise ConfigError(f"'extends' chain loops back to {display}", path=seen[-1],
                          fix="remove the circular 'extends'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML ({error})", path=path, fix="correct the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("a config file must be a mapping of sections", path=path,
                          fix="start from a copy of the packaged tiny.yaml")
    if "extends" in data:
        parent = data.pop("extends")
        if not isinstance(parent, str):
            raise ConfigError("'extends' must be a config name or a path", path=path,
                              fix="write e.g. 'extends: tiny'")
        if parent not in PACKAGED_CONFIGS and not Path(parent).is_absolute():
            parent = str(path.parent / parent)
        base = _load(parent, seen=(*seen, display))
    elif text_name in PACKAGED_CONFIGS:
        base = SpatiaConfig()
    else:
        base = _load("tiny", seen=(*seen, display))
    config = merge_config(base, data, source=str(path))
    config.name = display
    validate_config(config, source=str(path))
    return config


def validate_config(config: SpatiaConfig, *, source: str = "<config>") -> None:
    """Check sizes that must agree with each other; raise `ConfigError` naming the key."""

    def fail(key: str, problem: str, fix: str) -> None:
        raise ConfigError(f"'{key}' {problem}", path=source, fix=fix)

    def positive(key: str, value: float) -> None:
        if value <= 0:
            fail(key, f"must be positive, not {value}", f"set '{key}' to a value above 0")

    def ratio(key: str, value: float, upper_inclusive: bool = False) -> None:
        if not (0.0 <= value < 1.0 or (upper_inclusive and value == 1.0)):
            fail(key, f"must lie in [0, 1), not {value}", f"set '{key}' to e.g. 0.25")

    im = config.image
    for key in ("cell_size_px", "niche_size_px", "tissue_size_px"):
        size = getattr(im, key)
        positive(f"image.{key}", size)
        if size % im.patch_size:
            fail(f"image.{key}", f"({size}) is not a multiple of image.patch_size ({im.patch_size})",
                 "choose sizes that are multiples of the patch size")
    sections = {
        "image": (im.hidden_size, im.heads, im.layers, im.mlp_size, im.dropout),
        "gene": (config.gene.dim, config.gene.heads, config.gene.layers, config.gene.mlp_size,
                 config.gene.dropout),
        "fusion": (config.fusion.dim, config.fusion.heads, config.fusion.layers,
                   config.fusion.mlp_size, config.fusion.dropout),
        "niche": (config.fusion.dim, config.niche.heads, config.niche.layers, config.niche.mlp_size,
                  config.niche.dropout),
        "tissue": (config.fusion.dim, config.tissue.heads, config.tissue.layers,
                   config.tissue.mlp_size, config.tissue.dropout),
        "image_decoder": (config.image_decoder.hidden_size, config.image_decoder.heads,
                          config.image_decoder.layers, config.image_decoder.mlp_size,
                          config.image_decoder.dropout),
    }
    for section, (dim, heads, layers, mlp, dropout) in sections.items():
        positive(f"{section}.heads", heads)
        positive(f"{section}.mlp_size", mlp)
        if layers < 1:
            fail(f"{section}.layers", f"must be at least 1, not {layers}", f"set '{section}.layers' >= 1")
        dim_key = {"niche": "fusion.dim", "tissue": "fusion.dim"}.get(section, f"{section}.dim")
        if section in ("image", "image_decoder"):
            dim_key = f"{section}.hidden_size"
        positive(dim_key, dim)
        if dim % heads:
            fail(f"{section}.heads", f"({heads}) does not divide {dim_key} ({dim})",
                 "choose a head count that divides the width")
        ratio(f"{section}.dropout", dropout)
    for key, dim in (("image.hidden_size", im.hidden_size),
                     ("image_decoder.hidden_size", config.image_decoder.hidden_size),
                     ("fusion.dim", config.fusion.dim)):
        if dim % 4:
            fail(key, f"({dim}) must be a multiple of 4 (2-D sine-cosine positions)",
                 "choose a multiple of 4")
    if config.fusion.final_layers < 1:
        fail("fusion.final_layers", "must be at least 1", "set it to 1 or more")
    ratio("image.mask_ratio", im.mask_ratio)
    ratio("gene.mask_ratio", config.gene.mask_ratio)
    positive("image.channels", im.channels)
    if im.embed_orientations not in EMBED_ORIENTATION_CHOICES:
        fail("image.embed_orientations", f"must be one of {EMBED_ORIENTATION_CHOICES}, not {im.embed_orientations}",
             f"set it to {ORIENTATIONS} (every orientation of the crop) or 1 (the crop as is)")
    if im.pixel_std is not None:
        positive("image.pixel_std", im.pixel_std)
    if config.gene.max_tokens is not None:
        positive("gene.max_tokens", config.gene.max_tokens)
    ratio("gene.withhold_ratio", config.gene.withhold_ratio)
    if config.gene.target_sum is not None:
        positive("gene.target_sum", config.gene.target_sum)
    positive("gene.max_value", config.gene.max_value)
    weight = config.fusion.morphometry_weight
    if weight is not None and not 0.0 <= weight <= 1.0:
        fail("fusion.morphometry_weight", f"must lie in [0, 1], not {weight}",
             "set it to null (measured from the data), or between 0 (measures off) and 1")
    query_weight = config.fusion.image_query_weight
    if query_weight is not None and not 0.0 <= query_weight <= 1.0:
        fail("fusion.image_query_weight", f"must lie in [0, 1], not {query_weight}",
             "set it to null (the measured morphometry weight), or between 0 (gene query only) and 1 (image queries only)")
    context_ratio = config.fusion.context_ratio
    if context_ratio is not None and not context_ratio > 0.0:
        fail("fusion.context_ratio", f"must be above 0, not {context_ratio}",
             "set it to null (context unbounded) or to a positive share of |z_cell|")
    if config.fusion.gene_residual and not config.gene.profile_token:
        fail("fusion.gene_residual", "needs gene.profile_token (the residual is its embedding)",
             "set gene.profile_token: true, or fusion.gene_residual: false")
    positive("gene_decoder.dim", config.gene_decoder.dim)
    if config.gene_decoder.layers < 0:
        fail("gene_decoder.layers", f"must be 0 or more, not {config.gene_decoder.layers}",
             "set 'gene_decoder.layers' to e.g. 1")
    ratio("gene_decoder.dropout", config.gene_decoder.dropout)
    positive("tissue.grid_size", config.tissue.grid_size)
    positive("train.lr", config.train.lr)
    positive("train.tissues_per_batch", config.train.tissues_per_batch)
    positive("train.cells_per_tissue", config.train.cells_per_tissue)
    if config.train.weight_decay < 0:
        fail("train.weight_decay", "must be 0 or more", "set it to e.g. 0.05")
    for level in ("cell", "niche", "tissue"):
        weights = getattr(config.loss, level)
        for key in ("image", "gene", "morphometry"):
            if getattr(weights, key) < 0:
                fail(f"loss.{level}.{key}", "must be 0 or more", "set the weight to 0 to switch it off")
        if level != "cell" and weights.morphometry != 0:
            fail(f"loss.{level}.morphometry", "is defined for the cell level only (it needs the cell mask)",
                 f"set loss.{level}.morphometry to 0")
