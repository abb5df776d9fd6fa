"""`spatia flow ...`: help with defaults, flags, and user errors as exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spatia.cli.flow import flow_app

runner = CliRunner()


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "ablate", "crossmodal"])
def test_help_shows_defaults(command):
    result = runner.invoke(flow_app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--seed" in result.output and "default: 0" in result.output


def test_train_help_names_the_issue_options():
    text = runner.invoke(flow_app, ["train", "--help"], terminal_width=200).output
    for option in ("--pairs", "--embeddings", "--config", "--condition", "--contrastive-weight", "--pair-noise",
                   "--constant-lr", "--autoencoder"):
        assert option in text
    assert "default: 0.05" in text and "default: levels" in text


def test_bad_lambda_is_a_user_error(tmp_path):
    from spatia.cli import app

    result = runner.invoke(app, ["flow", "train", str(tmp_path), "--pairs", str(tmp_path), "--embeddings",
                                 str(tmp_path / "e.h5ad"), "-o", str(tmp_path / "out"), "--contrastive-weight", "1.0"])
    assert result.exit_code == 2
    assert "outside [0, 1)" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_inputs_name_the_file(tmp_path):
    from spatia.cli import app

    result = runner.invoke(app, ["flow", "generate", str(tmp_path / "nothing"), "-o", str(tmp_path / "g")])
    assert result.exit_code == 2 and "flow.pt" in result.output


def test_crossmodal_missing_autoencoder_is_a_user_error(tmp_path):
    """`spatia flow crossmodal` reaches flow_crossmodal, which names the missing input; nothing is written."""
    from spatia.cli import app

    result = runner.invoke(app, ["flow", "crossmodal", str(tmp_path / "mist"), "--gene-embeddings",
                                 str(tmp_path / "missing.h5ad"), "--flow", str(tmp_path / "flow"), "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "missing.h5ad" in result.output.replace("\n", "")  # the console may wrap the long path
    assert not (tmp_path / "out").exists()
