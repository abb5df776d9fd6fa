"""Perturbation pairing (`pair_cells`, `write_pairing`, `spatia pair`) on synthetic data and on
the ground-truth simulator."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from spatia.config import load_config
import scipy.sparse as sp
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import ConfigError, InputDataError, OutputExistsError
from spatia.perturb import (
    PAIR_COLUMNS,
    PairingConfig,
    Signatures,
    Transition,
    add_annotations,
    example_transitions_path,
    load_transitions,
    pair_cells,
    parse_transitions,
    write_pairing,
)

GENES = [f"G{k:02d}" for k in range(40)]
DE_UP = {"to_B": ["G01", "G02", "G03"], "to_T2": ["G11", "G12"]}
DE_DOWN = {"to_B": ["G05"], "to_T2": ["G15"]}
TRANSITIONS = (
    Transition("to_B", "tumour", "A", "B", "epi"),
    Transition("to_T2", "immune", "T1", "T2", "imm"),
)


def _synthetic(seed: int = 0, n_per_slide: int = 700) -> ad.AnnData:
    """Two slides; lineage epi (states A -> B) and imm (T1 -> T2); niche 'left'/'right' by x.

    Targets differ from controls by the DE genes; cells of the 'right' niche express G30-G32 x4.
    """
    rng = np.random.default_rng(seed)
    states = np.array(["A", "B", "T1", "T2"])
    lineage_of = {"A": "epi", "B": "epi", "T1": "imm", "T2": "imm"}
    frames, counts = [], []
    for slide in ("s1", "s2"):
        state = rng.choice(states, size=n_per_slide, p=[0.3, 0.25, 0.25, 0.2])
        xy = rng.uniform(0, 1000, size=(n_per_slide, 2))
        niche = np.where(xy[:, 0] < 500, "left", "right")
        rate = np.full((n_per_slide, len(GENES)), 1.0)
        rate[np.isin(state, ["A", "B"]), 20:25] *= 6  # lineage programs
        rate[np.isin(state, ["T1", "T2"]), 25:30] *= 6
        for transition, genes in DE_UP.items():
            target = "B" if transition == "to_B" else "T2"
            rate[np.ix_(state == target, [GENES.index(g) for g in genes])] *= 8
        for transition, genes in DE_DOWN.items():
            target = "B" if transition == "to_B" else "T2"
            rate[np.ix_(state == target, [GENES.index(g) for g in genes])] /= 8
            control = "A" if transition == "to_B" else "T1"
            rate[np.ix_(state == control, [GENES.index(g) for g in genes])] *= 4
        rate[niche == "right", 30:33] *= 4
        counts.append(rng.poisson(rate))
        frames.append(pd.DataFrame({
            "state": state, "lineage": [lineage_of[s] for s in state], "niche": niche, "slide": slide,
            "patient": "P1" if slide == "s1" else "P2", "x": xy[:, 0], "y": xy[:, 1],
        }))
    obs = pd.concat(frames, ignore_index=True)
    obs.index = [f"cell{k:05d}" for k in range(len(obs))]
    adata = ad.AnnData(X=sp.csr_matrix(np.vstack(counts).astype(np.float32)), obs=obs.drop(columns=["x", "y"]),
                       var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy()
    return adata


def _config(**overrides) -> PairingConfig:
    values = dict(niche_key="niche", slide_key="slide", patient_key="patient", n_pcs=10)
    values.update(overrides)
    return PairingConfig(**values)


@pytest.fixture(scope="module")
def synthetic() -> ad.AnnData:
    return _synthetic()


@pytest.fixture(scope="module")
def result(synthetic):
    return pair_cells(synthetic, TRANSITIONS, _config())


# --- pairs: schema, rules, known answers ------------------------------------------------------


def test_pairs_schema_and_one_pair_per_control(synthetic, result):
    pairs = result.pairs
    assert list(pairs.columns) == [*PAIR_COLUMNS, "noise_swapped"]
    obs = synthetic.obs
    for t in TRANSITIONS:
        p = pairs[pairs["transition_tag"] == t.name]
        controls = obs.index[(obs["state"] == t.control)]
        assert sorted(p["x_ctrl_id"]) == sorted(controls)  # every control exactly once
        assert (obs.loc[p["x_tgt_id"], "state"] == t.target).all()
        assert (p["state_A"] == t.control).all() and (p["state_B"] == t.target).all()
        assert (p["cell_type"] == t.lineage).all() and (p["task_name"] == t.task).all()
    # never across slides; metadata copied from obs
    assert (obs.loc[pairs["x_ctrl_id"], "slide"].to_numpy() == obs.loc[pairs["x_tgt_id"], "slide"].to_numpy()).all()
    assert (pairs["slide_id"].to_numpy() == obs.loc[pairs["x_ctrl_id"], "slide"].to_numpy()).all()
    assert (pairs["patient_id"].to_numpy() == obs.loc[pairs["x_ctrl_id"], "patient"].to_numpy()).all()
    assert (pairs["niche_tgt"].to_numpy() == obs.loc[pairs["x_tgt_id"], "niche"].to_numpy()).all()
    xy = pd.DataFrame(synthetic.obsm["spatial"], index=synthetic.obs_names)
    distance = np.linalg.norm(xy.loc[pairs["x_ctrl_id"]].to_numpy() - xy.loc[pairs["x_tgt_id"]].to_numpy(), axis=1)
    np.testing.assert_allclose(pairs["spatial_distance_um"], distance)
    assert ((pairs["match_score"] > 0) & (pairs["match_score"] <= 1)).all()
    assert not pairs["noise_swapped"].any()


def test_diagnostics_per_problem(result):
    d = result.diagnostics
    assert len(d) == 4  # 2 transitions x 2 slides
    assert d["converged"].all() and (d["marginal_error"] < result.config.tol).all()
    assert (d["n_iter"] > 0).all() and (d["transport_cost"] > 0).all() and (d["entropy"] > 0).all()
    assert ((d["distinct_target_share"] > 0) & (d["distinct_target_share"] <= 1)).all()
    summary = result.summary()
    assert set(summary) == {"to_B", "to_T2"}
    assert summary["to_B"]["n_pairs"] == int((result.pairs["transition_tag"] == "to_B").sum())


def test_signatures_recover_designed_genes(result):
    sig = result.signatures
    for name, up in DE_UP.items():
        assert set(sig.top_genes(name, len(up))) == set(up)
        assert set(sig.top_genes(name, len(DE_DOWN[name]), "down")) == set(DE_DOWN[name])
        row = sig.delta[sig.transitions.index(name)]
        assert row[GENES.index(up[0])] > 1.0  # log1p scale: x8 is about +1.5 .. +2
    # Eq. 11 directly: mean over pairs of g_tgt - g_ctrl on log-normalised expression
    assert sig.n_pairs.tolist() == [int((result.pairs["transition_tag"] == t.name).sum()) for t in TRANSITIONS]


def test_signature_equals_mean_pair_difference(synthetic, result):
    x = synthetic.X.toarray().astype(np.float64)
    total = x.sum(1, keepdims=True)
    logn = np.log1p(x / total * result.target_sum)
    index = pd.Series(np.arange(synthetic.n_obs), index=synthetic.obs_names)
    p = result.pairs[result.pairs["transition_tag"] == "to_T2"]
    expected = (logn[index[p["x_tgt_id"]]] - logn[index[p["x_ctrl_id"]]]).mean(0)
    np.testing.assert_allclose(result.signatures.delta[1], expected, rtol=1e-5, atol=1e-6)


def test_same_niche_and_radius_rules(synthetic):
    same = pair_cells(synthetic, TRANSITIONS, _config(same_niche=True))
    assert (same.pairs["niche_ctrl"] == same.pairs["niche_tgt"]).all()
    assert len(same.diagnostics) == 8  # 2 transitions x 2 slides x 2 niches
    radius = pair_cells(synthetic, TRANSITIONS, _config(max_distance_um=40.0, spatial_weight=0.0))
    assert (radius.pairs["spatial_distance_um"] <= 40.0).all()
    unmatched = int(radius.diagnostics["n_ctrl_unmatched"].sum())
    n_controls = int(synthetic.obs["state"].isin(["A", "T1"]).sum())
    assert unmatched > 0 and len(radius.pairs) == n_controls - unmatched


def test_spatial_weight_pulls_pairs_together(synthetic, result):
    far = pair_cells(synthetic, TRANSITIONS, _config(spatial_weight=0.0))
    assert result.pairs["spatial_distance_um"].median() < 0.5 * far.pairs["spatial_distance_um"].median()
    # without the spatial term, pairs still prefer the same niche (its genes are in the expression)
    same = (far.pairs["niche_ctrl"] == far.pairs["niche_tgt"]).mean()
    assert same > 0.8


def test_other_lineage_cells_of_a_state_are_left_out(synthetic):
    adata = synthetic.copy()
    b_cells = adata.obs.index[adata.obs["state"] == "B"][:30]
    adata.obs.loc[b_cells, "lineage"] = "imm"  # mislabelled: state B but lineage imm
    res = pair_cells(adata, TRANSITIONS, _config())
    assert not res.pairs["x_tgt_id"].isin(b_cells).any()


def test_pair_noise_swaps_targets_within_transition_and_slide(synthetic, result):
    noisy = pair_cells(synthetic, TRANSITIONS, _config(pair_noise=0.2))
    again = pair_cells(synthetic, TRANSITIONS, _config(pair_noise=0.2))
    pd.testing.assert_frame_equal(noisy.pairs, again.pairs)  # seeded
    pairs, clean = noisy.pairs, result.pairs
    assert (pairs["x_ctrl_id"].to_numpy() == clean["x_ctrl_id"].to_numpy()).all()
    changed = pairs["x_tgt_id"].to_numpy() != clean["x_tgt_id"].to_numpy()
    assert np.array_equal(changed, pairs["noise_swapped"].to_numpy())
    assert 0.15 < changed.mean() <= 0.2
    obs = synthetic.obs
    assert (obs.loc[pairs["x_tgt_id"], "state"].to_numpy() == pairs["state_B"].to_numpy()).all()
    assert (obs.loc[pairs["x_tgt_id"], "slide"].to_numpy() == pairs["slide_id"].to_numpy()).all()
    # a swap is a permutation of targets within each group: the Eq. 11 signature is unchanged
    np.testing.assert_allclose(noisy.signatures.delta, result.signatures.delta, atol=1e-6)
    assert pairs.loc[changed, "match_score"].mean() < clean.loc[changed, "match_score"].mean()
    other = pair_cells(synthetic, TRANSITIONS, _config(pair_noise=0.2, seed=1))
    assert not other.pairs["x_tgt_id"].equals(pairs["x_tgt_id"])


def test_same_inputs_give_same_pairs(synthetic, result):
    again = pair_cells(synthetic, TRANSITIONS, _config())
    pd.testing.assert_frame_equal(result.pairs, again.pairs)


def test_float64_gives_the_same_assignment(synthetic, result):
    exact = pair_cells(synthetic, TRANSITIONS, _config(dtype="float64", tol=1e-9))
    agree = (exact.pairs["x_tgt_id"].to_numpy() == result.pairs["x_tgt_id"].to_numpy()).mean()
    assert agree > 0.97  # float32 flips only near-ties
    np.testing.assert_allclose(exact.pairs["match_score"], result.pairs["match_score"], atol=2e-3)


def test_counts_layer_and_cells_without_counts(synthetic, result):
    adata = synthetic.copy()
    adata.layers["counts"] = adata.X.toarray()  # dense counts in the layer give the same pairs as sparse .X
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # .X is not used when layers['counts'] exists
    same = pair_cells(adata, TRANSITIONS, _config())
    # dense and sparse counts take different (float32) PCA code paths: equal up to rounding
    agree = same.pairs["x_tgt_id"].to_numpy() == result.pairs["x_tgt_id"].to_numpy()
    assert agree.mean() > 0.98
    np.testing.assert_allclose(same.pairs["match_score"][agree], result.pairs["match_score"][agree], atol=1e-3)
    empty = synthetic.copy()
    lost = empty.obs.index[empty.obs["state"] == "A"][:5]
    dense = empty.X.toarray()
    dense[empty.obs_names.get_indexer(lost)] = 0
    empty.X = sp.csr_matrix(dense)
    res = pair_cells(empty, TRANSITIONS, _config())
    assert res.n_cells_without_counts == 5 and not res.pairs["x_ctrl_id"].isin(lost).any()


# --- clear errors -----------------------------------------------------------------------------


def _error(adata, transitions, config) -> str:
    with pytest.raises(InputDataError) as info:
        pair_cells(adata, transitions, config)
    return str(info.value)


def test_bad_transitions_give_one_clear_error(synthetic):
    bad = (
        Transition("ghost", "x", "A", "Z", "epi"),  # unknown state
        Transition("cross", "x", "A", "T2", "epi"),  # target in another lineage
        TRANSITIONS[1],
    )
    message = _error(synthetic, bad, _config())
    assert "transition 'ghost': unknown target state 'Z'" in message
    assert "transition 'cross': mixed lineages: target state 'T2' has no cells of lineage 'epi'" in message
    assert "to_T2" not in message.split("Fix:")[0]  # the good transition is not blamed
    assert "Fix:" in message
    few = _error(synthetic, TRANSITIONS, _config(theta_min=400))
    assert "too few cells" in few and "theta_min = 400" in few
    lineage = _error(synthetic, (Transition("t", "x", "A", "B", "stroma"),), _config())
    assert "lineage 'stroma' is not in obs['lineage']" in lineage


def test_bad_anndata_gives_clear_errors(synthetic):
    assert "no state column 'cell_state'" in _error(synthetic, TRANSITIONS, _config(state_key="cell_state"))
    no_xy = synthetic.copy()
    del no_xy.obsm["spatial"]
    assert "obsm['spatial']" in _error(no_xy, TRANSITIONS, _config())
    negative = synthetic.copy()
    negative.X = negative.X.copy()
    negative.X.data[0] = -1
    assert "negative" in _error(negative, TRANSITIONS, _config())
    assert "no layer 'raw'" in _error(synthetic, TRANSITIONS, _config(counts_layer="raw"))


def test_bad_config_raises_config_error():
    for bad in (dict(epsilon=0), dict(theta_min=0), dict(pair_noise=1.5), dict(omega=2.0), dict(dtype="half"),
                dict(spatial_weight=-1.0), dict(max_distance_um=0.0)):
        with pytest.raises(ConfigError):
            PairingConfig(**bad)
    with pytest.raises(ConfigError, match="same_niche needs a niche column"):
        PairingConfig(same_niche=True)
    assert load_config(PairingConfig, {"epsilon": 0.1}).epsilon == 0.1
    with pytest.raises(ConfigError, match="unknown key 'epsilom'"):
        load_config(PairingConfig, {"epsilom": 0.1})


def test_bad_transitions_files(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text)
        return path

    cases = {
        "transitions:\n  - name: a\n    task: t\n    control: A\n    target: B\n": "lacks lineage",
        "transitions:\n  - {name: a, task: t, control: A, target: B, lineage: L, colour: red}\n": "unknown keys",
        "transitions:\n  - {name: a, task: t, control: A, target: A, lineage: L}\n": "same control and target",
        ("transitions:\n  - {name: a, task: t, control: A, target: B, lineage: L}\n"
         "  - {name: a, task: t, control: A, target: C, lineage: L}\n"): "repeated",
        "state_key: s\n": "top-level 'transitions:'",
        "transitions: [\n": "not valid YAML",
        "stat_key: s\ntransitions:\n  - {name: a, task: t, control: A, target: B, lineage: L}\n": "unknown top-level",
    }
    for text, expected in cases.items():
        path = write(text)
        with pytest.raises(ConfigError) as info:
            load_transitions(path)
        assert expected in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_transitions(tmp_path / "missing.yaml")


def test_shipped_examples_parse():
    sim = load_transitions(example_transitions_path("simulated"))
    assert sim.columns == {"state_key": "state", "lineage_key": "lineage", "niche_key": "domain"}
    breast = load_transitions(example_transitions_path("breast_cancer"))
    assert [t.name for t in breast.transitions] == [t.name for t in sim.transitions]
    assert {t.task for t in breast.transitions} == {"tumor_progression", "immune_infiltration"}
    assert parse_transitions({"transitions": [vars(t) for t in sim.transitions]}).transitions == sim.transitions


# --- outputs and the command ------------------------------------------------------------------


def test_write_pairing_round_trip(result, tmp_path):
    out = write_pairing(result, tmp_path / "pairs")
    names = {p.name for p in out.iterdir()}
    assert names == {"pairs.parquet", "signatures.parquet", "signatures.npz", "pairing_config.json",
                     "diagnostics.json", "diagnostics.png", "report.md", "report.html", "signature_genes.png"}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "pairs.parquet"), result.pairs)
    sig = Signatures.read_npz(out / "signatures.npz")
    np.testing.assert_array_equal(sig.delta, result.signatures.delta)
    assert sig.genes == GENES and sig.transitions == ["to_B", "to_T2"]
    table = pd.read_parquet(out / "signatures.parquet")
    assert len(table) == 2 * len(GENES)
    assert table.groupby("transition_tag")["delta_g"].idxmax().map(table["gene"]).isin(["G01", "G02", "G03", "G11", "G12"]).all()
    saved = json.loads((out / "pairing_config.json").read_text())
    assert load_config(PairingConfig, saved["config"]) == result.config
    assert [t["name"] for t in saved["transitions"]] == ["to_B", "to_T2"]
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["n_pairs"] == len(result.pairs) and len(diagnostics["problems"]) == 4
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OutputExistsError):
        write_pairing(result, out)


def test_add_annotations(synthetic, tmp_path):
    adata = synthetic.copy()
    table = pd.DataFrame({"cell_id": adata.obs_names[::2], "tag": "x"})
    table.to_csv(tmp_path / "a.csv", index=False)
    assert add_annotations(adata, tmp_path / "a.csv") == ["tag"]
    assert adata.obs["tag"].notna().sum() == len(table)
    table.rename(columns={"cell_id": "barcode"}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(InputDataError, match="no cell_id column"):
        add_annotations(adata, tmp_path / "b.parquet")


def _write_inputs(tmp_path: Path, adata: ad.AnnData) -> tuple[Path, Path]:
    cells = tmp_path / "cells.h5ad"
    adata.write_h5ad(cells)
    transitions = tmp_path / "transitions.yaml"
    transitions.write_text(
        "state_key: state\nlineage_key: lineage\nniche_key: niche\nslide_key: slide\ntransitions:\n"
        + "".join(f"  - {{name: {t.name}, task: {t.task}, control: {t.control}, target: {t.target}, "
                  f"lineage: {t.lineage}}}\n" for t in TRANSITIONS)
    )
    return cells, transitions


def test_cli_pair(synthetic, tmp_path):
    cells, transitions = _write_inputs(tmp_path, synthetic)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["pair", str(cells), "--transitions", str(transitions), "-o", str(out),
                              "--n-pcs", "10", "--pair-noise", "0.1", "--seed", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert pairs["noise_swapped"].any() and set(pairs["slide_id"]) == {"s1", "s2"}
    record = json.loads((out / "spatia_run.json").read_text())
    assert record["command"] == "pair" and record["seed"] == 3
    assert record["config"]["niche_key"] == "niche" and record["config"]["pair_noise"] == 0.1
    assert record["inputs"]["cells"].endswith(".h5ad") and record["inputs"]["transitions"]
    # the command line overrides the file's column names: a wrong one is a clear error, exit 2
    bad = runner.invoke(app, ["pair", str(cells), "-t", str(transitions), "-o", str(tmp_path / "bad"),
                              "--state-key", "nope"])
    assert bad.exit_code == 2 and "no state column 'nope'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
    again = runner.invoke(app, ["pair", str(cells), "-t", str(transitions), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


# --- the simulator: pairs follow the designed transitions -------------------------------------


@pytest.fixture(scope="module")
def simulated(simulated_bundle):
    from spatia.io.xenium import read_xenium

    adata = read_xenium(simulated_bundle).to_anndata()
    add_annotations(adata, simulated_bundle / "ground_truth.parquet")
    truth = json.loads((simulated_bundle / "ground_truth.json").read_text())
    spec = load_transitions(example_transitions_path("simulated"))
    config = PairingConfig(**spec.columns)
    return adata, truth, spec, pair_cells(adata, spec, config)


def test_example_file_matches_the_simulator_design(simulated):
    _, truth, spec, _ = simulated
    designed = [(t["name"], t["axis"], t["control"], t["target"], t["lineage"]) for t in truth["transitions"]]
    assert [(t.name, t.task, t.control, t.target, t.lineage) for t in spec.transitions] == designed


def test_simulator_pairs_follow_design_and_rules(simulated):
    adata, truth, spec, res = simulated
    obs, pairs = adata.obs, res.pairs
    assert res.diagnostics["converged"].all()
    for t in truth["transitions"]:
        p = pairs[pairs["transition_tag"] == t["name"]]
        assert len(p) == t["n_control"]  # every control paired (all states >= theta_min)
        assert (obs.loc[p["x_ctrl_id"], "state"] == t["control"]).all()
        assert (obs.loc[p["x_tgt_id"], "state"] == t["target"]).all()
        assert (obs.loc[p["x_ctrl_id"], "lineage"] == t["lineage"]).all()
        assert (obs.loc[p["x_tgt_id"], "lineage"] == t["lineage"]).all()
        # spatial rule: pairs are much closer than random control-target pairs
        xy = pd.DataFrame(adata.obsm["spatial"], index=adata.obs_names)
        ctrl_xy = xy.loc[obs.index[obs["state"] == t["control"]]].to_numpy()
        tgt_xy = xy.loc[obs.index[obs["state"] == t["target"]]].to_numpy()
        random_median = np.median(np.linalg.norm(ctrl_xy[:, None] - tgt_xy[None], axis=2))
        assert p["spatial_distance_um"].median() < 0.35 * random_median
        # niche rule: same domain more often than random pairing would give (kappa-like excess;
        # measured 0.24 for endothelial cells along thin vessels .. 0.68)
        ctrl_share = obs.loc[obs["state"] == t["control"], "domain"].value_counts(normalize=True)
        tgt_share = obs.loc[obs["state"] == t["target"], "domain"].value_counts(normalize=True)
        chance = float((ctrl_share * tgt_share.reindex(ctrl_share.index).fillna(0)).sum())
        same = float((p["niche_ctrl"] == p["niche_tgt"]).mean())
        assert (same - chance) / (1 - chance) > 0.15, (t["name"], same, chance)


def test_simulator_signatures_recover_designed_de_genes(simulated):
    _, truth, _, res = simulated
    sig = res.signatures
    for t in truth["transitions"]:
        up = [g["gene"] for g in t["de_genes"] if g["log2_fold_change"] > 0]
        down = [g["gene"] for g in t["de_genes"] if g["log2_fold_change"] < 0]
        top = sig.top_genes(t["name"], len(up))
        assert len(set(top) & set(up)) >= len(up) - 1, (t["name"], top, up)
        row = pd.Series(sig.delta[sig.transitions.index(t["name"])], index=sig.genes)
        assert (row[up] > 0).all() and (row[down] < 0).all()
        others = row.drop(up + down)
        assert row[up].mean() > 2 * others.abs().max()  # measured 3.0 .. 5.0 times


def test_simulator_abundance_rule(simulated):
    adata, truth, spec, _ = simulated
    smallest = min(min(t["n_control"], t["n_target"]) for t in truth["transitions"])
    with pytest.raises(InputDataError, match="too few cells"):
        pair_cells(adata, spec, PairingConfig(**spec.columns, theta_min=smallest + 1))


def test_cli_on_simulated_bundle(simulated_bundle, tmp_path):
    from spatia.io.xenium import read_xenium

    cells = tmp_path / "cells.h5ad"
    read_xenium(simulated_bundle).to_anndata().write_h5ad(cells)
    out = tmp_path / "pairs"
    res = CliRunner().invoke(app, ["pair", str(cells), "--transitions", "simulated", "--annotations",
                                   str(simulated_bundle / "ground_truth.parquet"), "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert set(pairs["transition_tag"]) == {"EMT_transition", "proliferation_activation", "lineage_conversion",
                                            "T_cell_activation", "angiogenesis_activation"}
    assert pairs["niche_ctrl"].notna().all()
