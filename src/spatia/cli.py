"""The `spatia` command: one Typer app, one subcommand per pipeline stage.

Commands are thin: they parse options, call the library, and record the resolved config, seed
and package version next to their outputs. User mistakes (`SpatiaError`) are printed without a
traceback and exit with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from spatia import __version__
from spatia.console import configure, console
from spatia.errors import SpatiaError

USER_ERROR_EXIT_CODE = 2


class _SpatiaGroup(TyperGroup):
    """Turns `SpatiaError` into a short message and exit code 2, for every command."""

    def invoke(self, ctx):  # noqa: D102
        try:
            return super().invoke(ctx)
        except SpatiaError as error:
            console.print(f"[bold red]error:[/bold red] {error.message}", markup=True, highlight=False)
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None


app = typer.Typer(
    cls=_SpatiaGroup,
    name="spatia",
    help="SPATIA: multi-scale cell representations from Xenium spatial transcriptomics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed; same inputs and seed give the same outputs.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spatia {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """SPATIA: multi-scale cell representations from Xenium spatial transcriptomics."""


# ---------------------------------------------------------------------------------------------
# Commands are added below, one section per stage (io, mist, model, evaluate, perturb, demo).
# ---------------------------------------------------------------------------------------------


# --- io: spatia info -------------------------------------------------------------------------


@app.command("info")
def info(
    bundle: Annotated[Path, typer.Argument(help="Xenium output folder (the 'outs' folder).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")] = False,
    he_image: Annotated[
        Path | None, typer.Option("--he-image", help="Optional registered H&E image (OME-TIFF, RGB).")
    ] = None,
    he_alignment: Annotated[
        Path | None, typer.Option("--he-alignment", help="10x H&E alignment CSV (3x3, H&E px -> morphology px).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Summarise a Xenium bundle: cells, genes, controls, image, pixel size, extent, clusters, problems.

    Reads only; writes nothing (so no run record).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from spatia.io import read_xenium

    configure(quiet)
    summary = read_xenium(bundle, he_image=he_image, he_alignment=he_alignment).summary()
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
        return
    out = Console()
    table = Table(title=f"Xenium bundle {summary['slide_id']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    image = summary["image"]
    extent = summary["extent_um"]
    rows = [
        ("path", summary["path"]),
        ("cells", f"{summary['n_cells']:,}"),
        ("genes", f"{summary['n_genes']:,} ({summary['total_gene_counts']:,} counts)"),
        ("controls", f"{summary['n_controls']} " + ", ".join(f"{k}: {v}" for k, v in summary["control_types"].items())),
        ("image", f"{image['path']} ({image['dtype']}, z planes: {image['n_z']})"),
        ("channels", ", ".join(image["channels"])),
        ("levels (h x w px)", ", ".join(f"{h} x {w}" for h, w in image["levels_yx"])),
        ("pixel size", f"{summary['pixel_size_um']} um/px (from {summary['pixel_size_source']})"),
        ("image extent", f"{extent['image_width_um']:.1f} x {extent['image_height_um']:.1f} um"),
        (
            "cell centroids",
            f"x {extent['cells_x_min_um']:.1f}..{extent['cells_x_max_um']:.1f} um, "
            f"y {extent['cells_y_min_um']:.1f}..{extent['cells_y_max_um']:.1f} um",
        ),
        ("cell boundaries", "absent" if summary["cells_with_boundary"] is None else f"{summary['cells_with_boundary']:,} cells"),
        (
            "nucleus boundaries",
            "absent" if summary["cells_with_nucleus_boundary"] is None else f"{summary['cells_with_nucleus_boundary']:,} cells",
        ),
        (
            "clusterings",
            "none"
            if not summary["clusterings"]
            else "\n".join(
                f"{name}: {c['n_clusters']} clusters, {c['n_cells_assigned']:,} cells" for name, c in summary["clusterings"].items()
            ),
        ),
        ("H&E image", summary["he_image"] or "none"),
        ("problems", "none" if not summary["problems"] else "\n".join(summary["problems"])),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)


# --- io: spatia simulate ---------------------------------------------------------------------


@app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Argument(help="Output folder for the simulated Xenium bundle (must not exist).")],
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 20_000,
    genes: Annotated[int, typer.Option("--genes", help="Gene panel size (negative controls come on top).")] = 300,
    layout: Annotated[
        str, typer.Option("--layout", help="v1: morphology_focus.ome.tif; v2: morphology_focus/ per-channel files.")
    ] = "v1",
    z_planes: Annotated[
        int, typer.Option("--z-planes", help="Also write a morphology.ome.tif z-stack with this many planes (0: none).")
    ] = 0,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Simulate a tissue section with known ground truth and write it as a Xenium bundle.

    Besides the Xenium files, OUT holds ground_truth.parquet (one row per cell) and ground_truth.json.

    ground_truth.json is the designed world: domains, states, transitions, DE genes, morphology shifts.

    OUT is built under a temporary name and renamed when complete; an existing OUT is never overwritten.
    """
    from spatia.io.simulate import SimulationConfig, simulate_bundle

    configure(quiet)
    config = SimulationConfig(n_cells=cells, n_genes=genes, layout=layout, z_planes=z_planes)  # type: ignore[arg-type]
    result = simulate_bundle(out, config, seed=seed)
    console.print(
        f"wrote {result.path}: {result.n_cells:,} cells, {result.n_genes} genes, "
        f"{result.width_px} x {result.height_px} px, layout {result.layout}"
        + (f", {result.z_planes} z planes" if result.z_planes else ""),
        highlight=False,
    )


