"""Evaluation tasks on synthetic data with known answers: strong signal, shuffled labels, no signal."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from spatia.config import load_config
from spatia.errors import ConfigError, InputDataError
from spatia.evaluate import EvaluateConfig, KnnImputer, evaluate, hold_out_mask, metrics_payload
from spatia.evaluate.synthetic import synthetic_evaluation_data

FAST = dict(n_seeds=2, leiden_resolutions=(0.1, 0.5), layout="none", xgb_estimators=30, mlp_hidden=(64,),
            baselines=("pca",))


@pytest.fixture(scope="module")
def strong():
    adata, crops = synthetic_evaluation_data(700, n_genes=80, n_types=4, signal=1.0, seed=0)
    # a stand-in for the model's gene decoder: kNN on the image-only embedding
    train = np.ones(adata.n_obs, dtype=bool)
    calls = []

    def decoder(counts, held_out_mask, obs_names):
        calls.append((counts, held_out_mask, obs_names))
        knn = KnnImputer(adata.obsm["X_spatia_image"], adata.obs_names.to_numpy(), train, adata.X, k=10)
        return knn(counts, held_out_mask, obs_names)

    results = evaluate(adata, EvaluateConfig(labels="cell_type", **FAST), crops=crops, imputer=decoder)
    return adata, results, calls


def test_strong_signal_reaches_high_scores(strong):
    _, results, _ = strong
    tasks = results["tasks"]
    assert [tasks[t]["status"] for t in ("annotation", "clustering", "expression", "imputation")] == ["ok"] * 4
    ann = tasks["annotation"]["results"]
    expected = {"X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue", "X_spatia_image", "X_spatia_gene",
                "X_spatia_cell+niche", "X_spatia_cell+niche+tissue", "pca", "morphology", "pca+morphology"}
    assert set(ann) == expected
    for key in ("X_spatia", "X_spatia_cell", "pca", "morphology", "pca+morphology"):
        assert ann[key]["mlp"]["macro_f1"]["mean"] > 0.9, key
        assert len(ann[key]["mlp"]["macro_f1"]["values"]) == 2
        assert ann[key]["logreg"]["accuracy"]["mean"] > 0.9, key
    # noisier levels score lower: the ordering of the simulation is recovered
    assert ann["X_spatia"]["logreg"]["macro_f1"]["mean"] > ann["X_spatia_tissue"]["logreg"]["macro_f1"]["mean"]
    clu = tasks["clustering"]["results"]
    for key in ("X_spatia", "pca", "morphology"):
        assert clu[key]["leiden_best"]["ari"]["mean"] > 0.8, key
        assert clu[key]["kmeans"]["ari"]["mean"] > 0.8, key
        assert clu[key]["leiden_label_free"]["resolution"] in (0.1, 0.5)
    exp = tasks["expression"]["results"]
    assert set(exp) == {"X_spatia_image", "morphology"}
    for key in exp:
        for model in ("xgboost", "ridge"):
            assert exp[key][model]["pearson"]["mean"] > 0.3, (key, model)
            assert len(exp[key][model]["per_gene_pearson"]) == 50
    imp = tasks["imputation"]["results"]
    assert imp["model"]["status"] == "ok"
    # neighbours of the right type predict held-out genes better than the global mean profile
    assert imp["knn_expression"]["pearson_per_gene"]["mean"] > imp["gene_mean"]["pearson_per_gene"]["mean"] + 0.05
    assert imp["model"]["pearson_per_gene"]["mean"] > imp["gene_mean"]["pearson_per_gene"]["mean"] + 0.05


def test_imputer_receives_masked_test_cells_only(strong):
    adata, results, calls = strong
    assert len(calls) == 2  # one call per seed
    counts, mask, names = calls[0]
    assert sp.issparse(counts) and mask.dtype == bool and counts.shape == mask.shape
    assert np.all(counts.toarray()[mask] == 0)  # held-out entries hidden
    n_hold = results["tasks"]["imputation"]["n_held_out_per_cell"]
    assert np.all(mask.sum(axis=1) == n_hold) and n_hold == 8  # 10 % of 80 genes
    assert set(names) <= set(adata.obs_names)
    assert results["tasks"]["imputation"]["n_cells"] == results["split"]["n_test"] == len(names)
    assert not np.array_equal(calls[0][1], calls[1][1])  # a different mask per seed


def test_metrics_are_json_without_nan(strong):
    _, results, _ = strong
    text = json.dumps(metrics_payload(results), allow_nan=False)
    payload = json.loads(text)
    assert payload["seeds"] == [0, 1] and payload["config"]["labels"] == ["cell_type"]
    assert payload["split"]["n_train"] + payload["split"]["n_test"] + payload["split"]["n_buffer"] == 700
    assert payload["split"]["min_train_test_distance_um"] >= 50.0
    assert "plots" not in payload


def test_shuffled_labels_fall_to_chance():
    adata, crops = synthetic_evaluation_data(700, n_genes=80, n_types=4, signal=1.0, seed=1)
    adata.obs["shuffled"] = np.random.default_rng(0).permutation(adata.obs["cell_type"].to_numpy())
    config = EvaluateConfig(labels="shuffled", tasks=("annotation", "clustering"),
                            embeddings=("X_spatia", "X_spatia_image"), **FAST)
    results = evaluate(adata, config, crops=crops)
    ann = results["tasks"]["annotation"]["results"]
    for key, entry in ann.items():
        assert entry["mlp"]["macro_f1"]["mean"] < 0.4, key  # 4 balanced classes: chance 0.25
        assert entry["logreg"]["accuracy"]["mean"] < 0.4, key
    for key, entry in results["tasks"]["clustering"]["results"].items():
        assert abs(entry["kmeans"]["ari"]["mean"]) < 0.03, key
        assert abs(entry["leiden_label_free"]["ari"]["mean"]) < 0.03, key
        assert entry["kmeans"]["nmi"]["mean"] < 0.03, key
    assert results["tasks"]["expression"]["status"] == "skipped: not requested"


def test_no_signal_expression_prediction_is_near_zero():
    adata, crops = synthetic_evaluation_data(700, n_genes=80, n_types=4, signal=0.0, seed=2)
    config = EvaluateConfig(labels="cell_type", tasks=("expression",), **FAST)
    exp = evaluate(adata, config, crops=crops)["tasks"]["expression"]["results"]
    for key in exp:
        for model in ("xgboost", "ridge"):
            assert abs(exp[key][model]["pearson"]["mean"]) < 0.1, (key, model)


def test_ridge_penalty_is_chosen_on_the_train_cells():
    """Pure-noise features get the strongest penalty of the grid, a clean linear signal the
    weakest; on a wide representation with few train cells (breast's regime: 150 dimensions,
    200 train cells) the chosen penalty predicts better than a fixed weak one; one value fixes it."""
    from spatia.evaluate.tasks.expression import fit_and_score

    rng = np.random.default_rng(0)
    n, split = 400, np.arange(400) < 200
    config = EvaluateConfig(labels="cell_type", xgb_estimators=5)
    noise = fit_and_score(rng.normal(size=(n, 20)), rng.normal(size=(n, 4)), split, ~split, config)
    assert noise["ridge"]["alpha"] == max(config.ridge_alphas)
    x = rng.normal(size=(n, 5))
    clean = fit_and_score(x, x @ rng.normal(size=(5, 4)), split, ~split, config)
    assert clean["ridge"]["alpha"] == min(config.ridge_alphas) and clean["ridge"]["pearson"]["mean"] > 0.999
    wide = rng.normal(size=(n, 150))
    y = wide[:, :3] @ np.ones((3, 6)) + 2.0 * rng.normal(size=(n, 6))
    chosen = fit_and_score(wide, y, split, ~split, config)["ridge"]
    fixed = fit_and_score(wide, y, split, ~split, dataclasses.replace(config, ridge_alphas=(0.01,)))["ridge"]
    assert fixed["alpha"] == 0.01 and chosen["pearson"]["mean"] > fixed["pearson"]["mean"] + 0.05
    with pytest.raises(ConfigError, match="ridge_alphas"):
        EvaluateConfig(labels="cell_type", ridge_alphas=())
    with pytest.raises(ConfigError, match="ridge_alphas"):
        EvaluateConfig(labels="cell_type", ridge_alphas=(1.0, -1.0))


def test_logistic_regression_strength_is_chosen_on_the_train_cells():
    """A wide input on few train cells: 128 dimensions whose class signal is spread thinly over
    every dimension, 200 train cells in 4 classes. C = 100 (next to no penalty) fits the noise; the
    chosen C is stronger and scores better macro-F1 on the test cells; one value fixes C; bad grids
    are refused."""
    from sklearn.metrics import f1_score

    from spatia.evaluate.tasks.annotation import fit_logistic_regression

    rng = np.random.default_rng(0)
    n, train = 1200, np.arange(1200) < 200
    y = rng.integers(0, 4, size=n).astype(str)
    centres = 0.2 * rng.normal(size=(4, 128))
    x = centres[y.astype(int)] + rng.normal(size=(n, 128))
    config = EvaluateConfig(labels="cell_type")

    def test_f1(model) -> float:
        return f1_score(y[~train], model.predict(x[~train]), average="macro")

    chosen, c = fit_logistic_regression(x[train], y[train], config)
    weak, c_weak = fit_logistic_regression(x[train], y[train], dataclasses.replace(config, logreg_cs=(100.0,)))
    assert c in config.logreg_cs and c <= 0.1 and c_weak == 100.0
    assert test_f1(chosen) > test_f1(weak) + 0.05
    # a class with 2 train cells still fits (folds capped at its count)
    y_rare = y[train].copy()
    y_rare[:2] = "rare"
    assert "rare" in fit_logistic_regression(x[train], y_rare, config)[0].classes_
    # C chosen on a subsample of the train cells, then the model refit on all of them
    capped, c_capped = fit_logistic_regression(x[train], y[train], dataclasses.replace(config, logreg_cv_max_cells=120))
    assert c_capped in config.logreg_cs and capped.coef_.shape == (4, 128)
    refit = fit_logistic_regression(x[train], y[train], dataclasses.replace(config, logreg_cs=(c_capped,)))[0]
    np.testing.assert_allclose(capped.coef_, refit.coef_)
    # two classes (e.g. a left / right label) fit without warnings: macro-F1 needs no pos_label
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two, _ = fit_logistic_regression(x[train], np.where(y[train] == "0", "left", "right"), config)
    assert list(two.classes_) == ["left", "right"]
    with pytest.raises(ConfigError, match="logreg_cs"):
        EvaluateConfig(labels="cell_type", logreg_cs=())
    with pytest.raises(ConfigError, match="logreg_cs"):
        EvaluateConfig(labels="cell_type", logreg_cs=(0.0, 1.0))
    with pytest.raises(ConfigError, match="logreg_cv_folds"):
        EvaluateConfig(labels="cell_type", logreg_cv_folds=1)
    with pytest.raises(ConfigError, match="logreg_cv_max_cells"):
        EvaluateConfig(labels="cell_type", logreg_cv_max_cells=4)


def test_oracle_imputer_scores_one_and_missing_model_is_skipped():
    adata, _ = synthetic_evaluation_data(500, n_genes=60, seed=3)
    truth = adata.X.toarray()
    rows = {name: i for i, name in enumerate(adata.obs_names)}

    def oracle(counts, held_out_mask, obs_names):
        return truth[[rows[n] for n in obs_names]].astype(float)

    config = EvaluateConfig(labels="cell_type", tasks=("imputation",), **FAST)
    imp = evaluate(adata, config, imputer=oracle)["tasks"]["imputation"]["results"]
    assert imp["model"]["pearson"]["mean"] == pytest.approx(1.0)
    assert imp["model"]["spearman"]["mean"] == pytest.approx(1.0)
    skipped = evaluate(adata, config)["tasks"]["imputation"]["results"]
    assert skipped["model"] == {"status": "skipped: no model given"}
    assert skipped["knn_expression"]["status"] == "ok"


def test_hold_out_mask_counts_and_seed():
    mask = hold_out_mask(50, 40, 0.25, seed=0)
    assert mask.shape == (50, 40) and np.all(mask.sum(axis=1) == 10)
    assert np.array_equal(mask, hold_out_mask(50, 40, 0.25, seed=0))
    assert not np.array_equal(mask, hold_out_mask(50, 40, 0.25, seed=1))
    assert hold_out_mask(3, 5, 0.01, seed=0).sum(axis=1).tolist() == [1, 1, 1]


def test_split_column_is_used_and_max_cells_subsamples():
    adata, _ = synthetic_evaluation_data(600, n_genes=40, seed=4)
    adata.obs["fold"] = np.where(np.arange(600) % 3 == 0, "test", "train")
    config = EvaluateConfig(labels="cell_type", split="fold", tasks=("annotation",), embeddings=("X_spatia",),
                            max_cells=450, **FAST)
    results = evaluate(adata, config)
    assert results["split"]["source"] == "column:fold"
    assert results["dataset"]["n_cells"] == 450
    assert results["split"]["n_train"] + results["split"]["n_test"] == 450
    assert results["tasks"]["annotation"]["n_test"] == results["split"]["n_test"]
    assert "morphology" not in results["tasks"]["annotation"]["results"]  # no crops: no morphology baseline
    assert results["embeddings"]["morphology"]["source"].startswith("skipped")


def test_user_mistakes_raise_clear_errors():
    adata, crops = synthetic_evaluation_data(200, n_genes=30, seed=5)
    with pytest.raises(InputDataError, match="no obs column 'celltype'"):
        evaluate(adata, EvaluateConfig(labels="celltype"))
    with pytest.raises(InputDataError, match="X_missing"):
        evaluate(adata, EvaluateConfig(labels="cell_type", embeddings=("X_missing",)))
    adata.obs["one"] = "a"
    with pytest.raises(InputDataError, match="1 distinct value"):
        evaluate(adata, EvaluateConfig(labels="one"))
    bad = adata.copy()
    bad.obsm["X_spatia"][0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        evaluate(bad, EvaluateConfig(labels="cell_type", tasks=("annotation",)))
    crops.cell_ids = crops.cell_ids[:-1]
    crops.images, crops.masks = crops.images[:-1], crops.masks[:-1]
    with pytest.raises(InputDataError, match="1 of 200 cells have no crop"):
        evaluate(adata, EvaluateConfig(labels="cell_type", tasks=("annotation",)), crops=crops)
    del adata.obsm["spatial"]
    with pytest.raises(InputDataError, match="spatial"):
        evaluate(adata, EvaluateConfig(labels="cell_type"))
    with pytest.raises(ConfigError, match="unknown evaluation task"):
        EvaluateConfig(labels="x", tasks=("annotate",))
    with pytest.raises(ConfigError, match="unknown key 'n_seed'"):
        load_config(EvaluateConfig, {"labels": "x", "n_seed": 2})
    with pytest.raises(ConfigError, match="'labels' is not set"):
        load_config(EvaluateConfig, {"n_seeds": 2})
    with pytest.raises(ConfigError, match="'labels' is not set"):
        evaluate(adata, EvaluateConfig())
    with pytest.raises(ConfigError, match="level_concatenations"):
        EvaluateConfig(labels="x", level_concatenations=("cell+cell",))
