"""`spatia build` and `spatia dataset-info`: the MIST dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run
from spatia.console import console


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
    bundles: Annotated[list[Path], typer.Argument(help="Xenium output folders (or SpatialData .zarr stores, with the spatialdata extra), one per slide.")],
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
    segmentation: Annotated[
        str | None,
        typer.Option("--segmentation", help="polygons (the bundle's segmentation; default) or circles (around centroids; "
                     "for bundles without segmentation, needs --radius-um)."),
    ] = None,
    radius_um: Annotated[float | None, typer.Option("--radius-um", help="Circle radius for --segmentation circles (um).")] = None,
    accept_cell_loss: Annotated[
        bool, typer.Option("--accept-cell-loss", help="Build even when most of a slide's cells are skipped for one reason.",
                           metavar="")
    ] = False,
    accept_pixel_size_mismatch: Annotated[
        bool, typer.Option("--accept-pixel-size-mismatch", help="Build even when experiment.xenium and the image's "
                           "OME metadata disagree on the pixel size.", metavar="")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes rendering chunks (0: in this process).")] = 0,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file of BuildConfig settings (on the preset); options given here win.")
    ] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Build a MIST dataset (cells, 256 px niches, 1024 px tissue regions) from Xenium bundles.

    Writes LMDB stores, Parquet indexes and manifest.json into OUT; manifest.json comes last
    and marks the dataset complete. Rerun the same command to resume an interrupted build.
    """
    from rich.table import Table

    from spatia import stages
    from spatia.config import load_config
    from spatia.mist import BuildConfig

    configure_run(quiet)
    config = load_config(BuildConfig, config_file, base=BuildConfig.from_preset(preset), overrides={
        "cell_image_px": cell_size, "niche_image_px": niche_size, "tissue_image_px": tissue_size,
        "scale_percentile": scale_percentile, "min_counts": min_counts, "image_channel": channel,
        "split_mode": split, "split_fractions": _parse_fractions(split_fractions) if split_fractions else None,
        "split_block_tissues": split_block_tissues, "split_buffer_um": split_buffer_um,
        "slide_splits": _parse_slide_splits(slide_split) if slide_split else None,
        "segmentation": segmentation, "circle_radius_um": radius_um,
        "accept_cell_loss": accept_cell_loss or None, "accept_pixel_size_mismatch": accept_pixel_size_mismatch or None,
    })
    summary = stages.build(bundles, out, config, seed=seed, workers=workers).detail
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.", metavar="")] = False,
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
