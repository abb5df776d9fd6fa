"""`evaluate` on the real Xenium section, with the 10x graph clusters as labels.

No SPATIA model has embedded this section in the test suite, so the representations scored
are the baselines (PCA of log-expression, morphology features of the MIST crops, both).
Median depth is 7 counts per cell and there are 35 graph clusters, so the bars are set well
above chance, not near perfection. Full-section figures: benchmarks/bench_evaluate.py --real.
"""

import json

import numpy as np
import pytest

from spatia.evaluate import EvaluateConfig, crops_from_mist, evaluate, morphology_features, write_report

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_inputs(real_bundle, tmp_path_factory):
    from spatia.io.xenium import read_xenium
    from spatia.mist import build_dataset

    adata = read_xenium(real_bundle).to_anndata()
    mist_dir = tmp_path_factory.mktemp("mist") / "dataset"
    build_dataset([real_bundle], mist_dir)
    keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, size=4000, replace=False))
    adata = adata[keep].copy()
    crops = crops_from_mist(mist_dir, adata.obs_names.to_numpy().astype(str))
    adata = adata[adata.obs_names.isin(crops.cell_ids)].copy()  # MIST skips cells without counts
    return adata, crops


def test_mist_crops_match_the_cells(real_inputs):
    adata, crops = real_inputs
    order = {c: i for i, c in enumerate(crops.cell_ids)}
    rows = np.array([order[c] for c in adata.obs_names])
    features = morphology_features(crops.images[rows[:1000]], crops.masks[rows[:1000]])
    area_um2 = adata.obs["cell_area_um2"].to_numpy()[:1000]
    # one global scale per slide: crop pixel area is proportional to the polygon area
    assert np.corrcoef(features["area_px"], area_um2)[0, 1] > 0.99


def test_real_section_evaluation(real_inputs, tmp_path):
    adata, crops = real_inputs
    config = EvaluateConfig(labels="gene_expression_graphclust", n_seeds=2, layout="none",
                            leiden_resolutions=(0.5, 1.0, 2.0), xgb_max_train_cells=1500, baselines=("pca",))
    results = evaluate(adata, config, crops=crops)
    split = results["split"]
    assert split["min_train_test_distance_um"] >= 50.0 and split["n_test"] > 500
    assert set(results["embeddings"]) == {"pca", "morphology", "pca+morphology"}
    ann = results["tasks"]["annotation"]
    n_classes = len(ann["classes"])
    pca = ann["results"]["pca"]
    assert pca["mlp"]["macro_f1"]["mean"] > 5.0 / n_classes  # chance macro-F1 is about 1 / n_classes
    assert pca["logreg"]["accuracy"]["mean"] > ann["chance_accuracy"] + 0.2
    clu = results["tasks"]["clustering"]["results"]["pca"]
    assert clu["leiden_best"]["ari"]["mean"] > 0.05 and clu["leiden_best"]["nmi"]["mean"] > 0.15
    exp = results["tasks"]["expression"]
    assert exp["status"] == "ok" and len(exp["genes"]) == 50
    assert results["tasks"]["imputation"]["results"]["model"]["status"] == "skipped: no model given"
    out = write_report(results, tmp_path / "report")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["label_column"] == "gene_expression_graphclust"
    print(json.dumps({k: {e: round(v["mlp"]["macro_f1"]["mean"], 3) for e, v in ann["results"].items()}
                      for k in ["annotation_mlp_macro_f1"]}))
