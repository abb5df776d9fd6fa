"""`spatia flow train|generate|evaluate|ablate|crossmodal`: morphology generation (paper sections 4.3, 5.2, 6, Table 11).

Each command builds the stage's typed config (a preset, then an optional YAML/JSON file, then
the options given) with `spatia.config.load_config` and calls the library function (through
`spatia.stages`);
it prints the result's summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, SpatiaGroup, configure_run
from spatia.console import console

flow_app = typer.Typer(cls=SpatiaGroup, help="Morphology generation: train, generate, evaluate, ablate, crossmodal.",
                       no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

PresetOption = Annotated[str, typer.Option("--config", help="Preset (tiny, demo, default) or a YAML/JSON file of "
                                           "settings over the default preset.")]
ConfigFileOption = Annotated[Path | None, typer.Option("--config-file", help="YAML/JSON file of settings applied over "
                                                       "the preset.")]


def _base_and_file(config: str, config_file: Path | None):
    """(preset, settings file): `--config` names a preset, or is itself a file over the default preset."""
    from spatia.flow.config import PRESETS, preset

    if config in PRESETS:
        return preset(config), config_file
    return preset("default"), Path(config) if config_file is None else config_file


def _train_config(config: str, config_file: Path | None, overrides: dict):
    from spatia.config import load_config
    from spatia.flow.config import FlowTrainConfig

    base, file = _base_and_file(config, config_file)
    return load_config(FlowTrainConfig, file, overrides=overrides, base=base.train)


def _print(summary: dict) -> None:
    console.print(json.dumps(summary, indent=2, default=str), highlight=False)


@flow_app.command("train")
def train_command(
    dataset: Annotated[Path, typer.Argument(help="MIST dataset directory (spatia build): the cell crops.")],
    pairs: Annotated[Path, typer.Option("--pairs", help="Folder written by `spatia pair` (pairs.parquet, signatures.npz).")],
    embeddings: Annotated[Path, typer.Option("--embeddings", help="Embeddings .h5ad written by `spatia embed`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="FLOW_DIR to create (must not exist).")],
    config: PresetOption = "default",
    config_file: ConfigFileOption = None,
    condition: Annotated[str, typer.Option("--condition", help="SPATIA embedding of the control: levels (X_spatia + "
                                           "X_spatia_niche + X_spatia_tissue), unified (X_spatia), cell "
                                           "(X_spatia_cell) or none.")] = "levels",
    contrastive_weight: Annotated[float, typer.Option("--contrastive-weight", help="lambda of the contrastive term, in "
                                                      "[0, 1); 0 = plain flow matching.")] = 0.05,
    pair_noise: Annotated[float, typer.Option("--pair-noise", help="Share of training pairs whose targets are swapped "
                                              "within a slide (Table 5).")] = 0.0,
    steps: Annotated[int | None, typer.Option("--steps", help="Flow training steps (default: the preset's).")] = None,
    autoencoder: Annotated[Path | None, typer.Option("--autoencoder", help="Reuse this autoencoder.pt (or FLOW_DIR) "
                                                     "instead of training one.")] = None,
    constant_lr: Annotated[bool, typer.Option("--constant-lr", help="Constant learning rate (no warm-up or decay).",
                                              metavar="")] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0: torch's default).")] = 0,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Train the latent autoencoder (or reuse one) and the conditional contrastive flow."""
    from spatia import stages

    configure_run(quiet)
    cfg = _train_config(config, config_file, {
        "condition": condition, "contrastive_weight": contrastive_weight, "pair_noise": pair_noise,
        "optim.steps": steps, "optim.constant_lr": True if constant_lr else None, "threads": threads or None})
    _print(stages.flow_train(dataset, pairs, embeddings, out, cfg, seed=seed, autoencoder=autoencoder).summary())


