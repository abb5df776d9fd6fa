"""`spatia demo` end to end at a small size: every stage runs and writes what its command writes.

The default demo (5,000 cells, 60 pretraining steps, 2 seeds) takes minutes; this runs the same
code path on 1,500 cells with 3 pretraining steps and one evaluation seed.
"""

from __future__ import annotations

import json

import anndata
import pytest
from typer.testing import CliRunner

from spatia.cli import app


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--cells", "1500", "--genes", "150", "--pretrain-steps", "3",
            "--evaluate-seeds", "1", "--flow-preset", "tiny", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary["steps"]) == ["simulate", "read", "build", "pretrain", "embed", "evaluate", "pair", "flow"]
    assert summary["steps"]["simulate"]["cells"] == 1500
    assert summary["steps"]["pretrain"]["steps"] == 3
    run = json.loads((out / "spatia_run.json").read_text())
    assert run["command"] == "demo" and run["config"]["pretrain_steps"] == 3

    embedded = anndata.read_h5ad(out / "embeddings.h5ad")
    cells = anndata.read_h5ad(out / "cells.h5ad")
    assert list(embedded.obs_names) == list(cells.obs_names)  # the same cells, same order (skipped ones flagged)
    assert int(embedded.obs["spatia_embedded"].sum()) == summary["steps"]["build"]["cells"]
    assert {"X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"} <= set(embedded.obsm)
    assert "X_spatia_image" in anndata.read_h5ad(out / "embeddings_image.h5ad").obsm

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for task in ("annotation", "clustering", "expression", "imputation"):
        assert metrics["tasks"][task]["status"] == "ok", task
    assert metrics["tasks"]["imputation"]["results"]["model"]["status"] == "ok"  # the gene decoder ran
    assert set(summary["steps"]["evaluate"]["imputation_pearson"]) >= {"model", "gene_mean", "knn_expression"}
    assert (out / "report" / "report.html").stat().st_size > 0
    assert (out / "pairs" / "spatia_run.json").exists()
    pairs = summary["steps"]["pair"]["transitions"]
    assert pairs and all(row["pairs"] > 0 for row in pairs.values()), pairs
    assert summary["steps"]["pair"]["n_pairs"] == sum(row["pairs"] for row in pairs.values())
    # every stage's outputs carry a run record with the same fields (the embed step's included)
    records = [out / "bundle" / "spatia_run.json", out / "dataset" / "spatia_run.json",
               out / "pretrain" / "spatia_run.json", out / "embeddings.spatia_run.json",
               out / "embeddings_image.spatia_run.json", out / "report" / "spatia_run.json",
               out / "pairs" / "spatia_run.json", out / "flow" / "model" / "spatia_run.json",
               out / "flow" / "generated" / "spatia_run.json", out / "flow" / "report" / "spatia_run.json"]
    for path in records:
        record = json.loads(path.read_text())
        assert {"command", "inputs", "seed", "config", "results", "versions"} <= set(record), path
    assert (out / "report" / "spatia_run.json").exists()
    assert (out / "dataset" / "manifest.json").exists()

    flow = summary["steps"]["flow"]["evaluate"]["variants"]
    assert {"spatia", "identity"} <= set(flow)  # the generated crops and the control-as-prediction baseline
    assert (out / "flow" / "report" / "metrics.json").exists()

    again = CliRunner().invoke(app, args)  # an existing output folder is refused, untouched
    assert again.exit_code == 2 and "exists" in again.output
