"""Random batches that obey the batch contract (see `spatia.model.spatia`), for tests and
benchmarks. They are localised like real MIST batches: a few tissue regions, all their niches
(some grid slots empty), some cells per niche (some niches with none), one gene panel per
tissue (some genes unmeasured). Cells have a hidden type that sets both their expression
profile and their appearance, so image and expression share information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spatia.model.batch import MultiScaleBatch
from spatia.model.config import SpatiaConfig


@dataclass
class BatchSizes:
    """Composition of a localised batch: n_tissues regions (all their niches) and
    cells_per_tissue cells sampled in each; n_genes is the vocabulary size."""

    n_tissues: int = 2
    cells_per_tissue: int = 64
    n_genes: int = 300


def synthetic_gene_symbols(n_genes: int) -> list[str]:
    """Vocabulary for synthetic batches: GENE0000, GENE0001, ..."""
    return [f"GENE{i:04d}" for i in range(n_genes)]


def _blob_images(n: int, side: int, brightness: torch.Tensor, g: torch.Generator,
                 radius_px: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, side, side) in [0, 1]: a textured ellipse (or full field if radius None)."""
    texture = F.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=(side, side), mode="bilinear",
                            align_corners=False)
    if radius_px is None:
        mask = torch.ones(n, 1, side, side, dtype=torch.bool)
    else:
        yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
        centre = side / 2 + (torch.rand(n, 2, generator=g) - 0.5) * side * 0.1
        angle = torch.rand(n, generator=g) * torch.pi
        a = radius_px
        b = radius_px * (0.6 + 0.4 * torch.rand(n, generator=g))
        dx = xx - centre[:, 0, None, None]
        dy = yy - centre[:, 1, None, None]
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        u = dx * cos + dy * sin
        v = -dx * sin + dy * cos
        mask = ((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2 <= 1.0)[:, None]
    image = (brightness[:, None, None, None] * (0.5 + 0.5 * texture)).clamp(0, 1) * mask
    return image, mask


def synthetic_batch(config: SpatiaConfig, sizes: BatchSizes | None = None, *, n_genes: int | None = None,
                    empty_slot_fraction: float = 0.1, empty_niche_fraction: float = 0.1,
                    unmeasured_fraction: float = 0.1, n_types: int = 5, seed: int = 0,
                    device: torch.device | str = "cpu") -> MultiScaleBatch:
    """A random batch following the batch contract at the config's image sizes.

    sizes: tissues, cells per tissue and genes (default: the config's `train.tissues_per_batch`,
    `train.cells_per_tissue` and 300 genes; `n_genes` overrides sizes.n_genes). Exactly
    n_tissues * cells_per_tissue cells, spread at random over each tissue's niches except the
    `empty_niche_fraction` kept without cells. Same seed, same batch.
    """
    if sizes is None:
        sizes = BatchSizes(config.train.tissues_per_batch, config.train.cells_per_tissue)
    genes = n_genes if n_genes is not None else sizes.n_genes
    g = torch.Generator().manual_seed(seed)
    im = config.image
    slots = config.tissue.grid_size ** 2
    n_t = sizes.n_tissues

    # tissues -> niches (row-major slots, some empty; slot 0 always present)
    present = torch.rand(n_t, slots, generator=g) >= empty_slot_fraction
    present[:, 0] = True
    n_n = int(present.sum())
    tissue_niche_index = torch.full((n_t, slots), -1, dtype=torch.long)
    tissue_niche_index[present] = torch.arange(n_n)
    niche_tissue_index, niche_slot = present.nonzero(as_tuple=True)
    niche_grid_rc = torch.stack([niche_slot // config.tissue.grid_size, niche_slot % config.tissue.grid_size], 1)

    # tissues -> cells, spread over the tissue's niches (some niches without sampled cells)
    weight = (torch.rand(n_n, generator=g) >= empty_niche_fraction).float()
    first = tissue_niche_index[:, 0]
    weight[first] = 1.0  # every tissue keeps at least one niche that can hold cells
    chosen = []
    for t in range(n_t):  # a loop over the few tissues of a batch, not over cells
        rows = tissue_niche_index[t][tissue_niche_index[t] >= 0]
        picks = torch.multinomial(weight[rows], sizes.cells_per_tissue, replacement=True, generator=g)
        chosen.append(rows[picks])
    cell_niche_index = torch.cat(chosen).sort().values
    n_c = len(cell_niche_index)

    # cell types, expression and panels
    niche_type = torch.randint(n_types, (n_n,), generator=g)
    own = torch.rand(n_c, generator=g) < 0.7
    cell_type = torch.where(own, niche_type[cell_niche_index], torch.randint(n_types, (n_c,), generator=g))
    profile = -torch.log(torch.rand(n_types, genes, generator=g)) ** 3  # heavy-tailed type profiles
    profile = profile / profile.sum(dim=1, keepdim=True)
    library = 100.0 + 200.0 * torch.rand(n_c, 1, generator=g)
    cell_counts = torch.poisson(profile[cell_type] * library, generator=g)
    panel = torch.rand(n_t, genes, generator=g) >= unmeasured_fraction
    cell_tissue = niche_tissue_index[cell_niche_index]
    cell_measured = panel[cell_tissue]
    cell_counts = cell_counts * cell_measured

    unsampled = torch.poisson(profile[niche_type] * 1500.0, generator=g)
    niche_counts = torch.zeros(n_n, genes).index_add(0, cell_niche_index, cell_counts) + unsampled
    niche_measured = panel[niche_tissue_index]
    niche_counts = niche_counts * niche_measured
    tissue_counts = torch.zeros(n_t, genes).index_add(0, niche_tissue_index, niche_counts)
    tissue_measured = panel.clone()

    # images: cell brightness and size follow the type
    brightness = 0.3 + 0.6 * cell_type.float() / max(n_types - 1, 1)
    radius = im.cell_size_px * (0.2 + 0.05 * cell_type.float())
    cell_image, cell_mask = _blob_images(n_c, im.cell_size_px, brightness, g, radius)
    niche_image, _ = _blob_images(n_n, im.niche_size_px, 0.3 + 0.6 * niche_type.float() / max(n_types - 1, 1), g)
    tissue_image, _ = _blob_images(n_t, im.tissue_size_px, 0.3 + 0.4 * torch.rand(n_t, generator=g), g)
    if im.channels > 1:
        cell_image, cell_mask, niche_image, tissue_image = (
            x.expand(-1, im.channels, -1, -1).contiguous() for x in (cell_image, cell_mask, niche_image, tissue_image))

    batch = {
        "cell_image": cell_image, "cell_mask": cell_mask,
        "cell_counts": cell_counts, "cell_gene_measured": cell_measured,
        "cell_niche_index": cell_niche_index,
        "niche_image": niche_image, "niche_counts": niche_counts, "niche_gene_measured": niche_measured,
        "niche_tissue_index": niche_tissue_index, "niche_grid_rc": niche_grid_rc,
        "tissue_image": tissue_image, "tissue_counts": tissue_counts, "tissue_gene_measured": tissue_measured,
        "tissue_niche_index": tissue_niche_index,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["cell_id"] = [f"cell{i}" for i in range(n_c)]
    batch["niche_id"] = [f"t{int(t)}_r{int(r)}_c{int(c)}" for t, (r, c) in zip(niche_tissue_index, niche_grid_rc)]
    batch["tissue_id"] = [f"t{k}" for k in range(n_t)]
    return batch
