"""Synthetic AnnData with known structure, to check the evaluation end to end.

`synthetic_evaluation_data` draws cells of `n_types` types scattered uniformly over a square
of tissue. Each type has its own expression profile (marker genes up by a factor set by
`signal`), its own morphology (cell size, elongation, brightness, texture) and its own centre
in every embedding space; `signal = 0` removes the link between type and everything else,
so every metric should fall to chance. Used by the tests and `benchmarks/bench_evaluate.py`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.evaluate.crops import CellCrops


def synthetic_evaluation_data(
    n_cells: int = 1000,
    n_genes: int = 120,
    n_types: int = 4,
    *,
    signal: float = 1.0,
    embedding_dim: int = 32,
    crop_px: int = 32,
    extent_um: float = 1000.0,
    mean_library: float = 150.0,
    seed: int = 0,
):
    """An AnnData (and matching crops) with labels tied to expression, morphology and embeddings.

    Args:
        n_cells, n_genes, n_types: sizes.
        signal: strength of the type signal in [0, 1+]: marker fold change is 1 + 4 * signal,
            embedding centres are scaled by signal, morphology differences by min(signal, 1).
        embedding_dim: width of each X_spatia* embedding.
        crop_px: side of the square crops.
        extent_um: side of the square of tissue the cells are scattered over.
        mean_library: mean counts per cell.
        seed: random seed.

    Returns:
        (adata, crops): AnnData with raw counts in ``.X`` (CSR int), ``obs["cell_type"]``,
        ``obsm["spatial"]`` (um) and ``obsm`` X_spatia, X_spatia_cell, X_spatia_niche,
        X_spatia_tissue, X_spatia_image, X_spatia_gene; `CellCrops` with uint8 (N, S, S) images,
        bool masks and the cell IDs.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, size=n_cells)
    xy = rng.uniform(0.0, extent_um, size=(n_cells, 2))

    base = rng.gamma(1.5, 1.0, size=n_genes)
    profiles = np.tile(base, (n_types, 1))
    markers_per_type = max(1, n_genes // (2 * n_types))
    for t in range(n_types):
        genes = rng.choice(n_genes, size=markers_per_type, replace=False)
        profiles[t, genes] *= 1.0 + 4.0 * signal
    profiles /= profiles.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(mean_library), 0.3, size=n_cells)
    counts = rng.poisson(profiles[types] * library[:, None]).astype(np.int32)

    def embedding(noise: float) -> np.ndarray:
        centres = rng.normal(size=(n_types, embedding_dim)) * 2.0 * signal
        return (centres[types] + rng.normal(scale=noise, size=(n_cells, embedding_dim))).astype(np.float32)

    log_expr = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4)
    projection = rng.normal(size=(n_genes, embedding_dim)) / np.sqrt(n_genes)
    gene_embedding = (log_expr - log_expr.mean(axis=0)) @ projection
    obsm = {
        "spatial": xy.astype(np.float32),
        "X_spatia": embedding(1.0),
        "X_spatia_cell": embedding(1.5),
        "X_spatia_niche": embedding(3.0),
        "X_spatia_tissue": embedding(4.0),
        "X_spatia_image": embedding(2.0),
        "X_spatia_gene": gene_embedding.astype(np.float32),
    }
    cell_ids = np.array([f"cell{i:06d}" for i in range(n_cells)])
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types])}, index=cell_ids),
        var=pd.DataFrame(index=[f"gene{g:03d}" for g in range(n_genes)]),
        obsm=obsm,
    )
    crops = _crops(types, n_types, min(signal, 1.0), crop_px, rng)
    return adata, CellCrops(crops[0], crops[1], cell_ids)


def _crops(types: np.ndarray, n_types: int, strength: float, size: int, rng: np.random.Generator):
    n = len(types)
    radius = size * (0.18 + 0.2 * strength * types / max(n_types - 1, 1)) + rng.normal(0, 0.5, n)
    elongation = 1.0 + 0.8 * strength * (types % 2) + rng.normal(0, 0.05, n)
    angle = rng.uniform(0, np.pi, n)
    brightness = 90.0 + 100.0 * strength * ((types * 7) % n_types) / max(n_types - 1, 1) + rng.normal(0, 5, n)
    grid = np.arange(size, dtype=np.float64) - (size - 1) / 2
    rr, cc = np.meshgrid(grid, grid, indexing="ij")
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = rr[None] * cos + cc[None] * sin
    v = -rr[None] * sin + cc[None] * cos
    a = (radius * np.sqrt(elongation))[:, None, None]
    b = (radius / np.sqrt(elongation))[:, None, None]
    masks = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    texture = 40.0 * strength * (types % 3 == 0)[:, None, None] * np.sign(np.sin(rr[None] * 1.5))
    images = 15.0 + masks * (brightness[:, None, None] + texture) + rng.normal(0, 8, (n, size, size))
    return np.clip(images, 0, 255).astype(np.uint8), masks
