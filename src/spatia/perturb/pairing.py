"""Control -> target cell pairs by entropic optimal transport (paper section 4.3, appendix D).

`pair_cells(adata, transitions, config) -> PairingResult` runs Algorithm 1:

1. check the AnnData and the transitions (`validate_inputs`): the state, lineage (and niche,
   slide, patient) columns exist, every state is known, both states of a transition have at
   least `theta_min` cells of the transition's lineage (appendix D.1 rules 1 and 2);
2. log-normalise the counts and project them on the top `n_pcs` principal components of all
   cells, centred on the global mean (`spatia.expression`; paper appendix D.2: counts
   library-size normalised to the median total and log1p-transformed, then g~_i =
   PCA_d(g_i - g_bar), fitted once on all cells with counts, not per transition, so the costs
   of all transitions are comparable and a state shared by several transitions keeps its
   coordinates);
3. for every transition and every slide (and niche, with `same_niche`) solve entropic OT
   between its control and target cells (`spatia.perturb.sinkhorn`) on the cost

       C_ij = ||g~_i - g~_j|| / rms  +  spatial_weight * d_ij / spatial_scale_um,

   with d_ij the distance in um, C_ij = inf beyond `max_distance_um` (appendix D.1 rule 3:
   nearby, niche-consistent pairs are preferred); pairs never cross slides;
4. take pi(i) = argmax_j P_ij for every control with its plan value as the match score;
5. optionally swap a fraction of targets among pairs (`pair_noise`, the Table 5 ablation);
6. compute the signatures Delta g (Eq. 11, `spatia.perturb.signatures`).

`write_pairing(result, out_dir, adata)` writes pairs.parquet, signatures.parquet/.npz,
pairing_config.json, diagnostics.json, diagnostics.png and the report (report.md/.html,
pairs_map.png, signature_genes.png: `spatia.perturb.report`) into a new folder.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from spatia.console import progress
from spatia.errors import ConfigError, InputDataError
from spatia.expression import counts_from_anndata, expression_pca, library_sizes, log_normalise
from spatia.perturb.signatures import Signatures, compute_signatures
from spatia.perturb.sinkhorn import BlockCost, SinkhornWarning, plan_values, sinkhorn_log, summarize_plan
from spatia.perturb.config import PairingConfig
from spatia.perturb.transitions import Transition, TransitionsFile

logger = logging.getLogger(__name__)

PAIR_COLUMNS = (
    "x_ctrl_id", "x_tgt_id", "state_A", "state_B", "cell_type", "niche_ctrl", "niche_tgt", "transition_tag",
    "task_name", "patient_id", "slide_id", "spatial_distance_um", "match_score",
)  # the paper's schema (appendix D.5); pairs.parquet adds "noise_swapped"
PAIRS_FILE = "pairs.parquet"
CONFIG_FILE = "pairing_config.json"
DIAGNOSTICS_FILE = "diagnostics.json"
PLOT_FILE = "diagnostics.png"
DEFAULT_SLIDE_ID = "slide"


@dataclass
class PairingResult:
    """What `pair_cells` found.

    pairs: one row per control cell that got a target; columns PAIR_COLUMNS + noise_swapped.
    signatures: Delta g per transition (Eq. 11).
    diagnostics: one row per solved problem (transition x slide [x niche]): sizes, solver
      figures (iterations, marginal error, convergence, transport cost <P, C>, entropy H(P)),
      share of distinct targets, match scores and distances.
    config: the resolved configuration; transitions: the transitions paired.
    n_pcs_used: principal components actually used (<= config.n_pcs for small panels).
    target_sum: the library size of the log-normalisation. n_cells_without_counts: cells left
      out because they have no counts.
    """

    pairs: pd.DataFrame
    signatures: Signatures
    diagnostics: pd.DataFrame
    config: PairingConfig
    transitions: tuple[Transition, ...]
    n_pcs_used: int
    target_sum: float
    n_cells_without_counts: int

    def summary(self) -> dict[str, Any]:
        """Per-transition totals of the diagnostics (JSON-ready); transport cost and entropy are
        means over the transition's problems (slides) weighted by their control cells."""
        out = {}
        d = self.diagnostics
        for t in self.transitions:
            rows = d[d["transition_tag"] == t.name]
            solved = rows[rows["n_iter"] >= 0]
            pairs = self.pairs[self.pairs["transition_tag"] == t.name]
            out[t.name] = {
                "task_name": t.task,
                "n_problems": int(len(rows)),
                "n_ctrl": int(rows["n_ctrl"].sum()),
                "n_tgt": int(rows["n_tgt"].sum()),
                "n_pairs": int(len(pairs)),
                "n_ctrl_unmatched": int(rows["n_ctrl_unmatched"].sum()),
                "transport_cost": _weighted_mean(solved["transport_cost"], solved["n_ctrl"]),
                "entropy": _weighted_mean(solved["entropy"], solved["n_ctrl"]),
                "max_marginal_error": float(solved["marginal_error"].max()) if len(solved) else None,
                "all_converged": bool(solved["converged"].all()) if len(solved) else None,
                "distinct_target_share": _ratio(pairs["x_tgt_id"].nunique(), rows["n_tgt"].sum()),
                "mean_match_score": float(pairs["match_score"].mean()) if len(pairs) else None,
                "median_spatial_distance_um": float(pairs["spatial_distance_um"].median()) if len(pairs) else None,
                "same_niche_share": (float((pairs["niche_ctrl"] == pairs["niche_tgt"]).mean())
                                     if len(pairs) and self.config.niche_key else None),
                "noise_swapped": int(pairs["noise_swapped"].sum()),
            }
        return out


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float | None:
    return float(np.average(values, weights=weights)) if len(values) and weights.sum() > 0 else None


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def counts_matrix(adata, config: PairingConfig) -> sp.csr_matrix:
    """The raw counts (cells x genes) named by `config.counts_layer` (default layers["counts"] or X)."""
    return counts_from_anndata(adata, config.counts_layer)


