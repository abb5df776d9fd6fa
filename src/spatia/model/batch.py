"""The multi-scale batch the model reads: one typed contract in one place.

`MultiScaleBatch` is a `TypedDict`, so the plain dicts that `spatia.mist.collate_multiscale`,
`spatia.train.data` and `synthetic_batch` build *are* batches: type checkers verify the keys and
no conversion is needed. G is the model's gene vocabulary size; Sc, Sn, St the cell, niche and
tissue image sides (`image.*_size_px`).

| key | type, shape | holds |
|-----|-------------|-------|
| cell_image | float32 (B, C, Sc, Sc) in [0, 1] | cell crop, zero outside the cell polygon |
| cell_mask | bool (B, C, Sc, Sc) | the polygon (not read by the model) |
| cell_counts | float32 (B, G) | raw counts in vocabulary order |
| cell_gene_measured | bool (B, G) | genes the cell's slide measured |
| cell_niche_index | int64 (B,) | row of the cell's niche in the niche tensors |
| niche_image | float32 (Bn, C, Sn, Sn) | niche image |
| niche_counts, niche_gene_measured | float32 / bool (Bn, G) | pooled counts of the niche's cells |
| niche_tissue_index | int64 (Bn,) | row of the niche's tissue region |
| niche_grid_rc | int64 (Bn, 2) | row / column in its tissue's grid |
| tissue_image | float32 (Bt, C, St, St) | tissue-region image |
| tissue_counts, tissue_gene_measured | float32 / bool (Bt, G) | pooled counts of the region |
| tissue_niche_index | int64 (Bt, grid**2) | niche rows in row-major grid order, -1 = empty slot |
| cell_id, niche_id, tissue_id, slide_id | list[str] | carried through, not read |

A level needs only its own keys (`LEVEL_KEYS`): a cell-only forward reads only the cell keys.
"""

from __future__ import annotations

from typing import Final, NotRequired, TypedDict

import torch

from spatia.keys import CELL, NICHE, TISSUE


class MultiScaleBatch(TypedDict):
    """A localised multi-scale batch (see the module docstring for shapes)."""

    cell_image: torch.Tensor
    cell_mask: NotRequired[torch.Tensor]
    cell_counts: torch.Tensor
    cell_gene_measured: torch.Tensor
    cell_niche_index: NotRequired[torch.Tensor]
    niche_image: NotRequired[torch.Tensor]
    niche_counts: NotRequired[torch.Tensor]
    niche_gene_measured: NotRequired[torch.Tensor]
    niche_tissue_index: NotRequired[torch.Tensor]
    niche_grid_rc: NotRequired[torch.Tensor]
    tissue_image: NotRequired[torch.Tensor]
    tissue_counts: NotRequired[torch.Tensor]
    tissue_gene_measured: NotRequired[torch.Tensor]
    tissue_niche_index: NotRequired[torch.Tensor]
    cell_id: NotRequired[list[str]]
    slide_id: NotRequired[list[str]]
    niche_id: NotRequired[list[str]]
    tissue_id: NotRequired[list[str]]


LEVEL_KEYS: Final = {
    CELL: ("cell_image", "cell_counts", "cell_gene_measured"),
    NICHE: ("cell_niche_index", "niche_image", "niche_counts", "niche_gene_measured"),
    TISSUE: ("niche_tissue_index", "tissue_image", "tissue_counts", "tissue_gene_measured", "tissue_niche_index"),
}
"""The batch keys each level's forward reads."""


def image_key(level: str) -> str:
    """`cell_image`, `niche_image` or `tissue_image`."""
    return f"{level}_image"


def counts_key(level: str) -> str:
    """`cell_counts`, `niche_counts` or `tissue_counts` (raw counts, vocabulary order)."""
    return f"{level}_counts"


def measured_key(level: str) -> str:
    """`cell_gene_measured`, ...: bool (N, G), the genes the level's slide measured."""
    return f"{level}_gene_measured"
