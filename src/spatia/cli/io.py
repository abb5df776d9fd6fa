"""`spatia simulate` and `spatia info`: make a bundle, read one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run, given_on_command_line, print_summary


@app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Argument(help="Output folder for the simulated Xenium bundle (must not exist).")],
    ctx: typer.Context,
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 20_000,
    genes: Annotated[int, typer.Option("--genes", help="Gene panel size (negative controls come on top).")] = 300,
    layout: Annotated[
        str, typer.Option("--layout", help="v1: morphology_focus.ome.tif; v2: morphology_focus/ per-channel files.")
    ] = "v1",
    z_planes: Annotated[
        int, typer.Option("--z-planes", help="Also write a morphology.ome.tif z-stack with this many planes (0: none).")
    ] = 0,
    segmentation_format: Annotated[
        str, typer.Option("--segmentation-format", help="Where the cell segmentation goes: parquet (XOA 1.x "
                          "cell_boundaries.parquet), zarr (XOA 2.x-4.x cells.zarr.zip), both, or none.")
    ] = "parquet",
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file of SimulationConfig settings; options given here win.")
    ] = None,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Simulate a tissue section with known ground truth and write it as a Xenium bundle.

    Besides the Xenium files, OUT holds ground_truth.parquet (one row per cell) and ground_truth.json.

    ground_truth.json is the designed world: domains, states, transitions, DE genes, morphology shifts.

    OUT is built under a temporary name and renamed when complete; an existing OUT is never overwritten.
    """
    from spatia import stages
    from spatia.config import load_config
    from spatia.sim import SimulationConfig

    configure_run(quiet)
    config = load_config(SimulationConfig, config_file, overrides=given_on_command_line(ctx, {
        "n_cells:cells": cells, "n_genes:genes": genes, "layout": layout, "z_planes": z_planes,
        "segmentation_format": segmentation_format}))
    print_summary(stages.simulate(out, config, seed=seed).summary(), quiet=quiet)


@app.command("info")
def info(
    bundle: Annotated[Path, typer.Argument(help="Xenium output folder (the 'outs' folder).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.", metavar="")] = False,
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

    configure_run(quiet)
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
