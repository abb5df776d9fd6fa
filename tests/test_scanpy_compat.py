"""scanpy's neighbours, UMAP and Leiden on an AnnData shaped like a `spatia embed` output.

Users run scanpy on our outputs first. Above 4,096 cells (8,192 with the default euclidean
metric) `sc.pp.neighbors` takes pynndescent's path; pynndescent 0.7 returns a scipy `csr_array`,
which has no `getnnz()` in scipy 1.17, and scanpy 1.11.5 calls it: constraints.txt pins
pynndescent 0.6.0 and pyproject caps it below 0.7. This test runs that path.

Most of its time is numba compiling pynndescent and UMAP once per process (about a minute of
CPU on the 2-core machine), hence `slow`; the data themselves take a second.
"""

from __future__ import annotations

import numpy as np
import pytest

sc = pytest.importorskip("scanpy")

N_CELLS = 8_300  # above scanpy's 8,192-cell switch to pynndescent for the euclidean metric
N_GROUPS = 6
DIM = 32
N_NEIGHBORS = 15


@pytest.fixture(scope="module")
def embedded():
    """An AnnData like `spatia embed` writes: CSR float32 counts, cell-ID obs_names, obsm
    X_spatia / X_spatia_cell (float32) and spatial (float64, um); the embedding has six
    well-separated groups (the known answer for Leiden)."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    from spatia.keys import SPATIAL_KEY, X_SPATIA, X_SPATIA_CELL

    rng = np.random.default_rng(0)
    groups = rng.integers(0, N_GROUPS, N_CELLS)
    centres = rng.normal(scale=6.0, size=(N_GROUPS, DIM))
    z = (centres[groups] + rng.normal(size=(N_CELLS, DIM))).astype(np.float32)
    counts = sparse.random(N_CELLS, 40, density=0.1, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    obs = pd.DataFrame({"truth_group": pd.Categorical(groups.astype(str))},
                       index=pd.Index([f"cell{i:05d}" for i in range(N_CELLS)]))
    adata = ad.AnnData(X=counts, obs=obs)
    adata.obsm[X_SPATIA] = z
    adata.obsm[X_SPATIA_CELL] = z[:, : DIM // 2].copy()
    adata.obsm[SPATIAL_KEY] = rng.uniform(0, 2000, size=(N_CELLS, 2))
    return adata, groups


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # six separate groups by design
def test_neighbors_umap_leiden_on_more_cells_than_the_pynndescent_switch(embedded):
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    adata, groups = embedded
    sc.pp.neighbors(adata, use_rep="X_spatia", n_neighbors=N_NEIGHBORS, random_state=0)

    distances = adata.obsp["distances"]
    assert distances.shape == (N_CELLS, N_CELLS)
    # each cell's stored neighbours (pynndescent's graph may keep the cell itself, as a zero)
    # hold its nearest N_NEIGHBORS - 1 others, as an exact search finds them
    exact = NearestNeighbors(n_neighbors=N_NEIGHBORS - 1).fit(adata.obsm["X_spatia"]).kneighbors(return_distance=False)
    recall = []
    for cell in range(N_CELLS):
        stored = distances.indices[distances.indptr[cell]:distances.indptr[cell + 1]]
        others = set(stored.tolist()) - {cell}
        assert len(others) >= N_NEIGHBORS - 1
        recall.append(len(others & set(exact[cell].tolist())) / (N_NEIGHBORS - 1))
    assert np.mean(recall) > 0.9
    assert adata.obsp["connectivities"].shape == (N_CELLS, N_CELLS)

    sc.tl.umap(adata, maxiter=30, random_state=0)
    layout = adata.obsm["X_umap"]
    assert layout.shape == (N_CELLS, 2) and np.isfinite(layout).all()

    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=0.1, random_state=0)
    assert adata.obs["leiden"].nunique() == N_GROUPS
    assert adjusted_rand_score(groups, adata.obs["leiden"]) > 0.99
