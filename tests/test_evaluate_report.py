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

FAST = {"n_seeds": 2, "leiden_resolutions": (0.1, 0.5), "xgb_estimators": 20, "mlp_hidden": (32,), "layout": "pca",
        "baselines": ("pca",)}


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
    cell = f"{mlp['mean']:.3f} ± {mlp['std']:.3f}"
    assert f"| SPATIA (unified) | {cell} |" in md or f"| SPATIA (unified) | **{cell}** |" in md
    assert "| SPATIA gene decoder | skipped: no model given |" in md
    assert "| PCA + morphology |" in md
    ridge = metrics["tasks"]["expression"]["results"]["morphology"]["ridge"]["alpha"]
    assert ridge in EvaluateConfig().ridge_alphas
    assert "Ridge penalty chosen by leave-one-out on the train cells: " in md and f"Morphology features {ridge:g}" in md
    c = metrics["tasks"]["annotation"]["results"]["pca"]["logreg"]["C"]
    assert c in EvaluateConfig().logreg_cs
    assert "Its C, chosen by cross-validated macro-F1 on the train cells: " in md and f"PCA (50) of log-expression {c:g}" in md

    page = (out / "report.html").read_text()
    # annotation, clustering, levels, expression, niche expression (skipped: no niche IDs), imputation
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 6
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
    # no X_spatia: the cell level stands for SPATIA against the PCA baseline
    assert "SPATIA cell level (no niche/tissue) " in _headline_section(md).split(" vs best baseline PCA")[0]
    assert {p.name for p in (out / "figures").iterdir()} == {"spatial.png", "annotation_f1.png"}


def test_cli_evaluate_end_to_end(tmp_path):
    adata, crops = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=9)
    # `spatia embed --modality image` writes its own AnnData with the embedding as X_spatia_image
    image_only = ad.AnnData(obs=adata.obs[[]].iloc[::-1].copy())  # another row order
    image_only.obsm["X_spatia_image"] = adata.obsm["X_spatia_image"][::-1].copy()
    image_only.write_h5ad(tmp_path / "image.h5ad")
    adata.obsm.pop("X_spatia_image")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    np.savez(tmp_path / "crops.npz", images=crops.images, masks=crops.masks, cell_id=crops.cell_ids)
    (tmp_path / "eval.yaml").write_text("leiden_resolutions: [0.2, 0.6]\nxgb_estimators: 10\nmlp_hidden: [16]\n"
                                        "baselines: [pca]\n")
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
    assert run["config"]["leiden_resolutions"] == [0.2, 0.6] and run["config"]["layout"] == "none"
    assert run["inputs"]["cells"] == str((tmp_path / "cells.h5ad").resolve())
    assert run["inputs"]["checkpoint"] is None
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
    other.obsm["X_spatia_image"] = adata.obsm["X_spatia_image"][::-1]  # `spatia embed --modality image`'s key
    expected = adata.obsm.pop("X_spatia_image")
    add_modality_embedding(adata, other, "X_spatia_image")
    assert np.array_equal(adata.obsm["X_spatia_image"], expected)


def test_add_image_only_embeddings_merges_every_level_the_file_has():
    """The image-only file's unified, cell-level and niche-level keys arrive, aligned by cell;
    the stage and bench_representation both merge through this one helper."""
    from spatia.evaluate import add_image_only_embeddings

    adata, _ = synthetic_evaluation_data(30, n_genes=10, seed=12)
    image = adata.obsm.pop("X_spatia_image")
    other = ad.AnnData(obs=adata.obs[[]].iloc[::-1].copy())
    levels = {"X_spatia_image": image, "X_spatia_image_cell": image + 1.0, "X_spatia_image_niche": image + 2.0}
    for key, values in levels.items():
        other.obsm[key] = values[::-1]
    add_image_only_embeddings(adata, other)
    for key, values in levels.items():
        assert np.array_equal(adata.obsm[key], values), key
    without_levels = ad.AnnData(obs=adata.obs[[]].copy())
    without_levels.obsm["X_spatia_image"] = image
    fresh, _ = synthetic_evaluation_data(30, n_genes=10, seed=12)
    add_image_only_embeddings(fresh, without_levels)  # an older file: the unified key only
    assert "X_spatia_image_cell" not in fresh.obsm and np.array_equal(fresh.obsm["X_spatia_image"], image)


# --- verdicts: headline, warning, bold ---------------------------------------------------------

