"""Typed configuration of the flow stages (`spatia flow train|generate|evaluate|ablate`).

Plain frozen dataclasses: the CLI fills them through `spatia.config.load_config`; `PRESETS`
holds the named starting points (`tiny`, `demo`). Every field is documented in docs/flow.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Condition = Literal["unified", "cell", "levels", "none"]
Sampler = Literal["euler", "midpoint"]
Holdout = Literal["split", "random"]
NoiseScope = Literal["slide", "transition_slide"]

# obsm keys of the frozen SPATIA embedding per condition mode (`spatia embed` writes them);
# several keys are concatenated. "levels" (the default): the unified embedding plus the niche and
# tissue levels the checkpoint has, the spatial context stated explicitly: on the simulator it
# carries the niche-dependent part of the shift that the unified embedding alone does not
# (docs/flow.md, "Which SPATIA embedding conditions the flow")
CONDITION_KEYS: dict[str, tuple[str, ...]] = {
    "unified": ("X_spatia",), "cell": ("X_spatia_cell",),
    "levels": ("X_spatia", "X_spatia_niche", "X_spatia_tissue"), "none": ()}
# keys of a condition that may be absent (a checkpoint whose stage ran no niche or tissue level)
OPTIONAL_CONDITION_KEYS: frozenset[str] = frozenset({"X_spatia_niche", "X_spatia_tissue"})
# the condition of the full model's variants (spatia, no_contrastive, pair_noise_*)
SPATIA_CONDITION: Condition = "levels"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Latent autoencoder of cell crops (image channel + cell mask -> latent map)."""

    latent_channels: int = 4        # latent map (latent_channels, S / 2**downsamples, ...)
    downsamples: int = 3            # 64 px -> 8 x 8
    width: int = 32                 # channels after the stem; doubled at each downsample (capped 4x)
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    mask_weight: float = 0.1        # weight of the mask BCE next to the image MSE
    gradient_weight: float = 0.0    # weight of the L1 loss on image gradients (keeps chromatin texture)
    max_cells: int = 20000          # training cells drawn (seeded) from those below
    cells: Literal["pairs", "dataset"] = "pairs"  # cells of the training pairs, or every MIST train cell


@dataclass(frozen=True)
class FlowModelConfig:
    """Velocity network v_theta(l_t, t | z_ctrl, e_pert) with FiLM in every block."""

    width: int = 64                 # channels of the residual blocks
    blocks: int = 4
    cond_dim: int = 128             # size of the time / condition vectors fed to FiLM
    signature_pcs: int = 8          # components of the signature PCA (at most the transitions)
    condition_dropout: float = 0.1  # each condition (z_ctrl, e_pert) dropped independently
    patch: int = 1                  # blocks run on patch x patch cells of the latent map (1 = every position)
    embedding_pcs: int = 0          # > 0: condition on this many principal components of z_ctrl only