@flow_app.command("generate")
def generate_command(
    flow_dir: Annotated[Path, typer.Argument(help="FLOW_DIR written by `spatia flow train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="GEN_DIR to create (must not exist).")],
    steps: Annotated[int, typer.Option("--steps", help="Integration steps from the control latent.")] = 20,
    sampler: Annotated[str, typer.Option("--sampler", help="euler or midpoint.")] = "euler",
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1: plain conditional).")] = 1.5,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Generate the targets of the held-out pairs (arrays with pair IDs, PNG grids)."""
    from spatia.config import load_config
    from spatia import stages
    from spatia.flow import FlowGenerateConfig

    configure_run(quiet)
    cfg = load_config(FlowGenerateConfig, overrides={"steps": steps, "sampler": sampler, "guidance": guidance})
    _print(stages.flow_generate(flow_dir, out, cfg, seed=seed).summary())


@flow_app.command("evaluate")
def evaluate_command(
    generated: Annotated[list[Path], typer.Argument(help="GEN_DIR(s) written by `spatia flow generate`; NAME=DIR "
                                                    "names a variant.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="REPORT_DIR to create (must not exist).")],
    inception: Annotated[Path | None, typer.Option("--inception", help="Local pt_inception-2015-12-05 weights: FID/KID "
                                                   "with the standard Inception-v3.")] = None,
    spatia_checkpoint: Annotated[Path | None, typer.Option("--spatia-checkpoint", help="A `spatia pretrain` checkpoint: "
                                                           "FID/KID on its cell image encoder.")] = None,
    extractor: Annotated[str, typer.Option("--extractor", help="auto (inception if given, else spatia if given, else "
                                           "random), inception, spatia or random.")] = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Score generated crops against the real targets (FID/KID, morphology KS/Wasserstein, PSNR/SSIM)."""
    from spatia.config import load_config
    from spatia import stages
    from spatia.flow import FlowEvaluateConfig

    configure_run(quiet)
    cfg = load_config(FlowEvaluateConfig, overrides={
        "extractor": extractor, "inception_weights": None if inception is None else str(inception),
        "spatia_checkpoint": None if spatia_checkpoint is None else str(spatia_checkpoint)})
    named = {}
    for item in generated:
        name, _, path = str(item).partition("=")
        if path:
            named[name] = Path(path)
    target = named if named else (generated[0] if len(generated) == 1 else {p.name: p for p in generated})
    _print(stages.flow_evaluate(target, out, cfg, seed=seed).summary())


@flow_app.command("ablate")
def ablate_command(
    dataset: Annotated[Path, typer.Argument(help="MIST dataset directory (spatia build).")],
    pairs: Annotated[Path, typer.Option("--pairs", help="Folder written by `spatia pair`.")],
    embeddings: Annotated[Path, typer.Option("--embeddings", help="Embeddings .h5ad written by `spatia embed`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist).")],
    config: PresetOption = "default",
    config_file: ConfigFileOption = None,
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated variants.")] =
        "spatia,spatia_unified,cell_only,no_contrastive,unconditional,pair_noise_0.1,pair_noise_0.2",
    inception: Annotated[Path | None, typer.Option("--inception", help="Local pt_inception-2015-12-05 weights.")] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Train, generate and evaluate every variant on the same split and seed (Tables 5, 6, 12)."""
    from spatia.config import load_config
    from spatia import stages
    from spatia.flow import FlowAblateConfig

    configure_run(quiet)
    base, file = _base_and_file(config, config_file)
    cfg = load_config(FlowAblateConfig, file, base=base, overrides={
        "variants": tuple(v.strip() for v in variants.split(",") if v.strip()),
        "evaluate.inception_weights": None if inception is None else str(inception)})
    _print(stages.flow_ablate(dataset, pairs, embeddings, out, cfg, seed=seed).summary())


@flow_app.command("crossmodal")
def crossmodal_command(
    dataset: Annotated[Path, typer.Argument(help="MIST dataset directory (spatia build): the real cell crops.")],
    gene_embeddings: Annotated[Path, typer.Option("--gene-embeddings", help="Embeddings .h5ad written by "
                                                  "`spatia embed --modality gene`.")],
    flow_dir: Annotated[Path, typer.Option("--flow", help="FLOW_DIR of `spatia flow train`: its frozen autoencoder "
                                           "decodes the generated latents.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder to create (must not exist).")],
    label_key: Annotated[str, typer.Option("--label-key", help="obs column of the label-mean-crop baseline (auto: "
                                           "truth_cell_type, else the bundle's first clustering).")] = "auto",
    steps: Annotated[int, typer.Option("--steps", help="Training steps of the embedding -> latent MLP.")] = 1500,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Cross-modal generation (Table 11): a cell image from its gene-only embedding, scored by PSNR/SSIM."""
    from spatia import stages
    from spatia.config import load_config
    from spatia.flow import CrossModalConfig

    configure_run(quiet)
    cfg = load_config(CrossModalConfig, overrides={"label_key": label_key, "steps": steps})
    _print(stages.flow_crossmodal(dataset, gene_embeddings, flow_dir, out, cfg, seed=seed).summary())
