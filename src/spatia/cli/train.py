"""`spatia pretrain` and `spatia embed`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run
from spatia.console import console


@app.command("pretrain")
def pretrain_command(
    dataset: Annotated[Path, typer.Argument(help="MIST dataset directory (`spatia build`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: new or empty (or the run to --resume).")],
    config: Annotated[
        str | None, typer.Option("--config", help="tiny, base or a YAML file (default: tiny, or the checkpoint's).")
    ] = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="cell, niche, tissue or joint (default joint; schedule: cell -> niche -> tissue -> joint).")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option("--from", help="Start from this checkpoint's weights (the previous stage).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted run of OUT exactly from this checkpoint.")
    ] = None,
    image_weights: Annotated[
        Path | None, typer.Option("--image-weights", help="Local ViTMAE directory for the image encoders.")
    ] = None,
    gene_embeddings: Annotated[
        Path | None, typer.Option("--gene-embeddings", help="Local gene-vector table (.tsv/.csv/.parquet).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimiser steps (train.max_steps).")] = None,
    max_epochs: Annotated[int | None, typer.Option("--max-epochs", help="Cap in epochs (train.max_epochs).")] = None,
    val_every: Annotated[int | None, typer.Option("--val-every", help="Validate every N steps.")] = None,
    val_batches: Annotated[int | None, typer.Option("--val-batches", help="Batches per validation (0: none).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Write last.ckpt every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="Log losses every N steps.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (train.lr).")] = None,
    tissues_per_batch: Annotated[int | None, typer.Option("--tissues-per-batch", help="Tissue regions per batch.")] = None,
    cells_per_tissue: Annotated[int | None, typer.Option("--cells-per-tissue", help="Cells drawn per tissue region.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="DataLoader worker processes per device.")] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision.")
    ] = None,
    devices: Annotated[str, typer.Option("--devices", help="Devices per node (several: DDP), -1 or auto for all.")] = "1",
    num_nodes: Annotated[int, typer.Option("--num-nodes", help="Nodes (multi-node DDP).")] = 1,
    accelerator: Annotated[str, typer.Option("--accelerator", help="auto, cpu or gpu.")] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads per process (on a shared 2-core machine: 1).")
    ] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Pretrain one SPATIA stage (Lightning): checkpoints, config.yaml, genes.txt, logs/metrics.csv
    and spatia_run.json in OUT.

    The paper's schedule is four runs, each started --from the previous one's last.ckpt:
    --stage cell, niche, tissue, then joint. An interrupted run continues exactly with
    --resume OUT/checkpoints/last.ckpt -o OUT.
    """
    from spatia import stages
    from spatia.config import load_config
    from spatia.train.pretrain import env_rank_is_zero, quiet_lightning

    configure_run(quiet)
    quiet_lightning(quiet)
    train_overrides = {
        "max_steps": max_steps, "max_epochs": max_epochs, "val_every_n_steps": val_every, "val_batches": val_batches,
        "checkpoint_every_n_steps": checkpoint_every, "log_every_n_steps": log_every, "lr": lr,
        "tissues_per_batch": tissues_per_batch, "cells_per_tissue": cells_per_tissue, "num_workers": workers,
        "precision": precision,
    }
    run_config = load_config(stages.PretrainConfig, overrides={
        "model": config, "stage": stage, "init_from": init_from, "resume": resume, "image_weights": image_weights,
        "gene_embeddings": gene_embeddings, "devices": devices, "num_nodes": num_nodes, "accelerator": accelerator,
        "threads": threads, "progress_bar": not quiet,
        "model_overrides": {f"train.{k}": v for k, v in train_overrides.items() if v is not None}})
    result = stages.pretrain(dataset, out, run_config, seed=seed).detail
    if not env_rank_is_zero():  # another DDP rank: the first one reports
        return
    total = result.metrics.get("train/total")
    console.print(
        f"stage {result.stage}: {result.global_step} steps"
        + (f", last train/total {total:.4f}" if total is not None else "")
        + f"; checkpoint {result.last_checkpoint}",
        highlight=False,
    )


@app.command("embed")
def embed_command(
    dataset: Annotated[Path, typer.Argument(help="MIST dataset directory (`spatia build`).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A .ckpt written by `spatia pretrain`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="AnnData file to write (.h5ad; must not exist).")],
    modality: Annotated[
        str, typer.Option("--modality", help="both, image (genes withheld) or gene (images withheld).")
    ] = "both",
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Embed cells of this split (repeatable; default: all).")
    ] = None,
    batch_cells: Annotated[
        int, typer.Option("--batch-cells", help="Cells per batch (whole tissue regions are kept together).")
    ] = 512,
    devices: Annotated[str, typer.Option("--devices", help="Devices per node (several: DDP), -1 or auto for all.")] = "1",
    num_nodes: Annotated[int, typer.Option("--num-nodes", help="Nodes.")] = 1,
    accelerator: Annotated[str, typer.Option("--accelerator", help="auto, cpu or gpu.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16-mixed on GPU, 32-true on CPU) or a Lightning precision.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes per device.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per process.")] = None,
    orientations: Annotated[int | None, typer.Option(
        "--orientations", help="Average over this many orientations of each cell crop: 8 or 1 (as is, faster); "
        "default: the checkpoint's (8).")] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Embed every cell of a MIST dataset with a trained checkpoint into an AnnData: obsm X_spatia,
    X_spatia_cell, X_spatia_niche, X_spatia_tissue and spatial (um), obs from the dataset's cell
    index, raw counts in X. The run record goes beside it as OUT_STEM.spatia_run.json.
    """
    from spatia import stages
    from spatia.config import load_config
    from spatia.train.pretrain import quiet_lightning

    configure_run(quiet)
    quiet_lightning(quiet)
    config = load_config(stages.EmbedConfig, overrides={
        "modality": modality, "splits": tuple(split) if split else None, "batch_cells": batch_cells,
        "devices": devices, "num_nodes": num_nodes, "accelerator": accelerator, "precision": precision,
        "workers": workers, "threads": threads, "progress_bar": not quiet, "orientations": orientations})
    result = stages.embed(dataset, checkpoint, out, config, seed=seed)
    if result.path is None:  # another DDP rank: the first one writes
        return
    detail = result.detail
    console.print(f"wrote {out}: {detail.n_cells:,} cells, {', '.join(detail.obsm_keys)} "
                  f"({detail.cells_per_second:,.0f} cells/s)", highlight=False)
    for key in ("note", "hint"):
        if key in result.figures and not quiet:
            console.print(f"{key}: {result.figures[key]}", highlight=False, markup=False)
