"""Gene imputation through SPATIA's gene decoder (paper section 5.4, "gene imputation").

`GeneDecoderImputer` fills in held-out genes of cells of a MIST dataset with a trained model:

1. each queried cell's held-out genes are removed from its input: their counts are zeroed and
   they are marked *unmeasured*, so they neither become gene tokens nor count towards the
   library size the model normalises by (the model cannot tell them from genes the panel lacks);
2. the cell is embedded with its multi-scale context exactly as `spatia embed` does (whole
   tissue regions per batch, no masking, no dropout; other cells of its niche and region keep
   all their genes, as they would for a user imputing one cell);
3. the cell-level gene decoder (the head trained with the negative-binomial loss) reads the
   unified embedding `z` and gives each gene of the cell's full panel (held-out genes included)
   its expected share of the library, `softmax(logits over the panel)`;
4. that share is drawn toward the section's average: `share ** w * prior ** (1 - w)`,
   renormalised over the cell's panel, with `prior` the pooled share of each gene in the
   dataset's train cells (`train_gene_shares`) and w = `decoder_weight` (`DECODER_SHARE_WEIGHT`
   by default; 1 is the decoder alone). A product of the cell's decoder and the population
   profile: on genes with a few counts per thousand cells the decoder's cell-to-cell variation is
   mostly noise, and the tempered share reads them better (docs/evaluate.md);
5. the expected raw count of a held-out gene is its share times the full library, estimated as
   `visible_total / (1 - f)` where `visible_total` is the cell's visible measured counts and `f`
   the share of the held-out genes (clipped to 0.9).

It implements the evaluation's `Imputer` contract (`spatia.evaluate.baselines`):
``imputer(counts, held_out_mask, obs_names) -> predicted raw counts`` with ``counts`` the
float32 CSR (Q, G) of raw counts (held-out entries zeroed) in the order of `gene_names`.
Only held-out entries of the result are meaningful; the others repeat the visible counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from spatia.errors import ConfigError, DatasetError, InputDataError
from spatia.keys import LEVELS

log = logging.getLogger(__name__)

MAX_HELD_OUT_FRACTION = 0.9
"""Upper clip on the predicted fraction of a library that the held-out genes hold."""

DECODER_SHARE_WEIGHT = 0.7
"""Default `decoder_weight`: the exponent of the decoder's share in `share ** w * prior ** (1 - w)`.
Measured (docs/evaluate.md, "The decoder's share and the section's profile"): on four
bone-marrow region1 models, three breast models and the demo's simulated model, 0.7 raised the
per-gene and the pooled Pearson over the decoder alone on all eight; 0.5 raised the per-gene
Pearson more on seven but lowered the pooled one below the decoder alone on two."""


def train_gene_shares(dataset: str | Path, genes: int) -> np.ndarray:
    """(G,) float64: each gene's pooled share of the measured counts of the dataset's train cells,
    (sum of its counts + 1) / (sum of the cells' libraries over the cells that measure it + G),
    so no share is 0. Reads every train cell of the dataset once (about 0.1 ms a cell)."""
    from spatia.mist.datasets import CellDataset

    cells = CellDataset(dataset, split="train")
    if len(cells) == 0:
        raise DatasetError("the dataset has no train cells to take the genes' average shares from",
                             path=dataset, fix="impute with a dataset built with a train split")
    gene_counts = np.zeros(genes, dtype=np.float64)
    exposure = np.zeros(genes, dtype=np.float64)  # summed libraries of the cells measuring each gene
    for i in range(len(cells)):
        item = cells[i]
        measured = item["cell_gene_measured"].numpy().astype(bool)
        counts = np.where(measured, item["cell_counts"].numpy().astype(np.float64), 0.0)
        gene_counts += counts
        exposure += measured * counts.sum()
    return (gene_counts + 1.0) / (exposure + genes)


def temper_shares(share: np.ndarray, prior: np.ndarray, panel: np.ndarray, weight: float) -> np.ndarray:
    """`share ** weight * prior ** (1 - weight)` per cell (rows), renormalised over the cell's
    panel (bool, the same shape as `share`); 0 off the panel and on a row with an empty panel.
    weight 1 returns `share` on the panel."""
    if weight == 1.0:
        return np.where(panel, share, 0.0)
    log_share = weight * np.log(np.maximum(share, 1e-300)) + (1.0 - weight) * np.log(prior)[None, :]
    log_share = np.where(panel, log_share, -np.inf)
    top = log_share.max(axis=1, keepdims=True)
    tempered = np.where(panel, np.exp(log_share - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = tempered.sum(axis=1, keepdims=True)
    return np.divide(tempered, total, out=np.zeros_like(tempered), where=total > 0)


class GeneDecoderImputer:
    """Imputes held-out genes of dataset cells with a `SpatiaModel`'s cell-level gene decoder.

    Args:
        model: a trained `SpatiaModel` (its vocabulary must be the dataset's).
        dataset: the MIST dataset directory the cells come from (images and context).
        gene_names: the gene symbols of the columns of the counts the imputer will be given
            (e.g. ``adata.var_names``); every one must be in the model's vocabulary.
        levels: the levels to run (those the checkpoint's stage trained).
        batch_cells: cells per batch (whole tissue regions are kept together).
        device: torch device to run on.
        source: where the model came from (named in error messages).
        decoder_weight: w in `share ** w * prior ** (1 - w)` (step 4 above), in (0, 1].
    """

    def __init__(self, model, dataset: str | Path, gene_names, *, levels: tuple[str, ...] = LEVELS,
                 batch_cells: int = 512, device: str | torch.device = "cpu", source: str | Path = "<model in memory>",
                 decoder_weight: float = DECODER_SHARE_WEIGHT):
        from spatia.mist.datasets import MultiScaleDataset
        from spatia.model import check_levels
        from spatia.train.checkpoints import check_vocabulary

        self.dataset_path = Path(dataset)
        self.context = MultiScaleDataset(self.dataset_path, split=None)
        check_vocabulary(list(model.gene_symbols), self.context.genes, checkpoint=Path(source), dataset=self.dataset_path)
        if model.config.loss.cell.gene <= 0:
            raise InputDataError("the model's cell-level gene decoder was never trained (loss weight cell.gene is 0)",
                                 fix="impute with a checkpoint pretrained with a gene loss at the cell level")
        vocabulary = {g: i for i, g in enumerate(model.gene_symbols)}
        names = [str(g) for g in gene_names]
        missing = [g for g in names if g not in vocabulary]
        if missing:
            raise InputDataError(f"{len(missing)} genes of the counts are not in the model's vocabulary "
                                 f"(e.g. {', '.join(missing[:3])})", path=self.dataset_path,
                                 fix="impute on counts whose genes are the dataset's (the .h5ad of `spatia embed`)")
        self.gene_columns = np.asarray([vocabulary[g] for g in names], dtype=np.int64)
        if not 0.0 < decoder_weight <= 1.0:
            raise ConfigError(f"decoder_weight must lie in (0, 1], not {decoder_weight}",
                                 fix="use 1 for the decoder's share alone, or e.g. 0.7 (the default)")
        self.decoder_weight = float(decoder_weight)
        # in the model's vocabulary order, as the decoder's shares
        self.prior = (train_gene_shares(self.dataset_path, len(model.gene_symbols))
                      if self.decoder_weight < 1.0 else None)
        self.model = model.to(device)
        self.device = torch.device(device)
        self.levels = check_levels(levels)
        self.batch_cells = int(batch_cells)
        from spatia.train.embed import cell_names

        names_of_rows = cell_names(self.context.cell_index)
        self.row_of_name = {name: row for row, name in enumerate(names_of_rows)}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, dataset: str | Path, gene_names, *, batch_cells: int = 512,
                        device: str | torch.device = "cpu",
                        decoder_weight: float = DECODER_SHARE_WEIGHT) -> GeneDecoderImputer:
        """Load a `spatia pretrain` checkpoint; the levels are those its stage trained."""
        from spatia.train.checkpoints import load_model

        model, info = load_model(checkpoint)
        return cls(model, dataset, gene_names, levels=info.levels, batch_cells=batch_cells, device=device,
                   source=checkpoint, decoder_weight=decoder_weight)

    def __call__(self, counts: sp.csr_matrix, held_out_mask: np.ndarray, obs_names: np.ndarray) -> np.ndarray:
        from spatia.train.data import EmbeddingDataset, embedding_batches

        counts = sp.csr_matrix(counts, dtype=np.float32)
        held_out_mask = np.asarray(held_out_mask, dtype=bool)
        if counts.shape != held_out_mask.shape or counts.shape[1] != len(self.gene_columns):
            raise InputDataError(f"counts {counts.shape} and mask {held_out_mask.shape} must both be "
                                 f"(cells, {len(self.gene_columns)} genes)", fix="pass the counts of the imputer's genes")
        unknown = [str(n) for n in obs_names if str(n) not in self.row_of_name]
        if unknown:
            raise InputDataError(f"{len(unknown)} cells are not in the MIST dataset (e.g. {', '.join(unknown[:3])})",
                                 path=self.dataset_path, fix="impute cells of the dataset the embeddings came from")
        rows = np.asarray([self.row_of_name[str(n)] for n in obs_names], dtype=np.int64)
        if len(np.unique(rows)) != len(rows):
            raise InputDataError("a cell is asked for more than once", path=self.dataset_path,
                                 fix="pass each cell once (one row per cell)")
        query_of_row = np.full(len(self.context.cell_index), -1, dtype=np.int64)
        query_of_row[rows] = np.arange(len(rows))
        predicted = counts.toarray().astype(np.float64)
        plans = embedding_batches(self.context, query_of_row >= 0, self.batch_cells)
        batches = EmbeddingDataset(self.context, plans)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(len(batches)):
                self._impute_batch(batches[i], query_of_row, counts, held_out_mask, predicted)
        finally:
            self.model.train(was_training)
        return predicted

    def _impute_batch(self, batch: dict[str, Any], query_of_row: np.ndarray, counts: sp.csr_matrix,
                      held_out_mask: np.ndarray, predicted: np.ndarray) -> None:
        """Impute the queried cells of one embedding batch into `predicted` (Q, G), in place."""
        from spatia.model.decoders import gene_proportions

        batch.pop("keep")
        queries = query_of_row[batch.pop("cell_row").numpy()]
        in_batch = np.flatnonzero(queries >= 0)
        queries = queries[in_batch]
        panel = batch["cell_gene_measured"].bool()[torch.from_numpy(in_batch)].clone()
        self._hide(batch, in_batch, queries, counts, held_out_mask)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rows = torch.from_numpy(in_batch).to(self.device)
        with torch.no_grad():
            z = self.model.embed(batch, levels=self.levels).z[rows]
            share = gene_proportions(self.model.gene_decoder(z, "cell"), panel.to(self.device))
            visible = batch["cell_gene_measured"][rows].bool()
            visible_total = torch.where(visible, batch["cell_counts"][rows].float(), 0.0).sum(dim=1)
        share = share.cpu().numpy().astype(np.float64)                             # (q, vocabulary)
        if self.prior is not None:
            share = temper_shares(share, self.prior, panel.numpy(), self.decoder_weight)
        share = share[:, self.gene_columns]                                          # (q, genes of the counts)
        held = held_out_mask[queries]
        held_share = np.minimum(np.where(held, share, 0.0).sum(axis=1), MAX_HELD_OUT_FRACTION)
        library = visible_total.cpu().numpy().astype(np.float64) / (1.0 - held_share)
        values = share * library[:, None]
        block = predicted[queries]
        block[held] = values[held]
        predicted[queries] = block

    def _hide(self, batch: dict[str, Any], in_batch: np.ndarray, queries: np.ndarray, counts: sp.csr_matrix,
              held_out_mask: np.ndarray) -> None:
        """Put each queried cell's visible counts in the batch and mark its held-out genes unmeasured."""
        if len(in_batch) == 0:
            return
        cell_counts, measured = batch["cell_counts"], batch["cell_gene_measured"]
        visible = torch.from_numpy(counts[queries].toarray())
        held = torch.from_numpy(held_out_mask[queries])
        columns = torch.from_numpy(self.gene_columns)
        rows = torch.from_numpy(in_batch)
        cell_counts[rows[:, None], columns[None, :]] = visible.to(cell_counts.dtype)
        row_measured = measured[rows]
        row_measured[:, columns] = row_measured[:, columns] & ~held
        measured[rows] = row_measured
