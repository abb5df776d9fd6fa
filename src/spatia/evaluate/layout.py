"""2-D layouts (UMAP or PCA) of each representation for the report's figure."""

from __future__ import annotations

import warnings

import numpy as np

from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.leiden import cluster_space


def layouts_2d(reps: dict[str, np.ndarray], rows: np.ndarray, config: EvaluateConfig,
               advance=lambda: None) -> dict[str, np.ndarray]:
    """2-D coordinates (len(rows), 2) float32 of each representation (UMAP or PCA)."""
    from sklearn.decomposition import PCA

    out = {}
    for name, x in reps.items():
        space = cluster_space(x[rows], config.cluster_max_dim, config.seed)
        if config.layout == "umap":
            import umap

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = umap.UMAP(n_neighbors=min(config.n_neighbors, len(rows) - 1), random_state=config.seed,
                                  n_epochs=200)
                out[name] = model.fit_transform(space).astype(np.float32)
        else:
            out[name] = PCA(n_components=2, random_state=config.seed).fit_transform(space).astype(np.float32)
        advance()
    return out
