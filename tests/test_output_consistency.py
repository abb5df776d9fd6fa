"""Outputs of one run agree so that they merge: `cells.h5ad` (the reader, as the demo writes it)
and the `spatia embed` files of a bundle whose build skips cells (zero counts, no polygon) hold
the same cells in the same order under the same names, the same label columns and the same raw
counts; skipped cells are kept, flagged with the build's reason and NaN embeddings; the image-only
and gene-only embeddings have their own keys; evaluate, flow and `tl.embed` use the embedded
cells only."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import plumbing_config, write_10x_h5

from spatia.errors import InputDataError
from spatia.keys import EMBEDDED_FLAG, EMBEDDING_KEYS_OF_MODALITY, SKIP_REASON

ZERO_COUNT_ROWS = [3, 50, 51, 400]  # rows of cells.parquet whose counts the test removes
NO_POLYGON_ROWS = [10, 11, 300]  # rows whose boundary polygons get unknown cell IDs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 600-cell bundle with 7 cells the build must skip, its dataset, a 1-step checkpoint, the
    demo's cells.h5ad and the embeddings of the three modalities."""
    from spatia.demo import annotated_anndata
    from spatia.io.matrix import read_feature_matrix
    from spatia.mist import BuildConfig, build_dataset
    from spatia.sim import SimulationConfig, simulate_bundle
    from spatia.train import embed_dataset, pretrain

    root = tmp_path_factory.mktemp("consistency")
    bundle = root / "bundle"
    simulate_bundle(bundle, SimulationConfig(n_cells=600, n_genes=140), seed=5)
    matrix = read_feature_matrix(bundle / "cell_feature_matrix.h5")
    counts = matrix.counts.tolil()
    counts[ZERO_COUNT_ROWS, :] = 0
    write_10x_h5(bundle / "cell_feature_matrix.h5", counts.tocsr(), matrix.barcodes, matrix.feature_ids,
                 matrix.feature_names, matrix.feature_types)
    boundaries = pd.read_parquet(bundle / "cell_boundaries.parquet")
    cell_ids = pd.read_parquet(bundle / "cells.parquet")["cell_id"].astype(str).to_numpy()
    lost = set(cell_ids[NO_POLYGON_ROWS])
    boundaries["cell_id"] = [f"unknown_{c}" if c in lost else c for c in boundaries["cell_id"].astype(str)]
    boundaries.to_parquet(bundle / "cell_boundaries.parquet")

    mist = root / "mist"
    build_dataset([bundle], mist, BuildConfig.cpu(), seed=0)
    overrides = dict(cells_per_tissue=8, max_steps=1, val_batches=0, log_every_n_steps=1, checkpoint_every_n_steps=1)
    checkpoint = pretrain(mist, root / "run", config=plumbing_config(), train_overrides=overrides, threads=1,
                          progress_bar=False).last_checkpoint
    _, cells = annotated_anndata(bundle)
    cells.write_h5ad(root / "cells.h5ad")
    paths = {"bundle": bundle, "mist": mist, "checkpoint": checkpoint, "cells": root / "cells.h5ad", "ids": cell_ids}
    for modality in ("both", "image", "gene"):
        paths[modality] = root / f"embeddings_{modality}.h5ad"
        embed_dataset(mist, checkpoint, paths[modality], modality=modality, threads=1, progress_bar=False)
    return paths


def test_cells_and_embeddings_hold_the_same_cells_names_labels_and_counts(run):
    cells = ad.read_h5ad(run["cells"])
    for modality in ("both", "image", "gene"):
        emb = ad.read_h5ad(run[modality])
        assert list(emb.obs_names) == list(cells.obs_names) == list(run["ids"])  # the bundle's order
        # label columns: the bundle's clustering and the simulator's truth, same names and values
        for column in ("gene_expression_graphclust", "truth_cell_type", "truth_state", "truth_domain"):
            assert column in cells.obs and column in emb.obs, column
            assert (cells.obs[column].astype(str).to_numpy() == emb.obs[column].astype(str).to_numpy()).all(), column
        # raw counts: same dtype, same values (columns matched by gene name)
        assert cells.X.dtype == emb.X.dtype == np.float32
        assert sorted(emb.var_names) == sorted(cells.var_names)
        assert abs(cells[:, emb.var_names].X - emb.X).sum() == 0
        np.testing.assert_array_equal(cells.obsm["spatial"], emb.obsm["spatial"])


def test_skipped_cells_are_kept_with_the_builds_reason_and_nan_embeddings(run):
    emb = ad.read_h5ad(run["both"])
    reasons = emb.obs[SKIP_REASON]
    expected = {**{run["ids"][r]: "zero_counts" for r in ZERO_COUNT_ROWS},
                **{run["ids"][r]: "no_polygon" for r in NO_POLYGON_ROWS}}
    assert reasons[reasons.notna()].astype(str).to_dict() == expected
    flag = emb.obs[EMBEDDED_FLAG].to_numpy()
    assert flag.dtype == bool and (~flag).sum() == len(expected) and (flag == reasons.isna().to_numpy()).all()
    assert emb.uns["spatia"]["n_skipped"] == len(expected)
    for key in EMBEDDING_KEYS_OF_MODALITY["both"].values():
        assert np.isnan(emb.obsm[key][~flag]).all() and np.isfinite(emb.obsm[key][flag]).all(), key
    # the no-polygon cells keep their counts; the zero-count ones have none
    assert emb.X[[list(emb.obs_names).index(run["ids"][r]) for r in NO_POLYGON_ROWS]].sum() > 0
    assert emb.X[[list(emb.obs_names).index(run["ids"][r]) for r in ZERO_COUNT_ROWS]].sum() == 0


