"""`LocalizedBatchSampler`: the paper's localised batching over a `MultiScaleDataset`.

A batch is a few tissue regions, every niche of each (so tissue grids are complete), and up to
`cells_per_tissue` cells drawn inside each region: attention at every level stays within the
batch and sequence lengths are bounded whatever the slide size (paper, appendix C).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Sampler

from spatia.errors import ConfigError

if TYPE_CHECKING:  # datasets.py imports this module (MultiScaleDataset.loader)
    from spatia.mist.datasets import MultiScaleDataset, MultiScaleKey


class LocalizedBatchSampler(Sampler[list["MultiScaleKey"]]):
    """Batches of `MultiScaleKey`s: tissues, all their niches, and cells inside them.

    Args:
        dataset: the `MultiScaleDataset` (its `split` decides which cells may be drawn).
        tissues_per_batch: tissue regions per batch (Bt <= this).
        cells_per_tissue: cells drawn per tissue region (fewer when a region holds fewer), so
            B <= tissues_per_batch * cells_per_tissue.
        seed: with the epoch (`set_epoch`), fixes the order and the draws.
        shuffle: random tissue order (True) or index order (False).
        cover_all_cells: instead of one random draw per tissue and epoch, visit every eligible
            cell exactly once, in slices of `cells_per_tissue` (for embedding a whole dataset).
        drop_last: drop a last batch with fewer than `tissues_per_batch` units.
        num_replicas, rank: for distributed training, each rank takes every
            `num_replicas`-th batch; all ranks get the same number of batches (the list is
            padded by repeating its first batches unless `drop_last`).
    """

    def __init__(
        self,
        dataset: MultiScaleDataset,
        tissues_per_batch: int,
        cells_per_tissue: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        cover_all_cells: bool = False,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if tissues_per_batch < 1 or cells_per_tissue < 1:
            raise ConfigError(
                f"tissues_per_batch ({tissues_per_batch}) and cells_per_tissue ({cells_per_tissue}) must be >= 1",
                fix="use e.g. tissues_per_batch=4, cells_per_tissue=32",
            )
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not in [0, {num_replicas})", fix="pass the process rank and world size")
        self.dataset = dataset
        self.tissues_per_batch = int(tissues_per_batch)
        self.cells_per_tissue = int(cells_per_tissue)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.cover_all_cells = cover_all_cells
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.tissues = np.array([t for t, cells in enumerate(dataset.tissue_cell_rows) if len(cells)], dtype=np.int64)
        if len(self.tissues) == 0:
            raise ConfigError(
                f"no cell of split {dataset.split!r} in {dataset.root}",
                path=dataset.root,
                fix="choose a split the dataset has (see `spatia dataset-info`)",
            )

    def set_epoch(self, epoch: int) -> None:
        """Use a different (seeded) order and draw for each epoch."""
        self.epoch = int(epoch)

    def _units(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """(tissue row, cell rows) units in visiting order."""
        order = rng.permutation(self.tissues) if self.shuffle else self.tissues
        units = []
        for t in order.tolist():
            cells = self.dataset.tissue_cell_rows[t]
            if self.cover_all_cells:
                for start in range(0, len(cells), self.cells_per_tissue):
                    units.append((t, cells[start : start + self.cells_per_tissue]))
            else:
                k = min(self.cells_per_tissue, len(cells))
                units.append((t, np.sort(rng.choice(cells, size=k, replace=False))))
        return units

    def _batches(self) -> list[list[tuple[int, np.ndarray]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        units = self._units(rng)
        size = self.tissues_per_batch
        batches = [units[i : i + size] for i in range(0, len(units), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self.num_replicas > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.num_replicas]
            else:
                total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
                batches += batches[: total - len(batches)]
            batches = batches[self.rank :: self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[MultiScaleKey]]:
        for batch in self._batches():
            cells = np.concatenate([c for _, c in batch]) if batch else np.zeros(0, dtype=np.int64)
            yield self.dataset.keys_for([t for t, _ in batch], cells.tolist())

    def __len__(self) -> int:
        n_units = (
            sum(math.ceil(len(self.dataset.tissue_cell_rows[t]) / self.cells_per_tissue) for t in self.tissues)
            if self.cover_all_cells
            else len(self.tissues)
        )
        n = n_units // self.tissues_per_batch if self.drop_last else math.ceil(n_units / self.tissues_per_batch)
        if self.num_replicas > 1:
            n = n // self.num_replicas if self.drop_last else math.ceil(n / self.num_replicas)
        return n