def _verdict_run(spatia: np.ndarray | None, seed: int = 11):
    """Annotation only, PCA baseline; X_spatia replaced by `spatia` (a known-good or known-bad embedding)."""
    adata, _ = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=seed)
    if spatia is not None:
        adata.obsm["X_spatia"] = spatia(adata)
    config = EvaluateConfig(labels="cell_type", tasks=("annotation",), embeddings=("X_spatia",),
                            **{**FAST, "layout": "none"})
    return evaluate(adata, config)


def _one_hot_types(adata) -> np.ndarray:
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    return np.eye(codes.max() + 1, dtype=np.float32)[codes] * 5.0


def _noise(adata) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(adata.n_obs, 8)).astype(np.float32)


def _headline_section(md: str) -> str:
    return md.split("## Headlines")[1].split("\n## ")[0]


@pytest.mark.parametrize("embedding, spatia_wins", [(_one_hot_types, True), (_noise, False)])
def test_headline_names_best_and_sign_and_warns_only_when_below(embedding, spatia_wins, tmp_path):
    # ground truth by construction: the cell type itself beats PCA of the counts; noise loses to it
    out = write_report(_verdict_run(embedding), tmp_path / "r")
    md = (out / "report.md").read_text()
    verdict = json.loads((out / "metrics.json").read_text())["verdicts"]["annotation"]
    assert verdict["spatia"]["key"] == "X_spatia" and verdict["baseline"]["key"] == "pca"
    head = _headline_section(md)
    if spatia_wins:
        assert verdict["best"]["key"] == "X_spatia" and verdict["difference"] > 0.02
        assert "best is SPATIA (unified)" in head and " +0." in head
        assert "WARNING" not in md and "WARNING" not in (out / "report.html").read_text()
    else:
        assert verdict["best"]["key"] == "pca" and verdict["difference"] < -0.2
        assert "best is PCA (50) of log-expression" in head and " -0." in head
        assert md.count("WARNING: SPATIA (unified) is below the baseline PCA (50) of log-expression") == 1
        page = (out / "report.html").read_text()
        assert "<p class='warning'>WARNING: SPATIA (unified) is below" in page


def _stat(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std, "values": [mean - std, mean + std], "n_runs": 2, "deterministic": False}


def _annotation_results(f1: dict[str, tuple[float, float]]) -> dict:
    """A hand-made results dict with one annotation task: {key: (mean, std) of MLP macro-F1}."""
    def entry(mean, std):
        return {m: {k: _stat(mean, std) for k in ("macro_f1", "precision", "accuracy")} for m in ("mlp", "logreg")}
    names = {"X_spatia": "SPATIA (unified)", "pca": "PCA", "scvi": "scVI", "X_spatia_cell": "SPATIA cell"}
    return {"dataset": {"label_column": "cell_type"},
            "embeddings": {k: {"name": names[k]} for k in f1},
            "tasks": {"annotation": {"status": "ok", "results": {k: entry(*v) for k, v in f1.items()}}}}


@pytest.mark.parametrize("f1, below, within", [
    ({"X_spatia": (0.80, 0.01), "pca": (0.70, 0.02), "scvi": (0.75, 0.03)}, False, False),
    ({"X_spatia": (0.74, 0.01), "pca": (0.70, 0.02), "scvi": (0.75, 0.03)}, True, True),   # -0.01, spread 0.03
    ({"X_spatia": (0.60, 0.01), "pca": (0.70, 0.02), "scvi": (0.75, 0.03)}, True, False),
    ({"X_spatia": (0.75, 0.00), "pca": (0.70, 0.00), "scvi": (0.75, 0.00)}, False, False),  # a tie is not below
])
def test_verdict_difference_spread_and_warning(f1, below, within):
    from spatia.evaluate.verdicts import headline, task_verdicts

    v = task_verdicts(_annotation_results(f1))["annotation"]
    assert v["baseline"]["key"] == "scvi"  # the best of the baselines
    assert v["difference"] == pytest.approx(f1["X_spatia"][0] - 0.75)
    assert v["spread"] == pytest.approx(max(f1["X_spatia"][1], 0.03 if f1["scvi"][1] else 0.0))
    assert v["spatia_below_baseline"] is below and v["within_spread"] is within
    text, warning = headline(v)
    assert (warning is not None) is below
    assert ("within seed spread" in text) is within
    if below:
        assert warning.startswith("WARNING: SPATIA (unified) is below the baseline scVI")


