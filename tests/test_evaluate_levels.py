"""What each level adds (several label columns, concatenated levels) and the patch-level task."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatia.evaluate import EvaluateConfig, NicheCrops, evaluate, render_markdown
from spatia.evaluate.synthetic import synthetic_evaluation_data
from spatia.evaluate.tasks.patches import niche_image_features, niche_membership, niche_split, pool_by_niche

FAST = dict(n_seeds=1, leiden_resolutions=(0.2, 0.5), layout="none", mlp_hidden=(32,), baselines=("pca",),
            xgb_estimators=30)


@pytest.fixture(scope="module")
def context_results():
    """Cell embeddings carry the type; niche embeddings (shared by the cells of a 100 um tile)
    carry the domain (left / right half of the tissue), which the cell embedding does not."""
    adata, _ = synthetic_evaluation_data(900, n_genes=40, n_types=3, seed=12)
    rng = np.random.default_rng(0)
    xy = adata.obsm["spatial"]
    domain = (xy[:, 0] > 500).astype(int)
    tile = (xy[:, 0] // 100).astype(int) * 100 + (xy[:, 1] // 100).astype(int)
    adata.obs["domain"] = pd.Categorical(np.where(domain == 1, "right", "left"))
    adata.obs["niche_id"] = [f"n{t}" for t in tile]
    tile_noise = rng.normal(size=(tile.max() + 1, 8))
    adata.obsm["X_spatia_niche"] = (3.0 * domain[:, None] + tile_noise[tile]).astype(np.float32)
    adata.obsm["X_spatia_tissue"] = rng.normal(size=(900, 8)).astype(np.float32)
    for key in ("X_spatia", "X_spatia_image", "X_spatia_gene"):
        del adata.obsm[key]
    config = EvaluateConfig(labels=["cell_type", "domain"], tasks=("annotation", "clustering"), **FAST)
    return evaluate(adata, config)


def test_every_label_column_and_level_combination_is_scored(context_results):
    results = context_results
    assert set(results["by_label"]) == {"cell_type", "domain"}
    assert results["tasks"]["annotation"] is results["by_label"]["cell_type"]["annotation"]
    assert results["labels"]["domain"]["n_labels"] == 2
    ann = {c: results["by_label"][c]["annotation"]["results"] for c in ("cell_type", "domain")}
    # Table 4 order, the concatenations right after the cell level
    assert list(ann["domain"])[:5] == ["X_spatia_cell", "X_spatia_cell+niche", "X_spatia_cell+niche+tissue",
                                       "X_spatia_niche", "X_spatia_tissue"]
    assert results["embeddings"]["X_spatia_cell+niche"]["dim"] == 32 + 8
    f1 = {c: {k: v["logreg"]["macro_f1"]["mean"] for k, v in ann[c].items()} for c in ann}
    # the niche level adds the domain, and the cell's own embedding keeps the type
    assert f1["domain"]["X_spatia_cell+niche"] > f1["domain"]["X_spatia_cell"] + 0.3
    assert f1["cell_type"]["X_spatia_cell+niche"] > f1["cell_type"]["X_spatia_niche"] + 0.3
    assert f1["cell_type"]["X_spatia_cell"] > 0.9
    clu = results["by_label"]["domain"]["clustering"]
    assert clu["status"] == "ok" and clu["n_labels"] == 2 and "X_spatia_cell+niche" in clu["results"]
    md = render_markdown(results)
    for text in ("## Cell annotation (labels: domain)", "## Clustering (labels: cell_type)",
                 "## What each level adds", "shared by all cells of a niche", "SPATIA cell + niche (concatenated)"):
        assert text in md, text


def test_niche_pooling_and_split_known_answer():
    ids, rows = niche_membership(np.array(["b", "a", None, "b", ""], dtype=object))
    assert ids.tolist() == ["a", "b"] and rows.tolist() == [1, 0, -1, 1, -1]
    counts = sp.csr_matrix(np.array([[1, 0], [0, 2], [5, 5], [3, 1], [7, 7]], dtype=np.float32))
    assert pool_by_niche(counts, rows, 2).toarray().tolist() == [[0, 2], [4, 1]]
    assert pool_by_niche(np.array([[2.0], [4.0], [9.0], [6.0], [9.0]]), rows, 2, mean=True).ravel().tolist() == [4, 4]
    split = np.array(["train", "test", "test", "buffer", "train"], dtype=object)
    assert niche_split(split, rows, 2).tolist() == ["test", "mixed"]


def _niche_world(n_niches=160, cells_per_niche=6, n_genes=30, size_px=48, seed=0):
    """Niches whose image brightness and nucleus count set the expression of half of the genes."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(0, 1, n_niches)
    images = np.empty((n_niches, size_px, size_px), dtype=np.uint8)
    grid = np.arange(size_px)
    for i, z in enumerate(latent):
        img = rng.normal(20, 4, (size_px, size_px))
        for _ in range(2 + int(10 * z)):
            r, c = rng.integers(5, size_px - 5, 2)
            img[(grid[:, None] - r) ** 2 + (grid[None, :] - c) ** 2 < 12] = 80 + 150 * z
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    niche = np.repeat(np.arange(n_niches), cells_per_niche)
    base = rng.gamma(2.0, 1.0, n_genes)
    effect = np.zeros(n_genes)
    effect[: n_genes // 2] = 3.0
    rate = base[None, :] * np.exp(effect[None, :] * (latent[niche][:, None] - 0.5))
    counts = rng.poisson(rate).astype(np.float32)
    return latent, images, niche, counts


def test_patch_task_recovers_image_driven_niche_expression():
    import anndata as ad

    latent, images, niche, counts = _niche_world()
    n = len(niche)
    adata = ad.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=[f"g{j}" for j in range(counts.shape[1])]))
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obs["niche_id"] = [f"niche{j}" for j in niche]
    adata.obs["split"] = np.where(niche % 4 == 0, "test", "train")
    adata.obs["kind"] = np.where(latent[niche] > 0.5, "bright", "dim")
    rng = np.random.default_rng(1)
    adata.obsm["X_spatia_image"] = rng.normal(size=(n, 6)).astype(np.float32)  # carries nothing
    crops = NicheCrops(images[::-1], np.array([f"niche{j}" for j in range(len(latent))])[::-1])  # any order
    config = EvaluateConfig(labels="kind", split="split", tasks=("patch_expression",), n_hvg=10,
                            hvg_min_detection=0.0, level_concatenations=(), **FAST)
    task = evaluate(adata, config, niche_crops=crops)["tasks"]["patch_expression"]
    assert task["status"] == "ok"
    assert task["n_niches"] == 160 and task["n_test"] == 40 and task["n_train"] == 120 and task["n_left_out"] == 0
    assert len(task["genes"]) == 10 and task["median_cells_per_niche"] == 6
    res = task["results"]
    assert set(res) == {"X_spatia_image", "niche_morphology"}
    for model in ("xgboost", "ridge"):
        assert len(res["niche_morphology"][model]["per_gene_pearson"]) == 10
        assert res["niche_morphology"][model]["pearson"]["mean"] > 0.5, model
        assert abs(res["X_spatia_image"][model]["pearson"]["mean"]) < 0.25, model
    features = niche_image_features(images[:5])
    assert len(features) == 5 and "foreground_components" in features and np.isfinite(features.to_numpy()).all()


def test_patch_task_skips_without_niche_ids():
    adata, _ = synthetic_evaluation_data(300, n_genes=30, seed=13)
    config = EvaluateConfig(labels="cell_type", tasks=("patch_expression",), **FAST)
    task = evaluate(adata, config)["tasks"]["patch_expression"]
    assert task["status"].startswith("skipped: the AnnData has no obs column 'niche_id'")
