"""The report renders (JSON, Markdown, HTML with figures) and `spatia evaluate` runs end to end."""

import base64
import json

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import OutputExistsError
from spatia.evaluate import EvaluateConfig, evaluate, write_report
from spatia.evaluate.synthetic import synthetic_evaluation_data

FAST = dict(n_seeds=2, leiden_resolutions=(0.1, 0.5), xgb_estimators=20, mlp_hidden=(32,), layout="pca")


@pytest.fixture(scope="module")
def results():
    adata, crops = synthetic_evaluation_data(500, n_genes=60, n_types=3, seed=7)
    config = EvaluateConfig(labels="cell_type", embeddings=("X_spatia", "X_spatia_image"), **FAST)
    return evaluate(adata, config, crops=crops)


def test_report_files_tables_and_figures(results, tmp_path):
    out = write_report(results, tmp_path / "report")
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "report.html", "figures"} <= names
    figures = {p.name for p in (out / "figures").iterdir()}
    assert figures == {"pca.png", "spatial.png", "annotation_f1.png", "per_gene_pearson.png"}
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and metrics["config"]["n_seeds"] == 2
    assert metrics["split"]["n_test"] > 0 and metrics["split"]["source"] == "spatial_blocks"

    md = (out / "report.md").read_text()
    for title in ("## Cell annotation", "## Clustering", "## Expression from morphology", "## Gene imputation"):
        assert title in md
    mlp = metrics["tasks"]["annotation"]["results"]["X_spatia"]["mlp"]["macro_f1"]
    assert f"| SPATIA (unified) | {mlp['mean']:.3f} ± {mlp['std']:.3f} |" in md
    assert "| SPATIA gene decoder | skipped: no model given |" in md
    assert "| PCA + morphology |" in md

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 4
    embedded = page.split("data:image/png;base64,")[1:]
    assert len(embedded) == 4
    assert base64.b64decode(embedded[0].split("'")[0])[:4] == b"\x89PNG"
    assert "skipped: no model given" in page


def test_report_refuses_existing_directory(results, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        write_report(results, tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == []


def test_skipped_tasks_render(results, tmp_path):
    adata, _ = synthetic_evaluation_data(300, n_genes=40, seed=8)
    config = EvaluateConfig(labels="cell_type", tasks=("annotation",), embeddings=("X_spatia_cell",),
                            **{**FAST, "layout": "none"})
    out = write_report(evaluate(adata, config), tmp_path / "r")
    md = (out / "report.md").read_text()
    assert "skipped: not requested" in md
    assert {p.name for p in (out / "figures").iterdir()} == {"spatial.png", "annotation_f1.png"}


def test_cli_evaluate_end_to_end(tmp_path):
    adata, crops = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=9)
    # `spatia embed --modality image` writes its own AnnData with the embedding as X_spatia
    image_only = ad.AnnData(obs=adata.obs[[]].iloc[::-1].copy())  # another row order
    image_only.obsm["X_spatia"] = adata.obsm["X_spatia_image"][::-1].copy()
    image_only.write_h5ad(tmp_path / "image.h5ad")
    adata.obsm.pop("X_spatia_image")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    np.savez(tmp_path / "crops.npz", images=crops.images, masks=crops.masks, cell_id=crops.cell_ids)
    (tmp_path / "eval.yaml").write_text("leiden_resolutions: [0.2, 0.6]\nxgb_estimators: 10\nmlp_hidden: [16]\n")
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "cells.h5ad"), "--labels", "cell_type", "-o", str(tmp_path / "out"),
            "--crops", str(tmp_path / "crops.npz"), "--image-embeddings", str(tmp_path / "image.h5ad"),
            "-e", "X_spatia", "-e", "X_spatia_image", "--n-seeds", "2",
            "--layout", "none", "--config", str(tmp_path / "eval.yaml"), "--seed", "5", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    run = json.loads((out / "spatia_run.json").read_text())
    assert run["command"] == "evaluate" and run["seed"] == 5
    assert run["config"]["evaluate"]["leiden_resolutions"] == [0.2, 0.6] and run["config"]["evaluate"]["layout"] == "none"
    assert run["config"]["inputs"]["cells"] == str((tmp_path / "cells.h5ad").resolve())
    assert run["config"]["inputs"]["checkpoint"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [5, 6]
    assert set(metrics["tasks"]["annotation"]["results"]) == {"X_spatia", "X_spatia_image", "pca", "morphology",
                                                               "pca+morphology"}
    assert set(metrics["tasks"]["expression"]["results"]) == {"X_spatia_image", "morphology"}
    assert "X_spatia_image" not in ad.read_h5ad(tmp_path / "cells.h5ad").obsm  # input untouched

    again = runner.invoke(app, args)  # the report directory exists now
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "cells.h5ad"), "--labels", "nope", "-o",
                                  str(tmp_path / "out2"), "--quiet"])
    assert missing.exit_code == 2 and "no obs column 'nope'" in " ".join(missing.output.split())
    assert not (tmp_path / "out2").exists()
    image_only[:10].write_h5ad(tmp_path / "image_part.h5ad")
    partial = runner.invoke(app, ["evaluate", str(tmp_path / "cells.h5ad"), "--labels", "cell_type", "-o",
                                  str(tmp_path / "out3"), "--image-embeddings", str(tmp_path / "image_part.h5ad")])
    assert partial.exit_code == 2
    assert "390 of 400 evaluated cells are not in this AnnData" in " ".join(partial.output.split())


def test_add_modality_embedding_aligns_by_cell_id():
    from spatia.evaluate import add_modality_embedding

    adata, _ = synthetic_evaluation_data(50, n_genes=10, seed=10)
    other = ad.AnnData(obs=adata.obs[[]].iloc[::-1].copy())
    other.obsm["X_spatia"] = adata.obsm["X_spatia_image"][::-1]
    expected = adata.obsm.pop("X_spatia_image")
    add_modality_embedding(adata, other, "X_spatia_image")
    assert np.array_equal(adata.obsm["X_spatia_image"], expected)
