"""The `spatia` command: one Typer app, one subcommand per pipeline stage.

Commands are thin: they parse options, call the library, and record the resolved config, seed
and package version next to their outputs. User mistakes (`SpatiaError`) are printed without a
traceback and exit with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from spatia import __version__
from spatia.console import configure, console
from spatia.errors import SpatiaError

USER_ERROR_EXIT_CODE = 2


class _SpatiaGroup(TyperGroup):
    """Turns `SpatiaError` into a short message and exit code 2, for every command."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except SpatiaError as error:
            console.print(f"[bold red]error:[/bold red] {error.message}", markup=True, highlight=False)
            raise click.exceptions.Exit(USER_ERROR_EXIT_CODE) from None


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
