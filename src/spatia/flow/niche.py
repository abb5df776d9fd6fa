"""Niche-dependence score on the simulator: does a generated target carry the part of the
morphology shift that depends on where the cell lives?

The simulator (`spatia.sim`) gives each target cell a shift strength s set by its distance to
its domain's border (`morphology_shift_strength` in `ground_truth.parquet`). Per transition, on
the held-out pairs:

1. the nucleus morphology features of the real targets (`spatia.flow.metrics.morphology_table`,
   the masks of `flow evaluate`), z-scored on those real targets;
2. the niche direction w: mean z-features of the real targets with s above the median minus
   those at or below it;
3. for each image set (the real targets, the control crops = identity, each variant's generated
   crops), the Spearman correlation between s and the crops' projection on w.

The real targets give the ceiling (in-sample: w is fitted on them); the identity baseline what
the control's own appearance already says; a model that uses the niche scores above a model that
sees only the cell when the cell alone does not reveal s. `niche_spearman` is reported per
transition and as the mean over transitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from spatia.errors import InputDataError
from spatia.flow.metrics import morphology_table, zscore_on_real

STRENGTH_COLUMN = "morphology_shift_strength"


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 5:
        return None
    if np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    rho = stats.spearmanr(a[ok], b[ok]).statistic
    return float(rho) if np.isfinite(rho) else None


def niche_dependence(generated: Mapping[str, str | Path], ground_truth: str | Path,
                     nucleus_threshold: float = 0.5) -> dict[str, Any]:
    """Per-transition `niche_spearman` of the real targets, identity and each named GEN_DIR.

    `generated`: variant name -> GEN_DIR (`flow generate`, held-out pairs in the same order);
    `ground_truth`: the simulated bundle's `ground_truth.parquet`."""
    truth = pd.read_parquet(ground_truth, columns=["cell_id", STRENGTH_COLUMN])
    strength_of = dict(zip(truth["cell_id"].astype(str), truth[STRENGTH_COLUMN].astype(float)))
    loaded = {name: np.load(Path(path) / "generated.npz") for name, path in generated.items()}
    first = next(iter(loaded.values()))
    target_ids = first["x_tgt_id"].astype(str)
    missing = [c for c in target_ids if c not in strength_of]
    if missing:
        raise InputDataError(f"{len(missing)} target cells are not in the ground truth (e.g. {missing[0]})",
                             path=ground_truth, fix="pass the ground_truth.parquet of the simulated bundle the "
                                                    "flow was trained on")
    for name, g in loaded.items():
        if not np.array_equal(g["x_tgt_id"].astype(str), target_ids):
            raise InputDataError(f"variant {name!r} has other held-out pairs", path=generated[name],
                                 fix="generate every variant from flows trained on the same split")
    strength = np.array([strength_of[c] for c in target_ids])
    transitions = first["transition_tag"].astype(str)
    sets = {"target": first["tgt_images"], "identity": first["ctrl_images"],
            **{name: g["generated_images"] for name, g in loaded.items()}}
    per: dict[str, dict[str, float | None]] = {name: {} for name in sets}
    n_pairs = {}
    for t in sorted(np.unique(transitions)):
        rows = np.flatnonzero(transitions == t)
        s = strength[rows]
        if np.ptp(s) == 0:
            continue
        tables = {name: morphology_table(images[rows], nucleus_threshold) for name, images in sets.items()}
        names = list(tables)
        zs = dict(zip(names, zscore_on_real(tables["target"], *[tables[n] for n in names])[1:]))
        real = zs["target"]
        high = s > np.median(s)
        direction = np.nanmean(real[high], axis=0) - np.nanmean(real[~high], axis=0)
        direction = np.nan_to_num(direction)
        for name, z in zs.items():
            per[name][t] = _spearman(s, np.nan_to_num(z) @ direction)
        n_pairs[t] = int(len(rows))
    out = {"n_pairs": n_pairs, "niche_spearman": {}}
    for name, values in per.items():
        finite = [v for v in values.values() if v is not None]
        out["niche_spearman"][name] = {"per_transition": values,
                                       "mean_per_transition": float(np.mean(finite)) if finite else None}
    return out