@dataclass(frozen=True)
class FlowOptimConfig:
    """Optimiser, schedule, EMA and clipping of the flow training loop."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    constant_lr: bool = False       # False: linear warm-up then cosine decay to 10%
    warmup_steps: int = 50
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    # early stopping: this share of each transition's training pairs is kept out of training; every
    # `validate_every` steps the sampling weights are scored by the flow-matching loss on them and
    # the best are kept (0 = off: train all pairs, keep the last weights)
    validation_fraction: float = 0.0
    validate_every: int = 50
    ema_decay: float = 0.995        # EMA of the weights used for sampling (0 = off)


@dataclass(frozen=True)
class FlowTrainConfig:
    """`flow_train`: autoencoder + conditional contrastive flow matching."""

    condition: Condition = SPATIA_CONDITION
    contrastive_weight: float = 0.05   # lambda in [0, 1); 0 turns the contrastive term off
    pair_noise: float = 0.0            # share of training pairs whose targets are swapped (Table 5)
    pair_noise_scope: NoiseScope = "slide"
    holdout: Holdout = "split"         # "split": pairs whose control is in the MIST val/test split
    holdout_fraction: float = 0.2      # "random" holdout (and the fallback when a split is empty)
    weight_by_match_score: bool = True
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    optim: FlowOptimConfig = field(default_factory=FlowOptimConfig)
    threads: int = 0                   # torch intra-op threads (0 = leave torch's default)


@dataclass(frozen=True)
class FlowGenerateConfig:
    """`flow_generate`: integrate the learned field from the control latent."""

    steps: int = 20
    sampler: Sampler = "euler"
    # classifier-free guidance scale (1 = plain conditional); 1.5 measured best on the simulator
    # (docs/flow.md, "Which SPATIA embedding conditions the flow, and guidance")
    guidance: float = 1.5
    batch_size: int = 256
    grid_rows: int = 8                 # examples per transition in the PNG grids


@dataclass(frozen=True)
class FlowEvaluateConfig:
    """`flow_evaluate`: FID/KID, CellProfiler-style statistics, PSNR/SSIM."""

    extractor: Literal["auto", "inception", "spatia", "random"] = "auto"
    inception_weights: str | None = None   # local pt_inception-2015-12-05 state dict
    spatia_checkpoint: str | None = None   # `spatia pretrain` checkpoint for the SPATIA encoder
    kid_subsets: int = 50
    kid_subset_size: int = 1000            # capped at the smaller image count
    min_images_warning: int = 2048
    nucleus_threshold: float = 0.5         # nucleus mask: > this share of the crop's 99th percentile
    random_feature_seed: int = 0
    references: bool = True                # also score the autoencoder references (see evaluate.py)


@dataclass(frozen=True)
class FlowAblateConfig:
    """`flow_ablate`: every variant on the same split and seed."""

    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    generate: FlowGenerateConfig = field(default_factory=FlowGenerateConfig)
    evaluate: FlowEvaluateConfig = field(default_factory=FlowEvaluateConfig)
    variants: tuple[str, ...] = ("spatia", "spatia_unified", "cell_only", "no_contrastive", "unconditional",
                                 "pair_noise_0.1", "pair_noise_0.2")


def variant_train_config(base: FlowTrainConfig, variant: str) -> FlowTrainConfig:
    """The training config of one named ablation variant, derived from `base`.

    spatia: the full model (`SPATIA_CONDITION`, the unified embedding and its spatial levels);
    spatia_unified: `X_spatia` alone; cell_only: `X_spatia_cell` (Tables 6 and 12);
    no_contrastive: lambda = 0; unconditional: no SPATIA embedding (the perturbation embedding
    stays); pair_noise_<f>: a share f of the training targets swapped within their slide (Table 5).
    """
    if variant == "spatia":
        return replace(base, condition=SPATIA_CONDITION)
    if variant == "spatia_unified":
        return replace(base, condition="unified")
    if variant == "cell_only":
        return replace(base, condition="cell")
    if variant == "no_contrastive":
        return replace(base, condition=SPATIA_CONDITION, contrastive_weight=0.0)
    if variant == "unconditional":
        return replace(base, condition="none")
    if variant.startswith("pair_noise_"):
        return replace(base, condition=SPATIA_CONDITION, pair_noise=float(variant.removeprefix("pair_noise_")))
    from spatia.errors import ConfigError

    raise ConfigError(f"unknown flow variant {variant!r}",
                      fix="use spatia, spatia_unified, cell_only, no_contrastive, unconditional or pair_noise_<fraction>")


def _tiny() -> FlowAblateConfig:
    """Seconds on one core: plumbing tests."""
    return FlowAblateConfig(
        train=FlowTrainConfig(
            autoencoder=AutoencoderConfig(width=8, steps=30, batch_size=32, max_cells=512),
            model=FlowModelConfig(width=16, blocks=2, cond_dim=32),
            optim=FlowOptimConfig(steps=30, batch_size=32, warmup_steps=5),
        ),
        generate=FlowGenerateConfig(steps=4, grid_rows=4),
        evaluate=FlowEvaluateConfig(kid_subsets=10),
    )


def _demo() -> FlowAblateConfig:
    """About 2 minutes on 2 cores for train + generate + evaluate of one variant (5,000 cells).

    The 4 x 16 x 16 latent (two downsamplings) keeps the chromatin texture that a 4 x 8 x 8 one
    blurs away; the velocity network runs on 2 x 2 patches of it (8 x 8 positions)."""
    return FlowAblateConfig(
        train=FlowTrainConfig(
            autoencoder=AutoencoderConfig(downsamples=2, width=16, steps=250, batch_size=32, max_cells=4000),
            model=FlowModelConfig(width=32, blocks=3, cond_dim=64, patch=2),
            optim=FlowOptimConfig(steps=500, batch_size=64, warmup_steps=30),
            threads=1,  # these small convolutions gain little from a second thread and lose much on a busy machine
        ),
        generate=FlowGenerateConfig(steps=10),
        evaluate=FlowEvaluateConfig(kid_subsets=20),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "default": FlowAblateConfig}


def preset(name: str) -> FlowAblateConfig:
    """A named preset (`tiny`, `demo`, `default`)."""
    if name not in PRESETS:
        from spatia.errors import ConfigError

        raise ConfigError(f"unknown flow preset {name!r}", fix=f"use one of {sorted(PRESETS)}")
    return PRESETS[name]()
