"""`spatia evaluate`: embeddings and baselines scored on one spatially disjoint split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run, given_on_command_line, print_summary
from spatia.console import console


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    cells: Annotated[Path, typer.Argument(help="AnnData (.h5ad): raw counts, labels, obsm['spatial'] in um, X_spatia* embeddings.")],
    labels: Annotated[list[str], typer.Option("--labels", "-l", help="obs column with cell labels (repeatable: "
                                              "e.g. cell type, state and domain scored in one run).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory to create (must not exist).")],
    split: Annotated[str | None, typer.Option("--split", help="obs column with train/test(/buffer); default: the split a spatia embed output carries (the model's own), else spatial blocks.")] = None,
    slide: Annotated[str | None, typer.Option("--slide", help="obs column naming each cell's slide (blocks never span slides); default: one slide.")] = None,
    mist: Annotated[Path | None, typer.Option("--mist", help="MIST dataset directory: its cell crops feed the morphology baseline (and the imputer, with --checkpoint).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="`spatia pretrain` checkpoint: impute held-out genes with its gene decoder (needs --mist).")] = None,
    device: Annotated[str, typer.Option("--device", help="Device for the gene-decoder imputer: cpu, cuda or auto.")] = "auto",
    crops: Annotated[Path | None, typer.Option("--crops", help=".npz with images, masks, cell_id for the morphology baseline.")] = None,
    image_embeddings: Annotated[Path | None, typer.Option("--image-embeddings", help=".h5ad of `spatia embed --modality image`: its X_spatia_image (and X_spatia_image_niche) join the embeddings.")] = None,
    gene_embeddings: Annotated[Path | None, typer.Option("--gene-embeddings", help=".h5ad of `spatia embed --modality gene`: its X_spatia_gene joins the embeddings.")] = None,
    embedding: Annotated[list[str] | None, typer.Option("--embedding", "-e", help="obsm key to score (repeatable); default: every X_spatia* key.")] = None,
    compare: Annotated[list[str] | None, typer.Option("--compare", help="ROW_A:ROW_B (repeatable): also bootstrap A's annotation MLP macro-F1 minus B's, e.g. X_spatia_gene:autoencoder (in metrics.json).")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="annotation, clustering, expression, imputation (repeatable); default: all.")] = None,
    n_seeds: Annotated[int, typer.Option("--n-seeds", help="Seeds per stochastic model.")] = 3,
    max_cells: Annotated[int | None, typer.Option("--max-cells", help="Evaluate a seeded random subset of this many cells (default: all).")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML file of EvaluateConfig settings; options given here win.")] = None,
    layout: Annotated[str, typer.Option("--layout", help="2-D layout figure: umap, pca (fast) or none.")] = "umap",
    baseline_fit: Annotated[str, typer.Option("--baseline-fit", help="Cells PCA, the count autoencoder and scVI are fit on: train (the split's train cells, as SPATIA trains) or all (transductive).")] = "train",
    n_jobs: Annotated[int, typer.Option("--n-jobs", help="Threads for XGBoost/BLAS.")] = 1,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Score SPATIA embeddings and baselines (annotation, clustering, expression from morphology,
    imputation) on one spatially disjoint split; write metrics.json, report.md and report.html."""
    from spatia import stages
    from spatia.config import load_config
    from spatia.evaluate import EvaluateConfig

    configure_run(quiet)
    inputs = load_config(stages.EvaluateInputs, overrides={
        "mist": mist, "checkpoint": checkpoint, "crops": crops, "image_embeddings": image_embeddings,
        "gene_embeddings": gene_embeddings, "device": device})
    config = load_config(EvaluateConfig, {"labels": tuple(labels)}, config_file, overrides={
        "labels": tuple(labels), "split": split, "slide": slide, "max_cells": max_cells,
        "embeddings": tuple(embedding) if embedding else None, "tasks": tuple(task) if task else None,
        "compare": tuple(compare) if compare else None,
        **given_on_command_line(ctx, {"n_seeds": n_seeds, "layout": layout, "n_jobs": n_jobs, "seed": seed,
                                      "baseline_fit": baseline_fit})})
    result = stages.evaluate(cells, out, config, inputs)
    print_summary(result.summary(), quiet=quiet)
    console.print(f"evaluation report written to {out} (metrics.json, report.md, report.html)", highlight=False)
