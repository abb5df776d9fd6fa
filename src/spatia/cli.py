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
