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
