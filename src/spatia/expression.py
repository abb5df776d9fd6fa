"""Expression helpers every stage shares: raw counts out of an AnnData, one log-normalisation,
one PCA of expression.

`counts_from_anndata` is the only way spatia takes counts from a user's AnnData: it finds them
(a named layer, else layers["counts"], else .X), and refuses what is not raw counts (missing,
negative, non-finite) with a message naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from spatia.errors import InputDataError
from spatia.keys import COUNTS_LAYER

COVARIANCE_EIGH_MAX_GENES = 2000  # above this the gene x gene covariance is too big: ARPACK


def counts_from_anndata(adata, layer: str | None = None, *, source: str | Path | None = None) -> sp.csr_matrix:
    """Raw counts (cells x genes) as float32 CSR: `layer`, else layers["counts"], else .X.

    Raises `InputDataError` (naming `source`, the AnnData's file) when the layer is missing, there
    is no matrix, or values are negative or not finite (log or scaled data, not counts).
    """
    if layer is not None:
        if layer not in adata.layers:
            raise InputDataError(f"the AnnData has no layer {layer!r} (layers: {list(adata.layers)})", path=source,
                                 fix="name a layer holding raw counts, or leave the layer unset to use .X")
        matrix = adata.layers[layer]
        where = f"layers[{layer!r}]"
    elif COUNTS_LAYER in adata.layers:
        matrix, where = adata.layers[COUNTS_LAYER], f"layers[{COUNTS_LAYER!r}]"
    else:
        matrix, where = adata.X, ".X"
    if matrix is None:
        raise InputDataError("the AnnData has no expression matrix", path=source,
                             fix="store raw counts in .X or layers['counts']")
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    if counts.nnz:
        if not np.isfinite(counts.data).all():
            raise InputDataError(f"the expression matrix ({where}) has NaN or infinite values; raw counts are expected",
                                 path=source, fix="store raw counts in .X or layers['counts']")
        if counts.data.min() < 0:
            raise InputDataError(f"the expression matrix ({where}) has negative values; raw counts are expected",
                                 path=source, fix="store raw counts in .X or layers['counts'] (not scaled or log data)")
    return counts


def library_sizes(counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Total counts per cell, float64 (N,)."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def median_library(counts: sp.spmatrix | np.ndarray) -> float:
    """The median total count of the cells (rows) with any counts; 1.0 when none has any. The
    library size counts are normalised to (scanpy's default target)."""
    totals = library_sizes(counts)
    positive = totals[totals > 0]
    return float(np.median(positive)) if positive.size else 1.0


def log_normalise(counts: sp.spmatrix | np.ndarray, target_sum: float | None = None) -> sp.csr_matrix | np.ndarray:
    """log1p(counts / total * target_sum) per cell, float32; sparse input stays CSR.

    target_sum: None = `median_library(counts)`. Cells with zero counts stay zero.
    """
    totals = library_sizes(counts)
    if target_sum is None:
        target_sum = median_library(counts)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data *= np.repeat(scale, np.diff(out.indptr))
        np.log1p(out.data, out=out.data)
        return out
    out = np.asarray(counts, dtype=np.float32) * scale[:, None]
    return np.log1p(out, out=out)


def expression_pca(matrix: sp.spmatrix | np.ndarray, n_components: int = 50, seed: int = 0,
                   fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Top principal components of `matrix` (cells x genes, usually log-normalised), genes centred.

    Returns float32 (N, k), k = min(n_components, genes, fitted cells - 1): the components (and
    the centring) are fit on the rows where `fit_rows` (bool (N,)) is true (None: every row), and
    every row is projected on them. Deterministic: the covariance eigendecomposition up to
    COVARIANCE_EIGH_MAX_GENES genes, ARPACK started from `seed` above; component signs follow
    scikit-learn's `svd_flip`.
    """
    from sklearn.decomposition import PCA

    fit = matrix if fit_rows is None else matrix[np.flatnonzero(fit_rows)]
    n_cells, n_genes = fit.shape
    k = int(min(n_components, n_genes, n_cells - 1))
    if k < 1:
        raise InputDataError(f"cannot compute principal components of a {n_cells} x {n_genes} expression matrix",
                             fix="give at least two cells with at least two genes")
    solver = "covariance_eigh" if n_genes <= COVARIANCE_EIGH_MAX_GENES else "arpack"
    if solver == "arpack":
        k = min(k, n_genes - 1, n_cells - 1)
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed)
    if fit_rows is None:
        return np.asarray(pca.fit_transform(matrix), dtype=np.float32)
    return np.asarray(pca.fit(fit).transform(matrix), dtype=np.float32)
