"""Which measures of a cell crop predict its expression: the model's morphometry measures
against the hand-made morphology features and their blocks, with no model at all.

The image-only embedding holds a linear map of `spatia.model.morphometry.morphometry_measures`
(the morphometry input of z_cell, docs/model.md), so what those measures know bounds what the
embedding can show against the hand-made features (`spatia.evaluate.morphology`). This script
scores feature sets computed from the crops of a MIST dataset on expression from morphology, as
`spatia evaluate` does (`fit_and_score`: ridge with the penalty chosen on the train cells, and
XGBoost, 100 trees of depth 3, on the top 50 highly variable genes; per-gene Pearson on the test
cells of the dataset's split):

- `hand_made` (33 on one channel) and its blocks `hand_shape`, `hand_intensity`, `hand_texture`;
- `measures` (today's 23) and `measures_17`, the set before checkpoint format 4 (without
  extent, minimum, quartiles, maximum and mass displacement).

    .venv/bin/python benchmarks/bench_measure_sets.py WORK [WORK ...]

WORK is a `bench_representation.py --work` folder (WORK/mist and WORK/cells.h5ad with obs
"split"). Prints one JSON line: {"runs": {work: {set: {"dim", "ridge_pearson", "ridge_alpha",
"xgboost_pearson"}}}, "mean": {set: {"ridge_pearson", "xgboost_pearson"}}} (means over the runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OLD_SHAPE = ("area_fraction", "sqrt_area", "major_axis", "minor_axis", "elongation", "boundary_fraction")
OLD_INTENSITY = ("mean", "std", "q10", "q50", "q90", "integrated", "weighted_spread", "gradient_mean",
                 "laplacian_abs_mean", "dark_fraction", "edge_mean")
TEXTURE_PREFIX = "glcm_"


def feature_sets(work: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({set name: (N, F) standardised features}, the cell IDs of the rows) of one WORK folder."""
    import torch

    from spatia.evaluate.baselines import standardise_features
    from spatia.evaluate.crops import crops_from_mist
    from spatia.evaluate.morphology import SHAPE_FEATURES, morphology_features
    from spatia.model.morphometry import INTENSITY_NAMES, SHAPE_NAMES, morphometry_measures

    crops = crops_from_mist(work / "mist")
    if np.asarray(crops.images).ndim != 3:
        raise SystemExit(f"{work}: multi-channel crops; this script reads single-channel (DAPI) sections")
    hand = morphology_features(crops.images, crops.masks, channel_names=crops.channel_names)
    texture = [c for c in hand.columns if c.startswith(TEXTURE_PREFIX)]
    shape = [c for c in hand.columns if c in SHAPE_FEATURES]
    intensity = [c for c in hand.columns if c not in texture and c not in shape]
    images = torch.from_numpy(np.asarray(crops.images)).float()[:, None] / 255.0
    masks = torch.from_numpy(np.asarray(crops.masks, dtype=bool))[:, None]
    measures = morphometry_measures(images, masks).numpy()
    names = list(SHAPE_NAMES) + list(INTENSITY_NAMES)
    old = [names.index(n) for n in OLD_SHAPE + OLD_INTENSITY]
    sets = {
        "hand_made": hand.to_numpy(), "hand_shape": hand[shape].to_numpy(),
        "hand_intensity": hand[intensity].to_numpy(), "hand_texture": hand[texture].to_numpy(),
        "measures": measures, "measures_17": measures[:, old],
    }
    return {k: standardise_features(v) for k, v in sets.items()}, np.asarray(crops.cell_ids).astype(str)


def score_run(work: Path) -> dict[str, dict[str, float]]:
    """{set: {"dim", "ridge_pearson", "ridge_alpha", "xgboost_pearson"}} of one WORK folder, from
    `spatia evaluate`'s expression task with its defaults."""
    import anndata as ad

    from spatia.evaluate.config import EvaluateConfig
    from spatia.evaluate.tasks.expression import expression_task
    from spatia.expression import counts_from_anndata, log_normalise

    sets, cell_ids = feature_sets(work)
    cells = ad.read_h5ad(work / "cells.h5ad")
    rows = cells.obs_names.get_indexer(cell_ids)
    if (rows < 0).any():
        raise SystemExit(f"{work}: {int((rows < 0).sum())} cells of the MIST dataset are not in cells.h5ad")
    cells = cells[rows]
    config = EvaluateConfig(labels=("split",), expression_inputs=tuple(sets))
    task = expression_task(sets, log_normalise(counts_from_anndata(cells)), cells.var_names.to_numpy().astype(str),
                           cells.obs["split"].astype(str).to_numpy(), config)
    return {name: {"dim": int(sets[name].shape[1]), "ridge_pearson": round(entry["ridge"]["pearson"]["mean"], 4),
                   "ridge_alpha": entry["ridge"]["alpha"],
                   "xgboost_pearson": round(entry["xgboost"]["pearson"]["mean"], 4)}
            for name, entry in task["results"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, nargs="+", help="bench_representation.py --work folders")
    args = parser.parse_args()
    runs = {str(work): score_run(work) for work in args.work}
    sets = next(iter(runs.values())).keys()
    mean = {s: {m: round(float(np.mean([r[s][m] for r in runs.values()])), 4)
                for m in ("ridge_pearson", "xgboost_pearson")} for s in sets}
    print(json.dumps({"runs": runs, "mean": mean}))


if __name__ == "__main__":
    main()
