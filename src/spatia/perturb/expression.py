"""The expression space of pairing (paper appendix D.2, "Expression Space Preprocessing").

Counts are library-size normalised to the median total of the cells and log1p-transformed
(`log_normalize`); the PCA (`pca_embedding`) is centred on the global mean of all cells and keeps
the top d components: g~_i = PCA_d(g_i - g_bar).

The PCA is fitted once on all cells of the AnnData that have counts, not per transition (the
paper's text centres on the global mean over all N cells). One shared space makes the costs of
all transitions comparable, keeps a state that takes part in several transitions (the paper's
Epi_FOXA1+ is the control of three) at the same coordinates in each, and lets the principal
axes reflect the whole tissue's variation rather than a two-state contrast that would turn the
transition's own DE genes into the dominant axis.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

COVARIANCE_EIGH_MAX_GENES = 2000  # above this the gene x gene covariance is too big: use ARPACK


def log_normalize(counts: np.ndarray | sp.spmatrix, target_sum: float | None = None) -> tuple[sp.csr_matrix | np.ndarray, float]:
    """log1p(counts / total * target_sum) per cell; returns (matrix as float32, target_sum).

    counts: (cells, genes), dense or sparse, non-negative; every row must have a positive total.
    target_sum: None = the median total count of the rows. Sparse input stays sparse (CSR).
    """
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if (totals <= 0).any():
        raise ValueError("log_normalize needs cells with a positive total count")
    if target_sum is None:
        target_sum = float(np.median(totals))
    scale = (target_sum / totals).astype(np.float32)
    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data *= np.repeat(scale, np.diff(out.indptr))
        np.log1p(out.data, out=out.data)
        return out, target_sum
    out = np.asarray(counts, dtype=np.float32) * scale[:, None]
    return np.log1p(out, out=out), target_sum


def pca_embedding(matrix: np.ndarray | sp.spmatrix, n_pcs: int, seed: int = 0) -> np.ndarray:
    """Top principal components of `matrix` (cells, genes), centred on its column means.

    Returns (cells, k) float32 with k = min(n_pcs, genes, cells - 1). Deterministic: the
    covariance eigendecomposition for up to COVARIANCE_EIGH_MAX_GENES genes, ARPACK started
    from `seed` above; component signs follow scikit-learn's `svd_flip`.
    """
    n_cells, n_genes = matrix.shape
    k = int(min(n_pcs, n_genes, n_cells - 1))
    if k < 1:
        raise ValueError(f"cannot compute principal components of a {n_cells} x {n_genes} matrix")
    solver = "covariance_eigh" if n_genes <= COVARIANCE_EIGH_MAX_GENES else "arpack"
    if solver == "arpack":
        k = min(k, n_genes - 1, n_cells - 1)
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed)
    return np.asarray(pca.fit_transform(matrix), dtype=np.float32)
