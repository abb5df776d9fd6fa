"""Clustering: Leiden at several resolutions (one run per seed) and KMeans with k = number of
labels (one run per seed); ARI and NMI against each label column, at the best resolution and at
the resolution chosen without labels (highest mean modularity).

Leiden runs once per representation on the cells labelled in any column; each column is scored
on its own labelled cells, so several label columns cost one clustering.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.leiden import LeidenGraph, cluster_space, knn_adjacency
from spatia.evaluate.metrics import stat, status_ok


def clustering_task(reps: dict[str, np.ndarray], label_sets: dict[str, np.ndarray], config: EvaluateConfig,
                    advance=lambda: None) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], np.ndarray]:
    """Leiden and KMeans per representation, scored against every label column.

    Args:
        label_sets: {column: labels (N,) object array, None where missing}.

    Returns:
        ({column: task result}, {representation: Leiden clusters at the label-free resolution,
        first seed, on the clustered rows}, the clustered rows (indices into the N cells)).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    masks = {column: labels != None for column, labels in label_sets.items()}  # noqa: E711
    rows = np.flatnonzero(np.logical_or.reduce(list(masks.values())))
    # per column: positions (within `rows`) of its labelled cells, and their labels as str
    scored = {column: (np.flatnonzero(masks[column][rows]), label_sets[column][rows][masks[column][rows]].astype(str))
              for column in label_sets}
    per_column: dict[str, dict[str, Any]] = {column: {} for column in label_sets}
    maps: dict[str, np.ndarray] = {}
    for name, full in reps.items():
        x = cluster_space(full[rows], config.cluster_max_dim, config.seed)
        graph = LeidenGraph(knn_adjacency(x, config.n_neighbors))
        partitions: dict[float, list[np.ndarray]] = {}
        modularity: dict[float, list[float]] = {}
        for res in config.leiden_resolutions:
            partitions[res] = [graph.leiden(res, seed) for seed in config.seeds]
            modularity[res] = [graph.modularity(c) for c in partitions[res]]
        chosen_res = max(config.leiden_resolutions, key=lambda r: float(np.mean(modularity[r])))
        maps[name] = partitions[chosen_res][0]
        for column, (positions, y) in scored.items():
            per_res = []
            for res in config.leiden_resolutions:
                clusters = [c[positions] for c in partitions[res]]
                per_res.append({
                    "resolution": res,
                    "n_clusters": stat([int(c.max() + 1) for c in partitions[res]]),
                    "ari": stat([adjusted_rand_score(y, c) for c in clusters]),
                    "nmi": stat([normalized_mutual_info_score(y, c) for c in clusters]),
                    "modularity": stat(modularity[res]),
                })
            best = max(per_res, key=lambda r: r["ari"]["mean"])
            chosen = next(r for r in per_res if r["resolution"] == chosen_res)
            n_labels = len(set(y))
            km_ari, km_nmi = [], []
            for seed in config.seeds:
                c = KMeans(n_clusters=n_labels, n_init=3, random_state=seed).fit_predict(x[positions])
                km_ari.append(adjusted_rand_score(y, c))
                km_nmi.append(normalized_mutual_info_score(y, c))
            per_column[column][name] = {
                "leiden_best": {"resolution": best["resolution"], "ari": best["ari"], "nmi": best["nmi"],
                                "n_clusters": best["n_clusters"]},
                "leiden_label_free": {"resolution": chosen["resolution"], "criterion": "max mean modularity",
                                      "ari": chosen["ari"], "nmi": chosen["nmi"], "n_clusters": chosen["n_clusters"]},
                "kmeans": {"k": n_labels, "ari": stat(km_ari), "nmi": stat(km_nmi)},
                "per_resolution": per_res,
                "cluster_dim": int(x.shape[1]),
            }
        advance()
    out = {column: status_ok(n_cells=int(scored[column][0].size), n_labels=len(set(scored[column][1])),
                             results=per_column[column]) for column in label_sets}
    return out, maps, rows
