"""The UMAP figure of the report (umap-learn's numba compilation makes this test slow)."""

import numpy as np
import pytest

from spatia.evaluate import EvaluateConfig, evaluate, write_report
from spatia.evaluate.synthetic import synthetic_evaluation_data


@pytest.mark.slow
def test_umap_layout_separates_types_and_renders(tmp_path):
    adata, _ = synthetic_evaluation_data(300, n_genes=30, n_types=3, seed=11)
    config = EvaluateConfig(labels="cell_type", tasks=("annotation",), embeddings=("X_spatia",), n_seeds=1,
                            layout="umap", layout_max_cells=250, mlp_hidden=(16,), baselines=("pca",))
    results = evaluate(adata, config)
    plots = results["plots"]
    assert plots["layout_name"] == "UMAP" and len(plots["layout_rows"]) == 250
    xy = plots["layout"]["X_spatia"]
    assert xy.shape == (250, 2) and np.isfinite(xy).all()
    # well-separated types stay apart: each cell's nearest layout neighbour has its type
    labels = results["plots"]["labels"][plots["layout_rows"]]
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(axis=1)] == labels).mean() > 0.95
    out = write_report(results, tmp_path / "r")
    assert (out / "figures" / "umap.png").exists()
    assert "UMAP of each representation" in (out / "report.html").read_text()
