"""Data for pretraining and embedding: localised MIST batches, resumable mid-epoch.

Training batches are the paper's localised batches (appendix C): `LocalizedBatchSampler` draws a
few tissue regions, all their niches and `cells_per_tissue` cells inside each. One epoch visits
every train tissue region once; epoch `e` is a pure function of (seed, e), so a run interrupted
at batch `i` of epoch `e` resumes exactly at batch `i + 1` (`ResumableBatchSampler`). Each
training batch carries its position as `batch["batch_position"]` = int64 `(2,)` (epoch, index),
which the LightningModule stores in its checkpoints.

Embedding batches hold whole tissue regions with *every* cell in them (`embedding_batches`), so a
cell's niche and tissue embeddings average over all of its niche's cells and do not depend on
how cells were grouped into batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spatia.errors import ConfigError
from spatia.expression import log_normalise, median_library
from spatia.mist.datasets import MultiScaleDataset, MultiScaleKey, collate_multiscale
from spatia.mist.samplers import LocalizedBatchSampler

log = logging.getLogger(__name__)


class BatchPosition(NamedTuple):
    """A training batch's place in the data stream: `epoch` and `index` within the epoch."""

    epoch: int
    index: int


class _PositionKey(NamedTuple):
    """A marker key appended to a batch's keys; the dataset answers it with the position."""

    epoch: int
    index: int


class ResumableBatchSampler(Sampler[list]):
    """Wraps a `LocalizedBatchSampler`: reads the epoch when an iteration starts, can resume
    after a given batch, and appends a `_PositionKey` (epoch, index) to each batch's keys.

    epoch_source: called at the start of each iteration for the epoch number (the trainer's
    current epoch); None uses `set_epoch` values.
    """

    def __init__(self, inner: LocalizedBatchSampler, epoch_source: Callable[[], int] | None = None):
        self.inner = inner
        self.epoch_source = epoch_source
        self._resume: BatchPosition | None = None

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def resume_after(self, position: BatchPosition) -> None:
        """The next iteration continues right after `position` (the last trained batch)."""
        self._resume = position

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list]:
        if self._resume is not None:
            # continue after the last trained batch; after an epoch's last batch, the next epoch
            epoch, start = self._resume.epoch, self._resume.index + 1
            if start >= len(self.inner):
                epoch, start = epoch + 1, 0
            self._resume = None
            log.info("resuming the data stream at batch %d of epoch %d", start, epoch)
        else:
            epoch = int(self.epoch_source()) if self.epoch_source is not None else self.inner.epoch
            start = 0
        self.inner.set_epoch(epoch)
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[list]:
        for index, keys in enumerate(self.inner):
            if index >= start:
                yield [*keys, _PositionKey(epoch, index)]