def validate_inputs(adata, transitions: Sequence[Transition], config: PairingConfig) -> dict[str, np.ndarray]:
    """Check the AnnData and transitions against Algorithm 1's rules; return per-cell arrays.

    Raises `InputDataError` naming every problem found (missing columns, bad coordinates or
    counts, unknown states or lineages, states with no cells of the transition's lineage,
    states under `theta_min`). Returns {"state", "lineage", "slide", "patient", "niche"} as
    object arrays (None where a column is not used), "has_counts" (bool) and "xy_um" (n, 2).
    """
    n = adata.n_obs
    if n == 0:
        raise InputDataError("the AnnData has no cells", fix="pass an AnnData with cells")
    if not adata.obs_names.is_unique:
        raise InputDataError("cell IDs (obs_names) are not unique", fix="call adata.obs_names_make_unique()")
    problems = []
    columns = {"state": config.state_key, "lineage": config.lineage_key, "niche": config.niche_key,
               "slide": config.slide_key, "patient": config.patient_key}
    for role, key in columns.items():
        if key is not None and key not in adata.obs.columns:
            problems.append(f"obs has no {role} column {key!r}")
    if "spatial" not in adata.obsm:
        problems.append("obsm['spatial'] (cell centroids in um) is missing")
    else:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            problems.append(f"obsm['spatial'] has shape {xy.shape}; it must be (n_cells, 2) x, y in um")
        elif not np.isfinite(xy[:, :2]).all():
            problems.append(f"obsm['spatial'] has {int((~np.isfinite(xy[:, :2])).any(1).sum())} cells with NaN or inf")
    if problems:
        raise InputDataError("; ".join(problems),
                             fix=f"name existing columns (obs has: {', '.join(map(str, adata.obs.columns[:30]))}) "
                                 "and store x, y in um in obsm['spatial']")

    counts = counts_matrix(adata, config)
    values = counts.data if sp.issparse(counts) else np.asarray(counts).ravel()
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise InputDataError("the counts hold negative, NaN or inf values",
                             fix="pass raw counts (in .X or layers['counts']), not scaled or centred data")
    sample = values[:100_000]
    if sample.size and not np.allclose(sample, np.round(sample)):
        logger.warning("the counts are not whole numbers: pairing expects raw counts and log-normalises them itself")
    totals = np.asarray(counts.sum(axis=1)).ravel()
    has_counts = totals > 0

    def column(key: str | None) -> np.ndarray | None:
        if key is None:
            return None
        return adata.obs[key].astype("string").to_numpy(dtype=object, na_value=None)

    state, lineage = column(config.state_key), column(config.lineage_key)
    assert state is not None and lineage is not None
    known_states = set(state[state != None].tolist())  # noqa: E711 (elementwise)
    known_lineages = set(lineage[lineage != None].tolist())  # noqa: E711
    for t in transitions:
        where = f"transition {t.name!r}"
        if t.lineage not in known_lineages:
            problems.append(f"{where}: lineage {t.lineage!r} is not in obs[{config.lineage_key!r}]")
        for role, name in (("control", t.control), ("target", t.target)):
            if name not in known_states:
                problems.append(f"{where}: unknown {role} state {name!r} (not in obs[{config.state_key!r}])")
                continue
            of_state = (state == name) & has_counts
            in_lineage = int((of_state & (lineage == t.lineage)).sum())
            if in_lineage == 0:
                found = pd.Series(lineage[of_state]).value_counts().to_dict()
                problems.append(f"{where}: mixed lineages: {role} state {name!r} has no cells of lineage "
                                f"{t.lineage!r} (its cells are {found})")
            elif in_lineage < config.theta_min:
                problems.append(f"{where}: too few cells: {role} state {name!r} has {in_lineage} cells of lineage "
                                f"{t.lineage!r}, fewer than theta_min = {config.theta_min}")
            others = int(of_state.sum()) - in_lineage
            if in_lineage and others:
                logger.warning("%s: %d %s cells of state %r are not of lineage %r and are left out",
                               where, others, role, name, t.lineage)
    if problems:
        known = ", ".join(sorted(known_states)[:40])
        raise InputDataError(
            "the transitions do not fit the data:\n  - " + "\n  - ".join(problems),
            fix=f"fix the transitions file or the annotation (states in obs[{config.state_key!r}]: {known}); "
                "lower theta_min only if fewer cells are acceptable",
        )
    slide = column(config.slide_key)
    if slide is None:
        default = str(adata.uns.get("spatia", {}).get("slide_id", DEFAULT_SLIDE_ID))
        slide = np.full(n, default, dtype=object)
    return {
        "state": state,
        "lineage": lineage,
        "niche": column(config.niche_key),
        "slide": slide,
        "patient": column(config.patient_key),
        "has_counts": has_counts,
        "xy_um": np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2],
    }


