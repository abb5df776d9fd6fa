from typer.testing import CliRunner

from spatia import __version__
from spatia.cli import app
from spatia.errors import BundleError, SpatiaError


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0


def test_spatia_error_message_names_file_problem_and_fix():
    error = BundleError("cells.parquet is missing", path="/data/bundle", fix="point at a Xenium output folder")
    assert isinstance(error, SpatiaError)
    text = str(error)
    assert text.startswith("/data/bundle: cells.parquet is missing")
    assert "Fix: point at a Xenium output folder" in text


def _command_paths(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if hasattr(command, "commands"):  # a group (Typer's groups are not click.Group subclasses)
            yield from _command_paths(command, prefix + (name,))


def test_every_help_shows_flags_as_flags():
    """Boolean flags, --help included, carry no `<bool>` metavar in any command's help."""
    import typer.main

    runner = CliRunner()
    paths = [()] + list(_command_paths(typer.main.get_command(app)))
    assert ("flow", "train") in paths and ("pretrain",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output and "<bool>" not in result.output, (path, result.output)


def test_error_messages_are_not_broken_by_the_terminal_width(tmp_path):
    """A long path in an error stays on one line (the terminal wraps it, not rich)."""
    missing = tmp_path / ("a_rather_long_folder_name_" * 4) / "bundle[1]"
    result = CliRunner().invoke(app, ["info", str(missing)], env={"COLUMNS": "60"})
    assert result.exit_code == 2
    assert str(missing) in result.output
