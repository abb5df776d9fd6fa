"""Safe writing: nothing half-written, nothing overwritten, unusable places as clear errors."""

from __future__ import annotations

import errno
import json

import pytest
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import OutputExistsError, OutputWriteError
from spatia.outputs import atomic_output, write_json, write_run_record


def test_atomic_output_renames_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    with pytest.raises(OutputExistsError):
        with atomic_output(target) as tmp:
            tmp.write_text("again")
    assert target.read_text() == "whole"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_a_full_or_unwritable_place_is_a_clear_error(tmp_path, code):
    target = tmp_path / "out.json"
    with pytest.raises(OutputWriteError) as caught, atomic_output(target) as tmp:
        tmp.write_text("partial")
        raise OSError(code, "simulated", str(tmp))
    assert str(target) in caught.value.message and "Fix:" in caught.value.message
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "x") as tmp:
        raise FileNotFoundError(errno.ENOENT, "a bug, not the user's disk", str(tmp))


def test_run_record_fields(tmp_path):
    write_run_record(tmp_path, "demo", {"a": 1}, 7, inputs={"cells": "/x.h5ad"}, results={"n": 2})
    record = json.loads((tmp_path / "spatia_run.json").read_text())
    assert {k: record[k] for k in ("command", "seed", "config", "inputs", "results")} == {
        "command": "demo", "seed": 7, "config": {"a": 1}, "inputs": {"cells": "/x.h5ad"}, "results": {"n": 2}}
    assert record["versions"]["spatia"] and record["written_at_utc"].endswith("Z")
    write_json(tmp_path / "a.json", {"x": (1, 2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}


def test_cli_output_under_a_file_is_exit_2_not_a_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(app, ["simulate", str(blocker / "bundle"), "--cells", "200", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "a parent of the path is a file" in result.output and "Traceback" not in result.output


def test_cli_disk_full_anywhere_is_exit_2(tmp_path, monkeypatch):
    from spatia import stages

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "bundle" / "x.tif"))

    monkeypatch.setattr(stages, "simulate", full_disk)
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "bundle"), "--quiet"])
    assert result.exit_code == 2 and "no space left on the device" in result.output, result.output