def add_annotations(adata, path: str | Path) -> list[str]:
    """Join the columns of a per-cell table into `adata.obs` by cell ID, in place.

    The table (Parquet, or CSV/TSV, optionally gzipped) needs a `cell_id` column, e.g. the
    simulator's ground_truth.parquet. Cells missing from it get NA; columns already in obs are
    replaced. Returns the names of the joined columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("the annotation table does not exist", path=path,
                             fix="give a Parquet or CSV file with a cell_id column")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if ".tsv" in path.suffixes else ",")
    except Exception as error:  # noqa: BLE001 - any reader failure is the user's file
        raise InputDataError(f"cannot read the annotation table ({error})", path=path,
                             fix="give a Parquet or CSV file with a cell_id column") from None
    if "cell_id" not in table.columns:
        raise InputDataError(f"the annotation table has no cell_id column (columns: {list(table.columns)[:20]})",
                             path=path, fix="name the cell ID column cell_id")
    table = table.assign(cell_id=table["cell_id"].astype(str)).drop_duplicates("cell_id").set_index("cell_id")
    shared = adata.obs_names.isin(table.index)
    if not shared.any():
        raise InputDataError("no cell ID of the annotation table is in the AnnData", path=path,
                             fix="use the table made for these cells (IDs must match obs_names)")
    if not shared.all():
        logger.warning("%d of %d cells are not in %s; their annotation is NA", int((~shared).sum()), adata.n_obs,
                       path.name)
    joined = table.reindex(adata.obs_names)
    for name in joined.columns:
        adata.obs[name] = joined[name].to_numpy()
    return [str(c) for c in joined.columns]


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------


def pair_cells(
    adata, transitions: Sequence[Transition] | TransitionsFile, config: PairingConfig | None = None
) -> PairingResult:
    """Build control -> target pairs for every transition (Algorithm 1); see the module docstring.

    adata: raw counts in .X (or layers["counts"]), obs with the state/lineage(/niche/slide/
      patient) columns named in `config`, obsm["spatial"] in um. It is not modified.
    transitions: `Transition`s, or a `TransitionsFile` (its column names are NOT applied here:
      merge them into the config first, as the CLI does).
    """
    config = config or PairingConfig()
    if isinstance(transitions, TransitionsFile):
        transitions = transitions.transitions
    transitions = tuple(transitions)
    if not transitions:
        raise ConfigError("no transitions to pair", fix="give at least one transition")
    cells = validate_inputs(adata, transitions, config)
    has_counts = cells["has_counts"]
    n_without = int((~has_counts).sum())
    if n_without:
        logger.warning("%d cells have no counts and are left out of pairing", n_without)

    kept = np.flatnonzero(has_counts)  # expression rows -> adata rows
    row_of = np.full(adata.n_obs, -1, dtype=np.int64)
    row_of[kept] = np.arange(len(kept))
    counts = counts_matrix(adata, config)
    counts = counts[kept] if len(kept) < adata.n_obs else counts
    target_sum = float(np.median(library_sizes(counts)))
    expression = log_normalise(counts, target_sum)
    t0 = time.perf_counter()
    pcs = expression_pca(expression, config.n_pcs, seed=config.seed)
    logger.info("expression space: %d cells x %d PCs (%.1f s)", pcs.shape[0], pcs.shape[1], time.perf_counter() - t0)

    problems = list(_problems(transitions, cells, config))
    collected: list[dict[str, np.ndarray]] = []
    diagnostics = []
    with progress() as bar:
        task = bar.add_task("pairing", total=len(problems))
        for number, (t_index, slide, niche, ctrl, tgt) in enumerate(problems):
            t = transitions[t_index]
            pairs, row = _solve_problem(t, slide, niche, ctrl, tgt, pcs, row_of, cells, config, number)
            diagnostics.append(row)
            if pairs is not None:
                pairs["transition"] = np.full(len(pairs["ctrl"]), t_index)
                collected.append(pairs)
            bar.advance(task)

    def joined(name: str, dtype) -> np.ndarray:
        return np.concatenate([p[name] for p in collected]).astype(dtype) if collected else np.zeros(0, dtype)

    ctrl, tgt, which = joined("ctrl", np.int64), joined("tgt", np.int64), joined("transition", np.int64)
    score, swapped, distance = joined("score", np.float64), joined("swapped", bool), joined("distance", np.float64)
    table = _pairs_table(adata, transitions, cells, ctrl, tgt, which, score, swapped, distance)
    signatures = compute_signatures(
        expression, [str(g) for g in adata.var_names], row_of[ctrl], row_of[tgt], which,
        [t.name for t in transitions], [t.task for t in transitions],
    )
    return PairingResult(
        pairs=table,
        signatures=signatures,
        diagnostics=pd.DataFrame(diagnostics),
        config=config,
        transitions=transitions,
        n_pcs_used=int(pcs.shape[1]),
        target_sum=float(target_sum),
        n_cells_without_counts=n_without,
    )


def _problems(transitions: tuple[Transition, ...], cells: dict[str, np.ndarray], config: PairingConfig):
    """Yield (transition index, slide, niche or None, control rows, target rows) per OT problem."""
    state, lineage, slide = cells["state"], cells["lineage"], cells["slide"]
    niche = cells["niche"]
    usable = cells["has_counts"]
    keys = slide
    if config.same_niche:
        keys = (pd.Series(slide, dtype="string") + "\x00" + pd.Series(niche, dtype="string").fillna("")).to_numpy(
            dtype=object)
    for t_index, t in enumerate(transitions):
        ctrl_all = np.flatnonzero((state == t.control) & (lineage == t.lineage) & usable)
        tgt_all = np.flatnonzero((state == t.target) & (lineage == t.lineage) & usable)
        for key in pd.unique(keys[ctrl_all]):
            ctrl = ctrl_all[keys[ctrl_all] == key]
            tgt = tgt_all[keys[tgt_all] == key]
            slide_id, _, niche_id = str(key).partition("\x00")
            yield t_index, slide_id, (niche_id if config.same_niche else None), ctrl, tgt


def _solve_problem(t, slide, niche, ctrl, tgt, pcs, row_of, cells, config: PairingConfig, number: int):
    """Solve one transition x slide (x niche) problem; return (pairs arrays or None, diagnostics row)."""
    xy = cells["xy_um"]
    row: dict[str, Any] = {
        "transition_tag": t.name, "task_name": t.task, "slide_id": slide, "niche": niche,
        "n_ctrl": int(len(ctrl)), "n_tgt": int(len(tgt)), "n_ctrl_unmatched": int(len(ctrl)), "n_tgt_unreachable": 0,
        "expr_scale": math.nan, "n_iter": -1, "marginal_error": math.nan, "converged": False, "omega": math.nan,
        "transport_cost": math.nan, "entropy": math.nan, "distinct_target_share": math.nan,
        "mean_match_score": math.nan, "median_spatial_distance_um": math.nan, "n_noise_swapped": 0, "seconds": 0.0,
        "note": "",
    }
    if len(tgt) == 0:
        row["note"] = "no target cells in this slide" + (" and niche" if niche is not None else "")
        logger.warning("%s, slide %s%s: %d controls have no target cell and stay unpaired", t.name, slide,
                       f", niche {niche}" if niche is not None else "", len(ctrl))
        return None, row
    if config.max_distance_um is not None:
        ctrl, tgt, unreachable = _within_radius(ctrl, tgt, xy, config.max_distance_um)
        row["n_tgt_unreachable"] = unreachable
        if len(ctrl) == 0:
            row["note"] = f"no control has a target within {config.max_distance_um} um"
            logger.warning("%s, slide %s: %s", t.name, slide, row["note"])
            return None, row
    start = time.perf_counter()
    cost = BlockCost(
        pcs[row_of[ctrl]], pcs[row_of[tgt]], x_pos=xy[ctrl], y_pos=xy[tgt],
        spatial_weight=config.spatial_weight, spatial_scale_um=config.spatial_scale_um,
        max_distance_um=config.max_distance_um,
        dtype=torch.float64 if config.dtype == "float64" else torch.float32,
        memory_mb=config.memory_mb, block_mb=config.block_mb,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SinkhornWarning)
        result = sinkhorn_log(cost, config.epsilon, tol=config.tol, max_iter=config.max_iter,
                          omega=config.omega if config.omega == "auto" else float(config.omega))
    for w in caught:
        logger.warning("%s, slide %s%s: %s", t.name, slide, f", niche {niche}" if niche is not None else "", w.message)
    plan = summarize_plan(cost, result)
    choice = plan.target  # positions in tgt
    value = plan.plan_value
    swapped = np.zeros(len(ctrl), dtype=bool)
    if config.pair_noise > 0:
        choice, swapped = _pair_noise(choice, config.pair_noise, np.random.default_rng([config.seed, number]))
        if swapped.any():
            value = value.copy()
            value[swapped] = plan_values(cost, result, np.flatnonzero(swapped), choice[swapped])
    n = len(ctrl)
    score = np.clip(value * n, 0.0, 1.0)  # P_ij / a_i: the share of control i's mass sent to j
    distance = np.linalg.norm(xy[ctrl] - xy[tgt[choice]], axis=1)
    row.update(
        n_ctrl_unmatched=row["n_ctrl"] - n, expr_scale=cost.expr_scale, n_iter=result.n_iter,
        marginal_error=result.marginal_error, converged=result.converged, omega=result.omega,
        transport_cost=plan.transport_cost, entropy=plan.entropy,
        distinct_target_share=len(np.unique(choice)) / row["n_tgt"], mean_match_score=float(score.mean()),
        median_spatial_distance_um=float(np.median(distance)), n_noise_swapped=int(swapped.sum()),
        seconds=time.perf_counter() - start,
    )
    return {"ctrl": ctrl, "tgt": tgt[choice], "score": score, "swapped": swapped, "distance": distance}, row


def _within_radius(ctrl: np.ndarray, tgt: np.ndarray, xy: np.ndarray, radius: float):
    """Drop controls with no target within `radius` um and targets with no control within it."""
    ctrl_tree, tgt_tree = cKDTree(xy[ctrl]), cKDTree(xy[tgt])
    ctrl_ok = tgt_tree.query_ball_point(xy[ctrl], r=radius, return_length=True) > 0
    tgt_ok = ctrl_tree.query_ball_point(xy[tgt], r=radius, return_length=True) > 0
    return ctrl[ctrl_ok], tgt[tgt_ok], int((~tgt_ok).sum())


def _pair_noise(choice: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Swap the targets of round(fraction * pairs) randomly chosen pairs among themselves.

    The chosen pairs pass their targets on in a random cycle, so each of them gets another
    pair's target; `swapped` marks the pairs whose target changed (two pairs that shared a
    target keep it).
    """
    k = int(round(fraction * len(choice)))
    out = choice.copy()
    if k < 2:
        return out, np.zeros(len(choice), dtype=bool)
    chosen = rng.choice(len(choice), size=k, replace=False)
    out[chosen] = choice[np.roll(chosen, 1)]
    return out, out != choice


