"""The paired bootstrap behind the verdicts: weighted metrics against sklearn / per_column_corr on
explicitly resampled rows, the interval's behaviour, and its place in `evaluate` and the headline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from spatia.evaluate.bootstrap import (
    MACRO_F1,
    MEAN_PEARSON,
    HeldOutPredictions,
    paired_difference,
    resample_counts,
    weighted_macro_f1,
    weighted_mean_pearson,
)
from spatia.evaluate.metrics import per_column_corr

FAST = {"n_seeds": 2, "leiden_resolutions": (0.5,), "xgb_estimators": 20, "mlp_hidden": (32,), "layout": "none",
        "baselines": ("pca",)}


def _labels(rng, n, classes=("a", "b", "c", "d")):
    truth = rng.choice(classes, size=n)
    pred = np.where(rng.random(n) < 0.6, truth, rng.choice(classes, size=n))
    return truth, pred


def test_resample_counts_draw_n_units_per_resample():
    counts = resample_counts(50, 20, np.random.default_rng(0))
    assert counts.shape == (20, 50)
    np.testing.assert_array_equal(counts.sum(axis=1), 50)
    assert (counts >= 0).all() and (counts == np.round(counts)).all()
    np.testing.assert_array_equal(counts, resample_counts(50, 20, np.random.default_rng(0)))


def test_weighted_macro_f1_is_sklearn_on_the_resampled_rows():
    rng = np.random.default_rng(1)
    truth, pred = _labels(rng, 120)
    classes = ["a", "b", "c", "d", "e"]  # "e" never occurs: sklearn scores it 0 with zero_division=0
    weights = resample_counts(120, 5, rng)
    got = weighted_macro_f1(truth, pred, classes, np.vstack([np.ones(120), weights]))
    assert got[0] == pytest.approx(f1_score(truth, pred, labels=classes, average="macro", zero_division=0))
    for r, w in enumerate(weights, start=1):
        rows = np.repeat(np.arange(120), w.astype(int))
        want = f1_score(truth[rows], pred[rows], labels=classes, average="macro", zero_division=0)
        assert got[r] == pytest.approx(want)


def test_weighted_mean_pearson_is_per_column_corr_on_the_resampled_rows():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(80, 6))
    pred = truth + rng.normal(scale=1.5, size=truth.shape)
    truth[:, 5] = 3.0  # a constant gene is left out of the mean, as regression_scores does
    weights = resample_counts(80, 4, rng)
    got = weighted_mean_pearson(truth, pred, np.vstack([np.ones(80), weights]))
    assert got[0] == pytest.approx(np.nanmean(per_column_corr(truth, pred)[0]))
    for r, w in enumerate(weights, start=1):
        rows = np.repeat(np.arange(80), w.astype(int))
        assert got[r] == pytest.approx(np.nanmean(per_column_corr(truth[rows], pred[rows])[0]))


def test_identical_rows_differ_by_exactly_zero():
    rng = np.random.default_rng(3)
    truth, pred = _labels(rng, 60)
    a = HeldOutPredictions(MACRO_F1, truth, [pred, pred], ["a", "b", "c", "d"])
    out = paired_difference(a, a, 200, seed=0)
    assert out["difference"] == 0.0 and out["interval"] == [0.0, 0.0]
    assert out["resolved"] is False and out["n_test"] == 60 and out["n_resamples"] == 200


def test_a_real_lead_is_resolved_and_a_small_test_set_is_not():
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(400, 10))
    good = truth + rng.normal(scale=1.0, size=truth.shape)       # Pearson ~0.71 per gene
    weak = truth + rng.normal(scale=2.0, size=truth.shape)       # ~0.45
    lead = paired_difference(HeldOutPredictions(MEAN_PEARSON, truth, [good]),
                             HeldOutPredictions(MEAN_PEARSON, truth, [weak]), 500, seed=0)
    low, high = lead["interval"]
    assert lead["resolved"] and 0 < low < lead["difference"] < high
    assert lead["difference"] == pytest.approx(np.nanmean(per_column_corr(truth, good)[0])
                                               - np.nanmean(per_column_corr(truth, weak)[0]))
    # two equally good predictors on 30 units: the interval straddles 0
    truth30 = truth[:30]
    one = truth30 + rng.normal(scale=1.0, size=truth30.shape)
    two = truth30 + rng.normal(scale=1.0, size=truth30.shape)
    tie = paired_difference(HeldOutPredictions(MEAN_PEARSON, truth30, [one]),
                            HeldOutPredictions(MEAN_PEARSON, truth30, [two]), 500, seed=0)
    assert tie["interval"][0] < 0 < tie["interval"][1] and tie["resolved"] is False
    again = paired_difference(HeldOutPredictions(MEAN_PEARSON, truth30, [one]),
                              HeldOutPredictions(MEAN_PEARSON, truth30, [two]), 500, seed=0)
    assert again == tie  # seeded


def test_rows_must_share_metric_and_units():
    truth = np.zeros((10, 2))
    with pytest.raises(ValueError):
        paired_difference(HeldOutPredictions(MEAN_PEARSON, truth, [truth]),
                          HeldOutPredictions(MEAN_PEARSON, truth[:5], [truth[:5]]), 10, seed=0)


def test_evaluate_pairs_the_verdict_rows_and_the_headline_reports_the_interval():
    from spatia.evaluate import EvaluateConfig, evaluate
    from spatia.evaluate.report import summary_figures
    from spatia.evaluate.synthetic import synthetic_evaluation_data
    from spatia.evaluate.verdicts import headline, task_verdicts

    adata, crops = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=5)
    config = EvaluateConfig(labels="cell_type", embeddings=("X_spatia", "X_spatia_image"),
                            **{**FAST, "tasks": ("annotation", "expression"), "bootstrap_resamples": 300})
    results = evaluate(adata, config, crops=crops)
    verdicts = task_verdicts(results)
    assert set(verdicts) == {"annotation", "annotation_image_only", "expression"}
    assert (verdicts["annotation_image_only"]["spatia"]["key"], verdicts["annotation_image_only"]["baseline"]["key"]) \
        == ("X_spatia_image", "morphology")
    assert verdicts["annotation_image_only"]["best"]["key"] in ("X_spatia_image", "morphology")  # image rows only
    for name, task in (("annotation", "annotation"), ("annotation_image_only", "annotation"),
                       ("expression", "expression")):
        v = verdicts[name]
        entry = results["tasks"][task]
        comparison = next(c for c in entry["comparisons"]
                          if (c["spatia"], c["baseline"]) == (v["spatia"]["key"], v["baseline"]["key"]))
        assert comparison["difference"] == pytest.approx(v["difference"], abs=1e-6)  # XGBoost predicts float32
        assert comparison["n_test"] == entry["n_test"] and comparison["n_resamples"] == 300
        low, high = v["interval"]
        assert low <= v["difference"] <= high and v["interval_n_test"] == entry["n_test"]
        assert "95 % interval over" in headline(v)[0]
    text = headline(verdicts["annotation_image_only"])[0]
    assert text.startswith("Cell annotation from the image alone (`cell_type`), MLP macro-F1") and "vs hand-made Morph" in text
    summary = summary_figures(results)["comparisons"]
    assert set(summary) == {"annotation:cell_type", "expression"} and len(summary["annotation:cell_type"]) == 2
    assert summary["expression"][0]["interval"] == [round(x, 4) for x in
                                                    results["tasks"]["expression"]["comparisons"][0]["interval"]]
    skipped = evaluate(adata, EvaluateConfig(labels="cell_type", embeddings=("X_spatia",),
                                             **{**FAST, "tasks": ("annotation",), "bootstrap_resamples": 0}))
    assert "comparisons" not in skipped["tasks"]["annotation"]
    assert task_verdicts(skipped)["annotation"]["interval"] is None


def _stat(mean):
    return {"mean": mean, "std": 0.01, "values": [mean, mean], "n_runs": 2, "deterministic": False}


@pytest.mark.parametrize("interval, resolved", [([-0.06, 0.03], False), ([-0.05, -0.01], True)])
def test_headline_says_whether_the_test_set_resolves_the_difference(interval, resolved):
    from spatia.evaluate.verdicts import headline, task_verdicts

    def entry(mean):
        return {m: {k: _stat(mean) for k in ("macro_f1", "precision", "accuracy")} for m in ("mlp", "logreg")}

    ann = {"status": "ok", "results": {"X_spatia": entry(0.70), "pca": entry(0.73)},
           "comparisons": [{"spatia": "X_spatia", "baseline": "pca", "metric": "MLP macro-F1", "difference": -0.03,
                            "interval": interval, "n_test": 50, "resolved": resolved}]}
    results = {"dataset": {"label_column": "type"}, "tasks": {"annotation": ann},
               "embeddings": {"X_spatia": {"name": "SPATIA (unified)"}, "pca": {"name": "PCA"}}}
    v = task_verdicts(results)["annotation"]
    assert v["interval"] == interval and v["interval_n_test"] == 50 and v["resolved"] is resolved
    text, warning = headline(v)
    assert f"95 % interval over 50 test units [{interval[0]:+.3f}, {interval[1]:+.3f}]" in text
    assert ("cannot tell them apart" in text) is (not resolved)
    assert ("not resolved by the test set" in warning) is (not resolved)
    # a comparison of other rows (e.g. from an older verdict rule) is not attached
    ann["comparisons"][0]["baseline"] = "scvi"
    assert task_verdicts(results)["annotation"]["interval"] is None


def test_image_only_verdict_needs_both_rows_and_ranks_image_rows_only():
    from spatia.evaluate.verdicts import task_verdicts

    def entry(mean):
        return {m: {k: _stat(mean) for k in ("macro_f1", "precision", "accuracy")} for m in ("mlp", "logreg")}

    names = {"X_spatia": "SPATIA (unified)", "pca": "PCA", "X_spatia_image_cell": "SPATIA image-only cell level",
             "X_spatia_image": "SPATIA image-only", "morphology": "Morphology features"}
    rows = {"X_spatia": entry(0.9), "pca": entry(0.95), "X_spatia_image_cell": entry(0.40),
            "X_spatia_image": entry(0.45), "morphology": entry(0.35)}
    results = {"dataset": {"label_column": "type"}, "tasks": {"annotation": {"status": "ok", "results": rows}},
               "embeddings": {k: {"name": v} for k, v in names.items()}}
    v = task_verdicts(results)["annotation_image_only"]
    assert (v["spatia"]["key"], v["baseline"]["key"]) == ("X_spatia_image_cell", "morphology")
    assert v["best"]["key"] == "X_spatia_image"  # not PCA: the line compares image-only inputs
    assert v["difference"] == pytest.approx(0.05)
    del rows["morphology"]
    assert "annotation_image_only" not in task_verdicts(results)


def test_negative_resamples_are_refused():
    from spatia.errors import ConfigError
    from spatia.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match="bootstrap_resamples"):
        EvaluateConfig(labels="cell_type", bootstrap_resamples=-1)


def test_compare_bootstraps_the_requested_annotation_pairs_and_refuses_unknown_rows():
    """`EvaluateConfig.compare` ("A:B") adds A's MLP macro-F1 minus B's, with its interval, to the
    annotation task's comparisons and to the report's annotation note, beside the verdicts' pairs;
    a malformed pair or a row the run cannot score is refused before any model is fit."""
    from spatia.errors import ConfigError
    from spatia.evaluate import EvaluateConfig, evaluate
    from spatia.evaluate.report import render_markdown
    from spatia.evaluate.synthetic import synthetic_evaluation_data

    adata, _ = synthetic_evaluation_data(400, n_genes=40, n_types=3, seed=5)
    config = EvaluateConfig(labels="cell_type", embeddings=("X_spatia", "X_spatia_gene"),
                            **{**FAST, "tasks": ("annotation",), "bootstrap_resamples": 300,
                               "compare": ("X_spatia_gene:X_spatia", "X_spatia_gene:pca")})
    results = evaluate(adata, config)
    entry = results["tasks"]["annotation"]
    mlp = {k: v["mlp"]["macro_f1"]["mean"] for k, v in entry["results"].items()}
    for a, b in (("X_spatia_gene", "X_spatia"), ("X_spatia_gene", "pca")):
        (c,) = [c for c in entry["comparisons"] if (c["spatia"], c["baseline"]) == (a, b)]
        assert c["difference"] == pytest.approx(mlp[a] - mlp[b], abs=1e-9) and c["n_resamples"] == 300
        assert c["interval"][0] <= c["difference"] <= c["interval"][1]
    assert ("X_spatia", "pca") in {(c["spatia"], c["baseline"]) for c in entry["comparisons"]}  # the verdict's pair
    assert "Requested comparisons" in render_markdown(results)

    for bad in ("X_spatia_gene", "X_spatia:X_spatia", ":pca", "a:b:c"):
        with pytest.raises(ConfigError, match="compare"):
            EvaluateConfig(labels="cell_type", compare=(bad,))
    with pytest.raises(ConfigError, match="X_spatia_image"):
        evaluate(adata, EvaluateConfig(labels="cell_type", embeddings=("X_spatia",),
                                       **{**FAST, "tasks": ("annotation",), "compare": ("X_spatia_image:pca",)}))