def test_modalities_have_their_own_keys_and_merge_without_clobbering(run):
    files = {m: ad.read_h5ad(run[m]) for m in ("both", "image", "gene")}
    keys = {m: set(a.obsm) - {"spatial"} for m, a in files.items()}
    assert keys["image"] == set(EMBEDDING_KEYS_OF_MODALITY["image"].values())
    assert keys["gene"] == set(EMBEDDING_KEYS_OF_MODALITY["gene"].values())
    assert keys["both"] == set(EMBEDDING_KEYS_OF_MODALITY["both"].values())
    assert not (keys["both"] & keys["image"]) and not (keys["both"] & keys["gene"]) and not (keys["image"] & keys["gene"])
    merged = files["both"].copy()
    for other in ("image", "gene"):
        merged.obsm.update(files[other].obsm)
    assert set(merged.obsm) == keys["both"] | keys["image"] | keys["gene"] | {"spatial"}
    for m, adata in files.items():  # nothing was overwritten
        for key in keys[m]:
            np.testing.assert_array_equal(merged.obsm[key], adata.obsm[key])
    with pytest.warns(UserWarning):  # the same genes twice: anndata warns that var names repeat
        side_by_side = ad.concat([files["both"], files["image"]], axis=1, merge="unique")
    assert keys["both"] | keys["image"] <= set(side_by_side.obsm)


def test_evaluate_scores_the_embedded_cells_of_the_new_files(run, tmp_path):
    from spatia import stages
    from spatia.evaluate import EvaluateConfig

    config = EvaluateConfig(labels="truth_cell_type", tasks=("annotation",), baselines=("pca",), n_seeds=1,
                            layout="none", split="split", mlp_hidden=(16,), level_concatenations=(),
                            embeddings=("X_spatia", "X_spatia_image", "X_spatia_gene", "X_spatia_image_niche"))
    inputs = stages.EvaluateInputs(image_embeddings=run["image"], gene_embeddings=run["gene"])
    result = stages.evaluate(run["both"], tmp_path / "report", config, inputs)
    n_embedded = int(ad.read_h5ad(run["both"]).obs[EMBEDDED_FLAG].sum())
    assert result.detail["dataset"]["n_cells"] == n_embedded
    scored = set(result.detail["tasks"]["annotation"]["results"])
    assert {"X_spatia", "X_spatia_image", "X_spatia_gene", "X_spatia_image_niche"} <= scored


def test_an_image_file_of_an_older_embed_is_refused_with_the_fix(run, tmp_path):
    from spatia import stages
    from spatia.evaluate import EvaluateConfig

    old = ad.read_h5ad(run["image"])
    for key in list(old.obsm):  # an older `spatia embed --modality image` wrote X_spatia, X_spatia_cell, ...
        if key.startswith("X_spatia_image"):
            old.obsm[key.replace("X_spatia_image", "X_spatia")] = old.obsm.pop(key)
    old.write_h5ad(tmp_path / "old_image.h5ad")
    config = EvaluateConfig(labels="truth_cell_type", tasks=("annotation",), baselines=("pca",), n_seeds=1,
                            layout="none")
    with pytest.raises(InputDataError) as error:
        stages.evaluate(run["both"], tmp_path / "report", config,
                        stages.EvaluateInputs(image_embeddings=tmp_path / "old_image.h5ad"))
    message = str(error.value)
    assert "old_image.h5ad" in message and "X_spatia_image" in message
    assert "re-run `spatia embed --modality image`" in message


def test_tl_embed_flags_the_cells_the_build_skipped(run):
    import spatia

    cells = ad.read_h5ad(run["cells"])
    spatia.tl.embed(cells, run["checkpoint"], dataset=run["mist"], progress_bar=False)
    reference = ad.read_h5ad(run["both"])
    np.testing.assert_array_equal(cells.obs[EMBEDDED_FLAG].to_numpy(), reference.obs[EMBEDDED_FLAG].to_numpy())
    np.testing.assert_allclose(cells.obsm["X_spatia"], reference.obsm["X_spatia"], rtol=1e-5, atol=1e-6)


def test_flow_data_leaves_out_pairs_with_a_skipped_cell(run, tmp_path):
    from spatia.flow.data import load_flow_data
    from spatia.perturb import Signatures

    emb = ad.read_h5ad(run["both"])
    flag = emb.obs[EMBEDDED_FLAG].to_numpy()
    kept, skipped = emb.obs_names[flag], emb.obs_names[~flag]
    pairs = pd.DataFrame({"x_ctrl_id": [kept[0], kept[1], skipped[0], kept[2]],
                          "x_tgt_id": [kept[5], kept[6], kept[7], skipped[1]],
                          "transition_tag": "t1", "slide_id": "bundle", "match_score": 1.0})
    (tmp_path / "pairs").mkdir()
    pairs.to_parquet(tmp_path / "pairs" / "pairs.parquet")
    Signatures(transitions=["t1"], tasks=["task"], genes=["g0", "g1"], delta=np.ones((1, 2)),
               mean_ctrl=np.zeros((1, 2)), mean_tgt=np.ones((1, 2)), n_pairs=np.array([2])).write(tmp_path / "pairs")
    data = load_flow_data(run["mist"], tmp_path / "pairs", run["both"], signature_pcs=1)
    assert data.pairs["pair_id"].tolist() == [0, 1]  # the pairs with a skipped cell are left out
    assert set(data.cell_ids) == {kept[i] for i in (0, 1, 5, 6)}
    assert all(np.isfinite(v).all() for v in data.embeddings.values())
