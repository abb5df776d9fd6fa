"""`embed_dataset` / `spatia embed`: the AnnData's contents, determinism, batching independence,
modalities, splits, and the commands end to end."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import ConfigError, OutputExistsError
from spatia.mist import CellDataset
from spatia.train import embed_dataset, embed_model, load_model, pretrain

RUN = dict(cells_per_tissue=8, max_steps=2, val_batches=0, log_every_n_steps=1, checkpoint_every_n_steps=1)


@pytest.fixture(scope="module")
def checkpoint(simulated_checkpoint):
    return simulated_checkpoint


@pytest.fixture(scope="module")
def embedded(simulated_mist, checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("embed_out") / "cells.h5ad"
    result = embed_dataset(simulated_mist, checkpoint, path, threads=1, progress_bar=False)
    return path, result


def test_anndata_contents(simulated_mist, simulated_bundle, checkpoint, embedded):
    from spatia.io import read_xenium

    path, result = embedded
    adata = anndata.read_h5ad(path)
    cells = CellDataset(simulated_mist)
    n = len(cells)
    # every cell of the bundle, in its cells.parquet order; those the build kept are embedded
    assert list(adata.obs_names) == read_xenium(simulated_bundle).cells.index.astype(str).tolist()
    assert result.n_cells == n == int(adata.obs["spatia_embedded"].sum())
    row = adata.obs_names.get_indexer(cells.index["cell_id"].astype(str))  # cell-index row -> AnnData row
    assert (row >= 0).all() and adata.obs["spatia_embedded"].to_numpy()[row].all()
    for key in ("X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"):
        assert adata.obsm[key].shape == (adata.n_obs, 128) and adata.obsm[key].dtype == np.float32
        assert np.isfinite(adata.obsm[key][row]).all()
    np.testing.assert_allclose(adata.obsm["spatial"][row], cells.index[["x_centroid_um", "y_centroid_um"]].to_numpy())
    for column in ("slide_id", "cell_id", "split", "niche_id", "tissue_id", "truth_cell_type", "truth_domain",
                   "gene_expression_graphclust", "spatia_skip_reason"):
        assert column in adata.obs.columns, column
    assert list(adata.var_names) == list(cells.genes)
    rows = [0, n // 2, n - 1]
    expected = np.stack([cells[i]["cell_counts"].numpy() for i in rows])
    np.testing.assert_array_equal(adata.X[row[rows]].toarray(), expected)  # raw counts in X
    assert adata.X.dtype == np.float32
    # cells of one niche share X_spatia_niche; cells of different niches (mostly) do not
    niche = adata.obs["niche_id"].astype(str).to_numpy()
    same = niche == niche[row[0]]
    assert np.allclose(adata.obsm["X_spatia_niche"][same], adata.obsm["X_spatia_niche"][row[0]])
    uns = adata.uns["spatia"]
    assert uns["checkpoint"] == str(checkpoint.resolve())
    assert uns["modality"] == "both" and list(uns["levels"]) == ["cell", "niche", "tissue"]
    assert uns["checkpoint_stage"] == "joint" and uns["checkpoint_global_step"] == 2
    assert uns["dataset"]["n_genes"] == len(cells.genes) and "max_steps: 2" in uns["config_yaml"]

    # the unified embedding is the model's, on a batch of whole tissues
    model, _ = load_model(checkpoint)
    from spatia.mist import MultiScaleDataset, collate_multiscale

    ds = MultiScaleDataset(simulated_mist, split=None)
    t = 0
    keys = ds.keys_for([t], ds.tissue_cell_rows[t].tolist())
    emb = model.embed(collate_multiscale([ds[k] for k in keys]))
    np.testing.assert_allclose(adata.obsm["X_spatia"][row[ds.tissue_cell_rows[t]]], emb.z.numpy(), atol=1e-5)


def test_deterministic_and_independent_of_batch_size(simulated_mist, checkpoint, embedded):
    _, first = embedded
    again = embed_dataset(simulated_mist, checkpoint, threads=1, progress_bar=False)
    for key in ("X_spatia", "X_spatia_niche"):
        assert np.array_equal(first.adata.obsm[key], again.adata.obsm[key])  # same inputs, same bits
    one_region = embed_dataset(simulated_mist, checkpoint, batch_cells=1, threads=1, progress_bar=False)
    for key in ("X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"):
        np.testing.assert_allclose(one_region.adata.obsm[key], first.adata.obsm[key], atol=2e-5, rtol=0)


def test_modalities_and_splits(simulated_mist, checkpoint, embedded):
    _, both = embedded
    image = embed_dataset(simulated_mist, checkpoint, modality="image", splits=["test", "val"], threads=1,
                          progress_bar=False).adata
    assert set(image.obs["split"]) == {"test", "val"} and image.obs["spatia_embedded"].all()
    assert image.uns["spatia"]["modality"] == "image" and list(image.uns["spatia"]["splits"]) == ["test", "val"]
    # its own keys: the image-only embedding never takes X_spatia's place
    assert set(image.obsm) == {"X_spatia_image", "X_spatia_image_cell", "X_spatia_image_niche",
                               "X_spatia_image_tissue", "spatial"}
    rows = both.adata.obs_names.get_indexer(image.obs_names)
    assert (np.diff(rows) > 0).all()  # the same (bundle) order, a subset
    assert not np.allclose(image.obsm["X_spatia_image"], both.adata.obsm["X_spatia"][rows])

    # withholding genes: the embedding cannot depend on counts (model path, same batches)
    model, info = load_model(checkpoint)
    with torch.no_grad():
        for p in model.gene_encoder.parameters():
            p.add_(torch.randn_like(p))
    perturbed = embed_model(simulated_mist, model, levels=info.levels, modality="image", splits=["test", "val"], threads=1,
                            progress_bar=False).adata
    np.testing.assert_allclose(perturbed.obsm["X_spatia_image"], image.obsm["X_spatia_image"], atol=1e-6)

    with pytest.raises(ConfigError, match="modality"):
        embed_dataset(simulated_mist, checkpoint, modality="text", progress_bar=False)
    with pytest.raises(ConfigError, match="split"):
        embed_dataset(simulated_mist, checkpoint, splits=["holdout"], progress_bar=False)


def test_orientations_average_and_are_recorded(simulated_mist, checkpoint, embedded):
    _, one = embedded
    assert one.adata.uns["spatia"]["orientations"] == 1  # the checkpoint's (helpers.plumbing_config)
    assert load_model(checkpoint)[1].config.image.embed_orientations == 1
    eight = embed_dataset(simulated_mist, checkpoint, orientations=8, splits=["val"], threads=1,
                          progress_bar=False).adata
    assert eight.uns["spatia"]["orientations"] == 8
    rows = one.adata.obs_names.get_indexer(eight.obs_names)
    # the crop as is differs from the mean over its eight orientations, but not by much
    difference = np.abs(one.adata.obsm["X_spatia"][rows] - eight.obsm["X_spatia"]).max()
    assert 1e-5 < difference < np.abs(eight.obsm["X_spatia"]).max()
    gene = embed_dataset(simulated_mist, checkpoint, modality="gene", splits=["val"], threads=1,
                         progress_bar=False).adata
    assert gene.uns["spatia"]["orientations"] == 1  # no image, nothing to turn
    with pytest.raises(ConfigError, match="orientations"):
        embed_dataset(simulated_mist, checkpoint, orientations=4, progress_bar=False)


def test_cell_stage_checkpoint_gives_cell_level_keys(simulated_mist, tmp_path):
    run = pretrain(simulated_mist, tmp_path / "cell", stage="cell", train_overrides=dict(RUN, max_steps=1), threads=1,
                   progress_bar=False)
    adata = embed_dataset(simulated_mist, run.last_checkpoint, splits=["val"], threads=1, progress_bar=False).adata
    assert set(adata.obsm) == {"X_spatia", "X_spatia_cell", "spatial"}
    assert list(adata.uns["spatia"]["levels"]) == ["cell"]


def test_existing_output_is_refused(simulated_mist, checkpoint, embedded):
    path, _ = embedded
    with pytest.raises(OutputExistsError):
        embed_dataset(simulated_mist, checkpoint, path, progress_bar=False)


def test_cli_pretrain_then_embed(simulated_mist, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["pretrain", str(simulated_mist), "-o", str(run), "--stage", "cell", "--max-steps", "2", "--cells-per-tissue",
            "8", "--val-batches", "1", "--val-every", "1", "--threads", "1", "--seed", "3", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((run / "spatia_run.json").read_text())
    assert record["command"] == "pretrain" and record["seed"] == 3
    assert record["config"]["stage"] == "cell" and record["config"]["config"]["train"]["max_steps"] == 2
    assert (run / "checkpoints" / "best.ckpt").is_file()

    again = runner.invoke(app, args)  # a non-empty run directory is refused: exit 2, no traceback
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output

    out = tmp_path / "emb" / "cells.h5ad"
    result = runner.invoke(app, ["embed", str(simulated_mist), "-c", str(run / "checkpoints" / "last.ckpt"), "-o", str(out),
                                 "--split", "test", "--threads", "1", "--orientations", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    adata = anndata.read_h5ad(out)
    assert set(adata.obs["split"]) == {"test"} and "X_spatia_cell" in adata.obsm
    assert adata.uns["spatia"]["orientations"] == 1
    record = json.loads((out.parent / "cells.spatia_run.json").read_text())
    assert record["command"] == "embed" and record["results"]["cells"] == adata.n_obs
    assert record["config"]["orientations"] == 1
    assert record["config"]["splits"] == ["test"] and record["inputs"]["checkpoint"] == str((run / "checkpoints" / "last.ckpt").resolve())
    result = runner.invoke(app, ["embed", str(simulated_mist), "-c", str(run / "checkpoints" / "last.ckpt"), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output

    bad = runner.invoke(app, ["embed", str(simulated_mist), "-c", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x.h5ad")])
    assert bad.exit_code == 2 and "checkpoint" in bad.output


def test_embed_suggests_the_gene_only_embedding_when_the_images_carry_little(simulated_mist, checkpoint, tmp_path):
    """A checkpoint whose measured `fusion.morphometry_weight` is below `GENE_ONLY_HINT_WEIGHT` (as
    on bone-marrow region1, 0.001-0.02) makes `spatia embed` of both modalities print and record a
    hint to embed the gene-only view as well; a full-weight checkpoint (the simulator's) and a
    gene-only embedding do not."""
    from spatia.stages import GENE_ONLY_HINT_WEIGHT, gene_only_hint
    from spatia.train.checkpoints import CHECKPOINT_KEY

    assert gene_only_hint(None) is None and gene_only_hint(GENE_ONLY_HINT_WEIGHT) is None
    assert "--modality gene" in gene_only_hint(0.05)

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved[CHECKPOINT_KEY]["config"]["fusion"]["morphometry_weight"] = 0.05
    weak = tmp_path / "weak.ckpt"
    torch.save(saved, weak)

    runner = CliRunner()
    outputs = {}
    for name, ckpt, modality in (("weak", weak, "both"), ("full", checkpoint, "both"), ("weak_gene", weak, "gene")):
        out = tmp_path / f"{name}.h5ad"
        result = runner.invoke(app, ["embed", str(simulated_mist), "-c", str(ckpt), "-o", str(out), "--split", "test",
                                     "--modality", modality, "--threads", "1"])
        assert result.exit_code == 0, result.output
        outputs[name] = (result.output, json.loads((tmp_path / f"{name}.spatia_run.json").read_text())["results"])

    text, record = outputs["weak"]
    text = " ".join(text.split())  # the console wraps long lines
    assert "hint:" in text and "--modality gene" in text
    assert record["morphometry_weight"] == pytest.approx(0.05) and "--modality gene" in record["hint"]
    for name in ("full", "weak_gene"):
        text, record = outputs[name]
        assert "hint:" not in text and "hint" not in record
    assert outputs["full"][1]["morphometry_weight"] >= GENE_ONLY_HINT_WEIGHT