def test_bold_marks_the_column_max(results, tmp_path):
    from spatia.evaluate.report import _annotation_table, _cells

    f1 = {"X_spatia_cell": (0.61, 0.01), "X_spatia": (0.83, 0.02), "pca": (0.79, 0.02), "scvi": (0.70, 0.01)}
    made = _annotation_results(f1)
    ann = made["tasks"]["annotation"]
    ann.update(n_train=10, n_test=5, classes=["a", "b"], chance_accuracy=0.5, excluded_classes=[])
    ann["results"]["pca"]["logreg"]["macro_f1"] = _stat(0.9, 0.0)
    _, _, rows, _ = _annotation_table(made, ann, "Cell annotation", "0, 1")
    cells = {row[0][0]: row[1:] for row in _cells(rows)}
    assert [k for k, row in cells.items() if row[0][1]] == ["SPATIA (unified)"]  # MLP macro-F1: 0.83 is the max
    assert [k for k, row in cells.items() if row[3][1]] == ["PCA"]               # LogReg macro-F1: 0.9 is the max

    # the rendered report: in the MLP macro-F1 column the bold cells are exactly those at the max
    md = (write_report(results, tmp_path / "r") / "report.md").read_text()
    table = md.split("## Cell annotation")[1].split("\n## ")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "Representation" not in line]
    f1_mlp = {k: round(v["mlp"]["macro_f1"]["mean"], 3) for k, v in results["tasks"]["annotation"]["results"].items()}
    best = max(f1_mlp.values())
    bold = [line.split(" | ")[1].startswith("**") for line in lines]
    assert bold == [v == best for v in f1_mlp.values()] and any(bold)


def test_every_figure_has_axis_labels_and_a_legend(results, tmp_path, monkeypatch):
    import matplotlib.figure

    seen = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        seen.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    write_report(results, tmp_path / "r")
    assert len(seen) == 4
    for fig in seen:
        axes = [ax for ax in fig.axes if ax.axison]
        assert axes
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel(), (fig, ax.get_title())
        assert any(ax.get_legend() is not None for ax in axes)
    spatial = next(f for f in seen if any(ax.get_xlabel() == "x (um)" for ax in f.axes))
    assert all(ax.get_legend() is not None for ax in spatial.axes if ax.axison)  # labels, split and clusters


def test_panels_with_many_categories_name_their_count_and_nothing_overlaps():
    """Leiden on a niche-level embedding gives a cluster per niche (194 in the demo): such a panel
    names the count in its title instead of a legend of 194 rows, and the spatial grid lays out
    without matplotlib's 'Tight layout not applied' (legends over the next panel)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spatia.evaluate.report import LEGEND_MAX_ENTRIES, _categorical, _grid

    rng = np.random.default_rng(0)
    fig, axes = _grid(3)
    many, few = np.arange(500) % 60, np.arange(500) % 5
    _categorical(axes[0], rng.normal(size=(500, 2)), many, "Leiden: niche level", legend=True, size=2,
                 axis_labels=("x", "y"), legend_title="Cluster")
    _categorical(axes[1], rng.normal(size=(500, 2)), few, "Leiden: a rather long representation name that wraps",
                 legend=True, size=2, axis_labels=("x", "y"), legend_title="Cluster")
    _categorical(axes[2], rng.normal(size=(500, 2)), many.astype(str), "Labels", legend=True, size=2,
                 axis_labels=("x", "y"))
    assert 60 > LEGEND_MAX_ENTRIES and axes[0].get_legend() is None and "(60 clusters)" in axes[0].get_title()
    assert len(axes[1].get_legend().get_texts()) == 5 and "\n" in axes[1].get_title()
    assert "(60 categories)" in axes[2].get_title()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fig.canvas.draw()
    plt.close(fig)


def test_a_label_column_set_for_some_cells_names_its_labelled_cells(tmp_path):
    """A second label column set for only part of the cells (the simulator's niche_state is set
    for target-state cells only) is scored on those cells, and the report's setup line says how
    many there are."""
    adata, _ = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=3)
    partial = adata.obs["cell_type"].astype(object).to_numpy()
    partial[::2] = None
    adata.obs["partial"] = partial
    config = EvaluateConfig(labels=("cell_type", "partial"), embeddings=("X_spatia",), tasks=("annotation",),
                            **{**FAST, "n_seeds": 1})
    results = evaluate(adata, config)
    assert results["labels"]["partial"]["n_labelled"] == 200
    assert results["by_label"]["partial"]["annotation"]["n_test"] < results["by_label"]["cell_type"]["annotation"]["n_test"]
    md = (write_report(results, tmp_path / "report") / "report.md").read_text()
    assert "`cell_type` (3 classes), `partial` (3 classes, 200 labelled cells)." in md