def _pairs_table(adata, transitions, cells, ctrl, tgt, which, score, swapped, distance) -> pd.DataFrame:
    """The pairs in the paper's schema (PAIR_COLUMNS) plus noise_swapped."""
    names = np.asarray(adata.obs_names, dtype=object)
    niche = cells["niche"]
    patient = cells["patient"]

    def per_transition(attribute: str) -> np.ndarray:
        return np.array([getattr(t, attribute) for t in transitions], dtype=object)[which] if len(which) else \
            np.zeros(0, dtype=object)

    frame = pd.DataFrame({
        "x_ctrl_id": names[ctrl],
        "x_tgt_id": names[tgt],
        "state_A": per_transition("control"),
        "state_B": per_transition("target"),
        "cell_type": per_transition("lineage"),
        "niche_ctrl": niche[ctrl] if niche is not None else np.full(len(ctrl), None, dtype=object),
        "niche_tgt": niche[tgt] if niche is not None else np.full(len(ctrl), None, dtype=object),
        "transition_tag": per_transition("name"),
        "task_name": per_transition("task"),
        "patient_id": patient[ctrl] if patient is not None else np.full(len(ctrl), None, dtype=object),
        "slide_id": cells["slide"][ctrl],
        "spatial_distance_um": distance,
        "match_score": np.asarray(score, dtype=np.float64),
        "noise_swapped": np.asarray(swapped, dtype=bool),
    })
    for name in ("x_ctrl_id", "x_tgt_id", "state_A", "state_B", "cell_type", "niche_ctrl", "niche_tgt",
                 "transition_tag", "task_name", "patient_id", "slide_id"):
        frame[name] = frame[name].astype("string")
    return frame
