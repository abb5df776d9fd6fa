"""The Typer app, the options every command shares, and how a stage's result is printed.

Commands are thin: they turn options into a stage's typed config (`spatia.config.load_config`),
call the stage function in `spatia.stages`, and print its summary. User mistakes
(`SpatiaError`) are printed without a traceback and exit with code 2.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from spatia import __version__
from spatia.console import configure, console
from spatia.errors import SpatiaError

USER_ERROR_EXIT_CODE = 2


def _as_flag(option):
    """Show `--help` as the flag it is: click 8.5's help option renders as `--help <bool>` in
    Typer's help panels unless its metavar is empty."""
    if option is not None:
        option.metavar = ""
    return option


class SpatiaGroup(TyperGroup):
    """Turns `SpatiaError` into a short message and exit code 2, for every command; every
    command's `--help` shown as a flag."""

    def get_help_option(self, ctx):  # noqa: D102
        return _as_flag(super().get_help_option(ctx))

    def get_command(self, ctx, cmd_name):  # noqa: D102
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _as_flag(command.get_help_option(ctx))
        return command

    def invoke(self, ctx):  # noqa: D102
        try:
            return super().invoke(ctx)
        except SpatiaError as error:
            _print_error(error)
        except OSError as error:  # a full disk or an unwritable place met outside atomic_output
            from spatia.outputs import output_write_error

            converted = output_write_error(error)
            if converted is None:
                raise
            _print_error(converted)


def _print_error(error: SpatiaError) -> None:
    # soft_wrap: the terminal wraps long lines, so paths and names in the message stay whole
    console.print(f"[bold red]error:[/bold red] {escape(error.message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(USER_ERROR_EXIT_CODE) from None


app = typer.Typer(
    cls=SpatiaGroup,
    name="spatia",
    help="SPATIA: multi-scale cell representations from Xenium spatial transcriptomics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.", metavar="")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed; same inputs and seed give the same outputs.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spatia {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.", metavar="")
    ] = False,
) -> None:
    """SPATIA: multi-scale cell representations from Xenium spatial transcriptomics.

    Stages in pipeline order: simulate, info, build, dataset-info, pretrain, embed, evaluate,
    pair, flow; `spatia demo` runs them all on a simulated bundle.
    """


def given_on_command_line(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` (config key -> option value) whose option the user typed.

    Options show the config's defaults in --help, but only those given on the command line
    override a --config file; the rest come from the file, else the config's defaults.
    Keys are config keys; each option's parameter name is the config key with dots as '_',
    or given in `values` as "key:param".
    """
    given = {}
    for key, value in values.items():
        config_key, _, param = key.partition(":")
        source = ctx.get_parameter_source(param or config_key.replace(".", "_"))
        # compared by name: Typer ships its own copy of click's ParameterSource enum
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given[config_key] = value
    return given


def configure_run(quiet: bool) -> None:
    """Logging for one command run (INFO, or warnings only with --quiet)."""
    configure(quiet)


def print_summary(summary: dict[str, Any], *, quiet: bool = False) -> None:
    """Print a stage's `summary()`: one line per figure (nested figures as compact JSON)."""
    if quiet:
        return
    stage = summary.get("stage", "")
    path = summary.get("path")
    console.print(f"[bold]{stage}[/bold]: wrote {path}" if path else f"[bold]{stage}[/bold]", highlight=False)
    for key, value in summary.items():
        if key in ("stage", "path"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        console.print(f"  {key}: {text}", highlight=False, markup=False)