# --- mist: spatia build, spatia dataset-info -------------------------------------------------


def _parse_fractions(text: str) -> tuple[float, float, float]:
    from spatia.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--split-fractions {text!r} is not three numbers", fix="use e.g. --split-fractions 0.8,0.1,0.1")
    return values  # type: ignore[return-value]


def _parse_slide_splits(items: list[str]) -> dict[str, str]:
    from spatia.errors import ConfigError

    out = {}
    for item in items:
        slide, sep, split = item.rpartition("=")
        if not sep or not slide:
            raise ConfigError(f"--slide-split {item!r} is not SLIDE_ID=SPLIT", fix="use e.g. --slide-split donor7_region1=test")
        out[slide] = split
    return out


@app.command("build")
def build(
    bundles: Annotated[list[Path], typer.Argument(help="Xenium output folders, one per slide.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Dataset directory: new, or an interrupted build of the same inputs (resumed).")
    ],
    preset: Annotated[str, typer.Option("--preset", help="cpu (crop 64, niche 64, tissue 128 px) or paper (224 px each).")] = "cpu",
    cell_size: Annotated[int | None, typer.Option("--cell-size", help="Cell crop side in px (overrides the preset).")] = None,
    niche_size: Annotated[int | None, typer.Option("--niche-image-size", help="Stored niche image side in px.")] = None,
    tissue_size: Annotated[int | None, typer.Option("--tissue-image-size", help="Stored tissue-region image side in px.")] = None,
    scale_percentile: Annotated[
        float | None, typer.Option("--scale-percentile", help="Percentile of cell sizes that fills the crop (paper: 100).")
    ] = None,
    min_counts: Annotated[int | None, typer.Option("--min-counts", help="Skip cells with fewer counts (default 1).")] = None,
    channel: Annotated[int | None, typer.Option("--channel", help="Morphology image channel (0 = DAPI).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="blocks (spatial blocks in each slide) or slides.")] = None,
    split_fractions: Annotated[str | None, typer.Option("--split-fractions", help="train,val,test fractions.")] = None,
    split_block_tissues: Annotated[
        int | None, typer.Option("--split-block-tissues", help="Split block side in 1024 px tissue regions.")
    ] = None,
    split_buffer_um: Annotated[
        float | None, typer.Option("--split-buffer-um", help="Train cells this close to val/test blocks become 'buffer'.")
    ] = None,
    slide_split: Annotated[
        list[str] | None, typer.Option("--slide-split", help="SLIDE_ID=train|val|test (repeatable; --split slides).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes rendering chunks (0: in this process).")] = 0,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Build a MIST dataset (cells, 256 px niches, 1024 px tissue regions) from Xenium bundles.

    Writes LMDB stores, Parquet indexes and manifest.json into OUT; manifest.json comes last
    and marks the dataset complete. Rerun the same command to resume an interrupted build.
    """
    from rich.table import Table

    from spatia.mist import BuildConfig, build_dataset

    configure(quiet)
    if workers < 0:
        from spatia.errors import ConfigError

        raise ConfigError(f"--workers {workers} is negative", fix="use 0 (in this process) or a positive number")
    config = BuildConfig.from_preset(
        preset,
        cell_image_px=cell_size,
        niche_image_px=niche_size,
        tissue_image_px=tissue_size,
        scale_percentile=scale_percentile,
        min_counts=min_counts,
        image_channel=channel,
        split_mode=split,
        split_fractions=_parse_fractions(split_fractions) if split_fractions else None,
        split_block_tissues=split_block_tissues,
        split_buffer_um=split_buffer_um,
        slide_splits=_parse_slide_splits(slide_split) if slide_split else None,
    )
    summary = build_dataset(bundles, out, config, seed=seed, workers=workers)
    if quiet:
        return
    table = Table(title=f"MIST dataset {summary.path}", show_header=False)
    table.add_row("slides / genes", f"{summary.n_slides} / {summary.n_genes}")
    table.add_row("records", f"{summary.n_cells:,} cells, {summary.n_niches:,} niches, {summary.n_tissues:,} tissue regions")
    skipped = {k: v for k, v in summary.skipped.items() if v}
    table.add_row("skipped cells", ", ".join(f"{k}: {v:,}" for k, v in skipped.items()) or "none")
    repaired = {k: v for k, v in summary.repaired.items() if v}
    table.add_row("repaired polygons", ", ".join(f"{k}: {v:,}" for k, v in repaired.items()) or "none")
    table.add_row("clipped by the crop scale", f"{summary.n_clipped:,} cells")
    table.add_row("splits (cells)", ", ".join(f"{k}: {v:,}" for k, v in summary.splits.get("cell", {}).items()))
    table.add_row("chunks", f"{summary.chunks_rendered} rendered, {summary.chunks_resumed} resumed")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.cells_per_second:,.0f} cells/s)")
    console.print(table)


@app.command("dataset-info")
def dataset_info_command(
    dataset: Annotated[Path, typer.Argument(help="A MIST dataset directory written by `spatia build`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Summarise a MIST dataset: levels, image sizes, slides, splits, skipped cells, disk use."""
    import json

    from rich.console import Console
    from rich.table import Table

    from spatia.mist.info import dataset_info

    info = dataset_info(dataset)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    out = Console()
    table = Table(title=f"MIST dataset {info['path']}", show_header=False)
    table.add_row("format", f"{info['format']}, preset {info['preset']}, seed {info['seed']}, built {info['created_utc']}")
    table.add_row("genes", f"{info['n_genes']:,}")
    for level, entry in info["levels"].items():
        splits = ", ".join(f"{k}: {v:,}" for k, v in entry["splits"].items())
        table.add_row(
            f"{level} level",
            f"{entry['n_records']:,} records, {entry['image_px']} px images, "
            f"{entry['store_bytes'] / 2**20:,.1f} MiB; splits {splits}",
        )
    table.add_row("skipped cells", ", ".join(f"{k}: {v:,}" for k, v in info["skipped"].items() if v) or "none")
    table.add_row("repaired polygons", ", ".join(f"{k}: {v:,}" for k, v in info["repaired"].items() if v) or "none")
    for slide in info["slides"]:
        table.add_row(
            f"slide {slide['slide_id']}",
            f"{slide['n_cells']:,} of {slide['n_cells_input']:,} cells, {slide['n_niches']:,} niches, "
            f"{slide['n_tissues']:,} regions, {slide['n_genes_measured']} genes, scale {slide['scale_factor']:.3f} "
            f"({slide['n_clipped']} clipped), intensity {slide['intensity_range'][0]:.0f}..{slide['intensity_range'][1]:.0f}",
        )
    table.add_row("size on disk", f"{info['total_bytes'] / 2**20:,.1f} MiB")
    out.print(table)


# --- evaluate ----------------------------------------------------------------------------------


@app.command("evaluate")
def evaluate_command(
    cells: Annotated[Path, typer.Argument(help="AnnData (.h5ad): raw counts, labels, obsm['spatial'] in um, X_spatia* embeddings.")],
    labels: Annotated[str, typer.Option("--labels", "-l", help="obs column with the cell labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory to create (must not exist).")],
    split: Annotated[str | None, typer.Option("--split", help="obs column with train/test(/buffer); default: spatial blocks.")] = None,
    slide: Annotated[str | None, typer.Option("--slide", help="obs column naming each cell's slide (blocks never span slides).")] = None,
    mist: Annotated[Path | None, typer.Option("--mist", help="MIST dataset directory: its cell crops feed the morphology baseline (and the imputer, with --checkpoint).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="`spatia pretrain` checkpoint: impute held-out genes with its gene decoder (needs --mist).")] = None,
    device: Annotated[str, typer.Option("--device", help="Device for the gene-decoder imputer: cpu, cuda or auto.")] = "auto",
    crops: Annotated[Path | None, typer.Option("--crops", help=".npz with images, masks, cell_id for the morphology baseline.")] = None,
    image_embeddings: Annotated[Path | None, typer.Option("--image-embeddings", help=".h5ad of `spatia embed --modality image`: its X_spatia becomes X_spatia_image.")] = None,
    gene_embeddings: Annotated[Path | None, typer.Option("--gene-embeddings", help=".h5ad of `spatia embed --modality gene`: its X_spatia becomes X_spatia_gene.")] = None,
    embedding: Annotated[list[str] | None, typer.Option("--embedding", "-e", help="obsm key to score (repeatable); default: every X_spatia* key.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="annotation, clustering, expression, imputation (repeatable); default: all.")] = None,
    n_seeds: Annotated[int | None, typer.Option("--n-seeds", help="Seeds per stochastic model (default 3).")] = None,
    max_cells: Annotated[int | None, typer.Option("--max-cells", help="Evaluate a seeded random subset of this many cells.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML file of EvaluateConfig settings; options given here win.")] = None,
    layout: Annotated[str | None, typer.Option("--layout", help="2-D layout figure: umap (default), pca (fast) or none.")] = None,
    n_jobs: Annotated[int | None, typer.Option("--n-jobs", help="Threads for XGBoost/BLAS (default 1).")] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Score SPATIA embeddings and baselines (annotation, clustering, expression from morphology,
    imputation) on one spatially disjoint split; write metrics.json, report.md and report.html."""
    configure(quiet)
    import yaml

    from spatia.errors import ConfigError, InputDataError
    from spatia.evaluate import (
        EvaluateConfig,
        add_modality_embedding,
        crops_from_mist,
        evaluate,
        load_crops_npz,
        write_report,
    )
    from spatia.outputs import refuse_existing, write_run_record

    refuse_existing(out, what="report directory")
    if checkpoint is not None and mist is None:
        raise ConfigError("--checkpoint was given without --mist",
                          fix="also give the MIST dataset the embeddings came from: the imputer reads its images and context")
    if mist is not None and crops is not None and checkpoint is None:
        raise ConfigError("both --mist and --crops were given", fix="give one source of crops")
    values: dict = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read the evaluate config: {error}", path=config_file,
                              fix="give a YAML mapping of EvaluateConfig settings") from None
        if not isinstance(loaded, dict):
            raise ConfigError("the evaluate config is not a YAML mapping", path=config_file,
                              fix="write key: value lines, e.g. n_seeds: 3")
        values.update(loaded)
    overrides = {"labels": labels, "split": split, "slide": slide, "n_seeds": n_seeds, "max_cells": max_cells,
                 "layout": layout,
                 "n_jobs": n_jobs, "embeddings": tuple(embedding) if embedding else None,
                 "tasks": tuple(task) if task else None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["seed"] = seed
    config = EvaluateConfig.from_mapping(values, path=config_file)

    import anndata

    def read(path: Path):
        if not path.exists():
            raise InputDataError("the AnnData file does not exist", path=path, fix="give a .h5ad written by `spatia embed`")
        try:
            return anndata.read_h5ad(path)
        except Exception as error:  # h5py/anndata raise many types for a bad file
            raise InputDataError(f"cannot read the AnnData: {error}", path=path, fix="give a valid .h5ad file") from None

    adata = read(cells)
    for extra, key in ((image_embeddings, "X_spatia_image"), (gene_embeddings, "X_spatia_gene")):
        if extra is not None:
            add_modality_embedding(adata, read(extra), key, source=extra)
    cell_crops = None
    if crops is not None:
        cell_crops = load_crops_npz(crops)
    elif mist is not None:
        cell_crops = crops_from_mist(mist, adata.obs_names.to_numpy().astype(str))
    imputer = None
    if checkpoint is not None and "imputation" in config.tasks:
        import torch

        from spatia.train.impute import GeneDecoderImputer

        resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        imputer = GeneDecoderImputer.from_checkpoint(checkpoint, mist, adata.var_names, device=resolved)
    results = evaluate(adata, config, crops=cell_crops, imputer=imputer)
    write_report(results, out)
    inputs = {"cells": str(cells.resolve()), "mist": str(mist.resolve()) if mist else None,
              "crops": str(crops.resolve()) if crops else None,
              "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
              "image_embeddings": str(image_embeddings.resolve()) if image_embeddings else None,
              "gene_embeddings": str(gene_embeddings.resolve()) if gene_embeddings else None}
    write_run_record(out, "evaluate", {"evaluate": config, "inputs": inputs}, seed)
    console.print(f"evaluation report written to {out} (metrics.json, report.md, report.html)")


# --- demo: the whole pipeline on a simulated bundle ------------------------------------------


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist).")] = Path("demo_output"),
    cells: Annotated[int, typer.Option("--cells", help="Cells in the simulated bundle.")] = 5000,
    genes: Annotated[int, typer.Option("--genes", help="Gene panel size of the simulated bundle.")] = 300,
    pretrain_steps: Annotated[int, typer.Option("--pretrain-steps", help="Pretraining steps of the tiny model.")] = 60,
    evaluate_seeds: Annotated[int, typer.Option("--evaluate-seeds", help="Seeds per stochastic evaluation model.")] = 2,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Run the whole pipeline on a simulated Xenium bundle: simulate, read, build, and the later stages.

    Every step writes what its own command writes, under OUT; demo_summary.json holds each step's figures.
    """
    from spatia.demo import DemoConfig, run_demo

    configure(quiet)
    run_demo(out, DemoConfig(n_cells=cells, n_genes=genes, pretrain_steps=pretrain_steps, evaluate_seeds=evaluate_seeds),
             seed=seed)


# --- train: spatia pretrain, spatia embed ----------------------------------------------------


def _parse_devices(text: str) -> int | str:
    from spatia.errors import ConfigError

    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value == 0 or value < -1:
        raise ConfigError(f"--devices {text!r} is not a device count", fix="use a positive number, -1 (all) or auto")
    return value


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
    from spatia.train import pretrain
    from spatia.train.pretrain import quiet_lightning

    configure(quiet)
    quiet_lightning(quiet)
    overrides = {
        "max_steps": max_steps, "max_epochs": max_epochs, "val_every_n_steps": val_every, "val_batches": val_batches,
        "checkpoint_every_n_steps": checkpoint_every, "log_every_n_steps": log_every, "lr": lr,
        "tissues_per_batch": tissues_per_batch, "cells_per_tissue": cells_per_tissue, "num_workers": workers,
        "precision": precision,
    }
    result = pretrain(
        dataset, out, config=config, stage=stage, init_from=init_from, resume=resume, image_weights=image_weights,
        gene_embeddings=gene_embeddings, train_overrides=overrides, devices=_parse_devices(devices),
        num_nodes=num_nodes, accelerator=accelerator, start_method="popen", threads=threads, seed=seed,
        progress_bar=not quiet,
    )
    from spatia.train.pretrain import env_rank_is_zero

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
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Embed every cell of a MIST dataset with a trained checkpoint into an AnnData: obsm X_spatia,
    X_spatia_cell, X_spatia_niche, X_spatia_tissue and spatial (um), obs from the dataset's cell
    index, raw counts in X. The run record goes beside it as OUT_STEM.spatia_run.json.
    """
    from spatia.outputs import refuse_existing, write_run_record
    from spatia.train import embed_dataset
    from spatia.train.pretrain import env_rank_is_zero, quiet_lightning

    configure(quiet)
    quiet_lightning(quiet)
    record_path = out.with_name(f"{out.stem}.spatia_run.json")
    if env_rank_is_zero():
        refuse_existing(out, what="embedding file")
        refuse_existing(record_path, what="run record")
    result = embed_dataset(
        dataset, checkpoint, out, modality=modality, splits=split, batch_cells=batch_cells,
        devices=_parse_devices(devices), num_nodes=num_nodes, accelerator=accelerator, precision=precision,
        start_method="popen", num_workers=workers, threads=threads, progress_bar=not quiet,
    )
    if result.path is None:  # another DDP rank: the first one writes
        return
    write_run_record(out.parent, "embed", {
        "dataset": str(dataset), "checkpoint": str(checkpoint), "out": str(out), "modality": modality,
        "splits": list(split) if split else ["all"], "batch_cells": batch_cells, "devices": devices,
        "num_nodes": num_nodes, "accelerator": accelerator, "precision": precision, "threads": threads,
        "n_cells": result.n_cells, "cells_per_second": result.cells_per_second,
    }, seed, name=record_path.name)
    console.print(f"wrote {out}: {result.n_cells:,} cells, {', '.join(result.obsm_keys)} "
                  f"({result.cells_per_second:,.0f} cells/s)", highlight=False)


# --- perturb: spatia pair --------------------------------------------------------------------


@app.command("pair")
def pair_command(
    cells: Annotated[Path, typer.Argument(help="AnnData (.h5ad): raw counts, state/lineage obs columns, obsm spatial in um.")],
    transitions: Annotated[
        str, typer.Option("--transitions", "-t", help="Transitions YAML file, or a shipped example: simulated, breast_cancer.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for pairs and signatures (must not exist).")],
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="Table with a cell_id column joined into obs first (e.g. ground_truth.parquet).")
    ] = None,
    state_key: Annotated[str | None, typer.Option("--state-key", help="obs column of the cell state; default: the transitions file's, else 'state'.")] = None,
    lineage_key: Annotated[str | None, typer.Option("--lineage-key", help="obs column of the lineage; default: the transitions file's, else 'lineage'.")] = None,
    niche_key: Annotated[str | None, typer.Option("--niche-key", help="obs column of the niche type (e.g. domain); default: the transitions file's.")] = None,
    slide_key: Annotated[str | None, typer.Option("--slide-key", help="obs column of the slide; pairs never cross slides; default: the transitions file's.")] = None,
    patient_key: Annotated[str | None, typer.Option("--patient-key", help="obs column of the patient; default: the transitions file's.")] = None,
    counts_layer: Annotated[str | None, typer.Option("--counts-layer", help="Layer with raw counts; default: layers['counts'] if present, else X.")] = None,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Entropic regularisation, relative to the RMS expression distance.")] = 0.05,
    tol: Annotated[float, typer.Option("--tol", help="Stop when the L1 marginal error is below this.")] = 1e-5,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Sinkhorn iteration limit (warns when reached).")] = 5000,
    n_pcs: Annotated[int, typer.Option("--n-pcs", help="Principal components of the expression space.")] = 50,
    theta_min: Annotated[int, typer.Option("--theta-min", help="Minimum cells per state within the lineage.")] = 50,
    spatial_weight: Annotated[float, typer.Option("--spatial-weight", help="Weight of the spatial cost term (0: off).")] = 0.1,
    spatial_scale_um: Annotated[float, typer.Option("--spatial-scale-um", help="Distance that costs spatial-weight (um).")] = 100.0,
    max_distance_um: Annotated[float | None, typer.Option("--max-distance-um", help="Never pair cells farther apart (um).")] = None,
    same_niche: Annotated[bool, typer.Option("--same-niche", help="Pair only within the same niche type.")] = False,
    pair_noise: Annotated[float, typer.Option("--pair-noise", help="Fraction of pairs whose targets are swapped (Table 5 ablation).")] = 0.0,
    float64: Annotated[bool, typer.Option("--float64", help="Sinkhorn in float64 instead of float32.")] = False,
    memory_mb: Annotated[float, typer.Option("--memory-mb", help="Memory budget of each OT problem's cost blocks (MB).")] = 1024.0,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Pair control and target cells of each transition by entropic optimal transport.

    Writes OUT/pairs.parquet (x_ctrl_id, x_tgt_id, state_A, state_B, cell_type, niche_ctrl,
    niche_tgt, transition_tag, task_name, patient_id, slide_id, spatial_distance_um,
    match_score, noise_swapped), signatures.parquet and .npz (Delta g per transition and gene),
    pairing_config.json, diagnostics.json, diagnostics.png and the run record spatia_run.json.
    """
    import anndata as ad

    from spatia.errors import InputDataError
    from spatia.outputs import refuse_existing, write_run_record
    from spatia.perturb import (
        PairingConfig,
        add_annotations,
        example_transitions_path,
        load_transitions,
        pair_cells,
        write_pairing,
    )
    from spatia.perturb.transitions import EXAMPLES

    configure(quiet)
    refuse_existing(out, what="output folder")
    transitions_path = Path(transitions)
    if not transitions_path.exists() and transitions in EXAMPLES:
        transitions_path = example_transitions_path(transitions)
    spec = load_transitions(transitions_path)
    given = {"state_key": state_key, "lineage_key": lineage_key, "niche_key": niche_key, "slide_key": slide_key,
             "patient_key": patient_key}
    columns = {**spec.columns, **{k: v for k, v in given.items() if v is not None}}
    config = PairingConfig(
        epsilon=epsilon, tol=tol, max_iter=max_iter, n_pcs=n_pcs, theta_min=theta_min, counts_layer=counts_layer,
        spatial_weight=spatial_weight, spatial_scale_um=spatial_scale_um, max_distance_um=max_distance_um,
        same_niche=same_niche, pair_noise=pair_noise, seed=seed, dtype="float64" if float64 else "float32",
        memory_mb=memory_mb, **columns,
    )
    if not cells.is_file():
        raise InputDataError("the AnnData file does not exist", path=cells, fix="give the path of an .h5ad file")
    try:
        adata = ad.read_h5ad(cells)
    except Exception as error:  # noqa: BLE001 - any reader failure is the user's file
        raise InputDataError(f"cannot read the AnnData file ({error})", path=cells,
                             fix="give an .h5ad file written by anndata") from None
    if annotations is not None:
        add_annotations(adata, annotations)
    result = pair_cells(adata, spec, config)
    write_pairing(result, out)
    write_run_record(out, "pair", {
        "cells": str(cells), "transitions": str(transitions_path), "annotations": str(annotations) if annotations else None,
        "pairing": config,
    }, seed)
    for name, row in result.summary().items():
        console.print(
            f"{name}: {row['n_pairs']:,} pairs ({row['n_ctrl_unmatched']} controls unpaired), "
            f"distinct targets {row['distinct_target_share'] or 0:.2f}, "
            f"max marginal error {row['max_marginal_error'] or 0:.1e}"
            + ("" if row["all_converged"] in (True, None) else " [NOT CONVERGED]"),
            highlight=False,
        )
    console.print(f"wrote {out}: {len(result.pairs):,} pairs", highlight=False)