class _TaggedDataset(Dataset):
    """`MultiScaleDataset` that also answers `_PositionKey`s (for `collate_tagged`)."""

    def __init__(self, dataset: MultiScaleDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        if isinstance(key, _PositionKey):
            return {"level": "position", "epoch": key.epoch, "index": key.index}
        return self.dataset[key]


def collate_tagged(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_multiscale` plus `batch_position` int64 (2,) when the batch was tagged."""
    positions = [item for item in items if item["level"] == "position"]
    batch = collate_multiscale([item for item in items if item["level"] != "position"])
    if positions:
        batch["batch_position"] = torch.tensor([positions[0]["epoch"], positions[0]["index"]], dtype=torch.int64)
    return batch


class _FixedBatches(Sampler[list]):
    """A fixed list of key lists (validation: the same draws at every validation)."""

    def __init__(self, batches: list[list[MultiScaleKey]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[MultiScaleKey]]:
        return iter(self.batches)


def split_has_cells(root: str | Path, split: str) -> bool:
    """Whether the dataset has cells of `split` that a sampler can draw."""
    return len(MultiScaleDataset(root, split=split).eligible_cells) > 0


class MistDataModule(L.LightningDataModule):
    """Training (`train` split) and validation (`val` split) loaders of localised batches.

    Args:
        root: the MIST dataset directory.
        tissues_per_batch, cells_per_tissue: batch composition (B <= their product cells).
        seed: fixes the epoch orders and cell draws (with the epoch number).
        num_workers: DataLoader worker processes.
        val_batches: validation batches per validation (0: no validation).

    Under DDP each rank takes every `world_size`-th batch (`LocalizedBatchSampler`'s
    `num_replicas` / `rank`), read from the attached trainer.
    """

    def __init__(self, root: str | Path, *, tissues_per_batch: int, cells_per_tissue: int, seed: int = 0,
                 num_workers: int = 0, val_batches: int = 0):
        super().__init__()
        self.root = Path(root)
        self.tissues_per_batch = int(tissues_per_batch)
        self.cells_per_tissue = int(cells_per_tissue)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.val_batches = int(val_batches)
        self.train_dataset: MultiScaleDataset | None = None
        self.val_dataset: MultiScaleDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = MultiScaleDataset(self.root, split="train")
        if self.val_batches > 0 and self.val_dataset is None:
            self.val_dataset = MultiScaleDataset(self.root, split="val")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: Dataset, batch_sampler: Sampler, collate) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank_world()
        inner = LocalizedBatchSampler(self.train_dataset, self.tissues_per_batch, self.cells_per_tissue, self.seed,
                                      shuffle=True, num_replicas=world, rank=rank)
        trainer = self.trainer
        sampler = ResumableBatchSampler(inner, (lambda: trainer.current_epoch) if trainer is not None else None)
        module = trainer.lightning_module if trainer is not None else None
        position = getattr(module, "resume_position", None)
        if position is not None:
            module.resume_position = None
            sampler.resume_after(position)
        return self._loader(_TaggedDataset(self.train_dataset), sampler, collate_tagged)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_batches <= 0:
            return []
        self.setup("validate")
        rank, world = self._rank_world()
        inner = LocalizedBatchSampler(self.val_dataset, self.tissues_per_batch, self.cells_per_tissue, self.seed,
                                      shuffle=True, num_replicas=world, rank=rank)
        per_rank = -(-self.val_batches // world)
        batches = []
        for keys in inner:
            if len(batches) == per_rank:
                break
            batches.append(keys)
        return self._loader(self.val_dataset, _FixedBatches(batches), collate_multiscale)


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------


class EmbeddingBatch(NamedTuple):
    """Tissue rows of one embedding batch and every cell row inside them (the cells whose
    embeddings are kept are `keep`, a bool array over `cell_rows`)."""

    tissue_rows: np.ndarray
    cell_rows: np.ndarray
    keep: np.ndarray


def embedding_batches(dataset: MultiScaleDataset, wanted: np.ndarray, max_cells: int) -> list[EmbeddingBatch]:
    """Group whole tissue regions into batches of at most `max_cells` cells (a region with more
    cells gets a batch of its own).

    dataset: a `MultiScaleDataset` opened with `split=None` (every cell is context).
    wanted: bool (n_cells,) over `dataset.cell_index`: the cells to embed. Regions without a
    wanted cell are skipped. Batches follow the tissue index order; cells within a region keep
    index order.
    """
    if max_cells < 1:
        raise ConfigError(f"the embedding batch size must be at least 1 cell, not {max_cells}",
                          fix="use e.g. --batch-cells 512")
    batches: list[EmbeddingBatch] = []
    tissues: list[int] = []
    cells: list[np.ndarray] = []
    count = 0

    def flush() -> None:
        nonlocal tissues, cells, count
        if tissues:
            rows = np.concatenate(cells)
            batches.append(EmbeddingBatch(np.asarray(tissues, dtype=np.int64), rows, wanted[rows]))
        tissues, cells, count = [], [], 0

    for t, rows in enumerate(dataset.tissue_cell_rows):
        if len(rows) == 0 or not wanted[rows].any():
            continue
        if count and count + len(rows) > max_cells:
            flush()
        tissues.append(t)
        cells.append(np.asarray(rows, dtype=np.int64))
        count += len(rows)
    flush()
    return batches


class EmbeddingDataset(Dataset):
    """Item i = the collated multi-scale batch of `batches[i]` (for a DataLoader with batch_size
    None), with `cell_row` int64 (B,) and `keep` bool (B,) added."""

    def __init__(self, dataset: MultiScaleDataset, batches: Sequence[EmbeddingBatch]):
        self.dataset = dataset
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        plan = self.batches[int(i)]
        keys = self.dataset.keys_for(plan.tissue_rows.tolist(), plan.cell_rows.tolist())
        batch = collate_multiscale([self.dataset[k] for k in keys])
        batch["cell_row"] = torch.from_numpy(plan.cell_rows.copy())
        batch["keep"] = torch.from_numpy(plan.keep.copy())
        return batch


# ---------------------------------------------------------------------------------------------
# statistics the config takes from the data
# ---------------------------------------------------------------------------------------------

TOKEN_CAP_PERCENTILE = 99.0
"""`gene.max_tokens` from the data: this percentile of nonzero measured genes per train cell."""

STATISTICS_CELLS = 1000
"""Train cells read (a seeded random sample) to measure the statistics."""

MORPHOMETRY_FULL_WEIGHT_R2 = 0.10
"""`fusion.morphometry_weight` from the data = min(1, R2 / this) ** 2, R2 the share of the train
cells' expression variance that their morphometry measures explain (`morphometry_expression_r2`).
Measured (docs/model.md): R2 0.14-0.17 on the simulator and the breast section (real DAPI),
where the measures raise domain and image-only scores; 0.004-0.014 on bone-marrow region1
(8-bit-derived DAPI), where at full weight they cut the Leiden ARI of z_cell from 0.19 to 0.12.
Squared (2026-12-02) because on region1 what the image path cost `X_spatia` grew with the
linear weight 0.04-0.14; at 0.001-0.02 `X_spatia` rose from 0.671 to 0.681 MLP macro-F1 (four
splits), above the count autoencoder's 0.673."""

MORPHOMETRY_R2_MIN_CELLS = 50
"""Fewer train cells than this: R2 is not measured and the measures keep full weight."""

MORPHOMETRY_R2_COMPONENTS = 20
"""Principal components of the log-normalised expression that the measures are asked to explain."""


class DatasetStatistics(NamedTuple):
    """What `resolve_data_config` fills in (the gene-token cap, the library target, the cell-crop
    pixel stats, the morphometry weight), and the standardisation of the morphometry input
    (`MorphometryInput.set_statistics`)."""

    token_cap: int
    median_library: float             # median total measured counts of the cells with any (>= 1)
    pixel_mean: float
    pixel_std: float
    n_cells: int
    morphometry_mean: np.ndarray      # (F,) float64, `morphometry_measures` of the cell crops
    morphometry_std: np.ndarray
    morphometry_r2: float | None      # `morphometry_expression_r2` (None: too few cells)

    def morphometry_weight(self) -> float:
        """`fusion.morphometry_weight` from the data: min(1, R2 / `MORPHOMETRY_FULL_WEIGHT_R2`) ** 2;
        1 when R2 was not measured."""
        if self.morphometry_r2 is None:
            return 1.0
        return float(min(1.0, max(self.morphometry_r2, 0.0) / MORPHOMETRY_FULL_WEIGHT_R2) ** 2)


def morphometry_expression_r2(measures: np.ndarray, counts: np.ndarray, *, seed: int = 0) -> float | None:
    """How much of the cells' expression their morphometry measures explain: the cross-validated
    (5-fold) R2 of a ridge regression from the standardised measures (N, F) to the top
    `MORPHOMETRY_R2_COMPONENTS` principal components of the standardised log-normalised counts
    (N, G; measured genes only), pooled over components (so weighted by their variance), clipped
    at 0. None for fewer than `MORPHOMETRY_R2_MIN_CELLS` cells.

    A label-free gauge of whether the image carries the cells' identity: high where nuclei differ
    between cell types, near 0 where the DAPI is too coarse to tell them apart."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    n = measures.shape[0]
    if n < MORPHOMETRY_R2_MIN_CELLS:
        return None
    expression = np.asarray(log_normalise(np.asarray(counts, dtype=np.float32), target_sum=1e4), dtype=np.float64)

    def standardised(x: np.ndarray) -> np.ndarray:
        x = x[:, x.std(axis=0) > 1e-8]
        return (x - x.mean(axis=0)) / x.std(axis=0)

    expression, measures = standardised(expression), standardised(np.asarray(measures, dtype=np.float64))
    if expression.shape[1] == 0 or measures.shape[1] == 0:
        return 0.0
    k = min(MORPHOMETRY_R2_COMPONENTS, expression.shape[1], n - 1)
    components = PCA(k, random_state=seed).fit_transform(expression)
    predicted = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 3, 12)), measures, components,
                                  cv=KFold(5, shuffle=True, random_state=seed))
    residual = float(((components - predicted) ** 2).sum())
    return max(0.0, 1.0 - residual / float((components ** 2).sum()))


def dataset_statistics(root: str | Path, *, n_cells: int = STATISTICS_CELLS, seed: int = 0) -> DatasetStatistics:
    """Measure, on a seeded sample of up to `n_cells` train cells of a MIST dataset: the
    `TOKEN_CAP_PERCENTILE` percentile of nonzero measured genes per cell (rounded up, at least
    1), the median library (total measured counts) of the cells with counts (at least 1), the
    mean and standard deviation of the cell-crop pixels (in [0, 1], every pixel) and of each
    morphometry measure of the cell crops (`spatia.model.morphometry`), and how much of the
    expression those measures explain (`morphometry_expression_r2`)."""
    from spatia.mist.datasets import CellDataset
    from spatia.model.morphometry import morphometry_measures

    cells = CellDataset(root, split="train")
    if len(cells) == 0:
        raise ConfigError("the dataset has no train cells to measure the gene-token cap and pixel statistics on",
                          path=root, fix="rebuild it with a train split, or set gene.max_tokens, image.pixel_mean "
                          "and image.pixel_std in the config")
    rows = np.random.default_rng(seed).permutation(len(cells))[:n_cells]
    total = total_sq = 0.0
    n_pixels = 0
    images, masks, measures = [], [], []
    measured_counts = []  # per cell (G,): counts of its measured genes, 0 elsewhere
    for i, row in enumerate(rows):
        item = cells[int(row)]
        measured_counts.append((item["cell_counts"] * item["cell_gene_measured"]).numpy())
        pixels = item["cell_image"].double()
        total += float(pixels.sum())
        total_sq += float((pixels * pixels).sum())
        n_pixels += pixels.numel()
        images.append(item["cell_image"])
        masks.append(item["cell_mask"])
        if len(images) == 128 or i == len(rows) - 1:  # in chunks: crops of the base config are 224 px
            measures.append(morphometry_measures(torch.stack(images), torch.stack(masks)).double())
            images, masks = [], []
    mean = total / n_pixels
    std = max((total_sq / n_pixels - mean * mean) ** 0.5, 1e-3)
    counts = np.stack(measured_counts)
    nonzero = (counts > 0).sum(axis=1)  # nonzero measured genes per cell
    cap = max(int(np.ceil(np.percentile(nonzero, TOKEN_CAP_PERCENTILE))), 1)
    library = max(median_library(counts), 1.0)
    per_cell = torch.cat(measures).numpy()
    r2 = morphometry_expression_r2(per_cell, counts, seed=seed)
    return DatasetStatistics(cap, library, float(mean), float(std), len(rows), per_cell.mean(axis=0),
                             per_cell.std(axis=0), r2)


def resolve_data_config(config, root: str | Path, *, seed: int = 0, stats: DatasetStatistics | None = None):
    """The config with its data-measured keys filled in (those left null): `gene.max_tokens`,
    `gene.target_sum`, `image.pixel_mean`, `image.pixel_std`, `fusion.morphometry_weight` (see
    `dataset_statistics`; `stats`: already measured on `root`) and `fusion.image_query_weight` (the
    morphometry weight). Unchanged when all are set."""
    import dataclasses

    image, gene, fusion = config.image, config.gene, config.fusion
    if (gene.max_tokens is not None and gene.target_sum is not None and image.pixel_mean is not None
            and image.pixel_std is not None and fusion.morphometry_weight is not None
            and fusion.image_query_weight is not None):
        return config
    stats = stats if stats is not None else dataset_statistics(root, seed=seed)
    log.info("from %d train cells of %s: gene-token cap %d (p%g of nonzero genes per cell), median library %g "
             "counts, pixel mean %.4f, std %.4f", stats.n_cells, root, stats.token_cap, TOKEN_CAP_PERCENTILE,
             stats.median_library, stats.pixel_mean, stats.pixel_std)
    if fusion.morphometry_weight is None:
        r2 = "not measured (too few cells)" if stats.morphometry_r2 is None else f"{stats.morphometry_r2:.3f}"
        # three significant digits: a small weight stays above 0 (0 would leave the image out of z_cell)
        weight = float(f"{stats.morphometry_weight():.3g}")
        log.info("morphometry measures explain R2 %s of the expression: fusion.morphometry_weight %.3g", r2, weight)
        fusion = dataclasses.replace(fusion, morphometry_weight=weight)
    if fusion.image_query_weight is None:
        # the same gauge: how much of the expression the section's cell images explain
        fusion = dataclasses.replace(fusion, image_query_weight=fusion.morphometry_weight)
        if fusion.image_query_weight < 1.0:
            log.info("the image tokens query %.3g of z_cell's gene pool, an image-free gene query the rest "
                     "(fusion.image_query_weight, the morphometry weight)", fusion.image_query_weight)
    image = dataclasses.replace(
        image, pixel_mean=round(stats.pixel_mean, 6) if image.pixel_mean is None else image.pixel_mean,
        pixel_std=round(stats.pixel_std, 6) if image.pixel_std is None else image.pixel_std)
    gene = dataclasses.replace(gene, max_tokens=stats.token_cap if gene.max_tokens is None else gene.max_tokens,
                               target_sum=(round(stats.median_library, 3) if gene.target_sum is None
                                           else gene.target_sum))
    return dataclasses.replace(config, image=image, gene=gene, fusion=fusion)
