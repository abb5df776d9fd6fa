"""`embed_dataset`: every cell of a MIST dataset -> an AnnData of SPATIA embeddings.

The AnnData holds the same cells, in the same order and under the same names, as
`read_xenium(bundle).to_anndata()` of the dataset's bundle(s) (`cells.h5ad`), so the two merge:

- rows: every input cell, slide by slide in the bundle's cells.parquet order (the dataset's
  `input_cells.parquet`), the cells the build skipped included; with `splits`, only the kept
  cells of those splits (skipped cells belong to no split), in the same order. `obs_names` are
  the Xenium cell IDs (`slide_id/cell_id` when IDs repeat across slides);
- `obs["spatia_embedded"]` (bool): the cell got an embedding; `obs["spatia_skip_reason"]`: the
  build's reason for the others ("zero_counts", "outside_image", ...; NaN for embedded cells);
  their rows of every embedding are NaN;
- `.X`: raw counts, CSR float32 (as in `to_anndata`), columns in the dataset's gene vocabulary
  (sorted symbols; `to_anndata` keeps the panel's order: align with `adata[:, other.var_names]`),
  `var["n_slides_measured"]` how many slides measured each gene;
- `obsm`: the unified embedding and its levels under the modality's keys
  (`spatia.keys.EMBEDDING_KEYS_OF_MODALITY`): "both" -> `X_spatia`, `X_spatia_cell`,
  `X_spatia_niche`, `X_spatia_tissue`; "image" -> `X_spatia_image`, `X_spatia_image_cell`, ...;
  "gene" -> `X_spatia_gene`, ...; float32 (n_cells, D); niche / tissue keys only when the
  checkpoint's stage ran those levels. `obsm["spatial"]`: centroids (x, y) in um;
- `obs`: the dataset's cell index with the reader's names: cluster columns under their names in
  `cells.h5ad` (the index's `label_<name>`), the cells.parquet columns likewise (the index's
  `qc_<name>`; `total_counts` is cells.parquet's), `gene_counts_total` (counts in `.X`), the
  simulator's ground truth as `truth_*` (as the demo's `cells.h5ad`), and the build's own
  columns (slide_id, cell_id, split, niche_id, tissue_id, crop geometry);
- `uns["spatia"]`: checkpoint path, stage and step, the config (YAML text), modality, levels,
  splits, the obsm keys written, dataset manifest information, package version.

Batches hold whole tissue regions with all their cells, so a cell's niche context is the mean
over all cells of its niche and the result does not depend on the batch size. The forward is
`SpatiaModel.embed` (no masking, no dropout): the same inputs give the same embeddings.
`modality="image"` withholds genes and `"gene"` withholds images (cross-modal work).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from spatia.errors import ConfigError
from spatia.keys import (
    EMBEDDED_FLAG,
    EMBEDDING_KEY_OF_OUTPUT,
    EMBEDDING_KEYS_OF_MODALITY,
    LEVELS,
    SPATIAL_KEY,
    SPLIT_NAMES,
    UNS_KEY,
)
from spatia.model import MODALITIES
from spatia.model.config import EMBED_ORIENTATION_CHOICES
from spatia.train.embed_rows import (
    h5ad_ready,
    output_cell_names,
    output_rows,
    reader_names,
)

log = logging.getLogger(__name__)

SHARD_ENV = "SPATIA_EMBED_SHARD_DIR"


@dataclass
class EmbedResult:
    """The AnnData (on the process that assembled it), where it was written, and speed."""

    adata: Any
    path: Path | None
    n_cells: int
    seconds: float
    cells_per_second: float
    obsm_keys: list[str] = field(default_factory=list)
    morphometry_weight: float | None = None  # the model's `fusion.morphometry_weight` (None: not measured)


class EmbedModule(L.LightningModule):
    """Runs `SpatiaModel.embed` on embedding batches; returns the kept cells' rows, embeddings
    (float32 numpy) and raw counts (CSR)."""

    def __init__(self, model, modality: str, levels: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.modality = modality
        self.levels = tuple(levels)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        from scipy import sparse

        keep = batch.pop("keep").bool()
        rows = batch.pop("cell_row")
        out = self.model.embed(batch, modality=self.modality, levels=self.levels)
        result: dict[str, Any] = {"row": rows[keep].cpu().numpy()}
        for attr in EMBEDDING_KEY_OF_OUTPUT:
            value = getattr(out, attr)
            if value is not None:
                result[attr] = value[keep].float().cpu().numpy()
        result["counts"] = sparse.csr_matrix(batch["cell_counts"][keep].float().cpu().numpy())
        return result


class ShardWriter(BasePredictionWriter):
    """Collects this rank's predictions and writes them to `shard_dir/rank#####.pkl` at the end,
    then waits for the other ranks."""

    def __init__(self, shard_dir: Path):
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self.parts: list[dict[str, Any]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self.parts.append(prediction)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        with open(self.shard_dir / f"rank{trainer.global_rank:05d}.pkl", "wb") as handle:
            pickle.dump(self.parts, handle, protocol=pickle.HIGHEST_PROTOCOL)
        self.parts = []
        trainer.strategy.barrier("spatia-embed-shards")


class _RankShard(torch.utils.data.Dataset):
    """Every `world`-th item of a dataset, from `rank` (set by `EmbedData`). A rank left without
    items (fewer batches than ranks) gets one copy of item 0 with nothing kept, since Lightning
    needs at least one batch on every rank."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.rank, self.world = 0, 1

    def _share(self) -> range:
        return range(self.rank, len(self.dataset), self.world)

    def __len__(self) -> int:
        return max(len(self._share()), 1)

    def __getitem__(self, i: int):
        share = self._share()
        if len(share) == 0:
            item = self.dataset[0]
            item["keep"] = torch.zeros_like(item["keep"])
            return item
        return self.dataset[share[int(i)]]


class EmbedData(L.LightningDataModule):
    """Serves this rank's share of the embedding batches (one collated batch per item)."""

    def __init__(self, shard: _RankShard, num_workers: int):
        super().__init__()
        self.shard = shard
        self.num_workers = int(num_workers)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        if self.trainer is not None:
            self.shard.rank, self.shard.world = int(self.trainer.global_rank), int(self.trainer.world_size)
        return torch.utils.data.DataLoader(self.shard, batch_size=None, shuffle=False, num_workers=self.num_workers)


def cell_names(cell_index) -> np.ndarray:
    """The AnnData obs names `spatia embed` gives the cells of a dataset's cell index, in index
    order: the cell ID, or `slide_id/cell_id` when IDs repeat across slides."""
    ids = cell_index["cell_id"].astype(str)
    if ids.duplicated().any():
        ids = cell_index["slide_id"].astype(str) + "/" + ids
    return ids.to_numpy()


def embed_dataset(
    dataset: str | Path,
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    modality: str = "both",
    splits: list[str] | tuple[str, ...] | None = None,
    batch_cells: int = 512,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    precision: str = "auto",
    start_method: str = "popen",
    num_workers: int = 0,
    threads: int | None = None,
    progress_bar: bool = True,
    orientations: int | None = None,
) -> EmbedResult:
    """Embed the cells of `splits` (default: all) of a MIST dataset with a trained checkpoint.

    Args:
        dataset: the MIST dataset directory (the vocabulary must be the checkpoint's).
        checkpoint: a `.ckpt` written by `spatia pretrain`; the levels embedded are those its
            stage trained (a cell-stage checkpoint gives X_spatia and X_spatia_cell only).
        out: the `.h5ad` to write (atomically; an existing file is refused), or None to only
            return the AnnData.
        modality: "both", "image" (genes withheld) or "gene" (images withheld).
        splits: dataset splits whose cells to embed (niche and tissue context always uses every
            cell of a region).
        batch_cells: cells per batch; whole tissue regions are kept together (a larger region
            forms its own batch).
        devices, num_nodes, accelerator, precision, start_method: as in `pretrain`; with several
            processes each embeds a share of the batches and the first assembles the AnnData.
        num_workers: DataLoader worker processes per process.
        threads: torch intra-op threads per process.
        orientations: orientations of each cell crop the embedding is averaged over, 1 (the crop
            as is, 8x less image work) or 8; None: the checkpoint's `image.embed_orientations`.

    Returns:
        `EmbedResult`; `adata` and `path` are None on processes other than the first.
    """
    from spatia.train.checkpoints import load_model

    model, info = load_model(checkpoint)
    return embed_model(dataset, model, out, levels=info.levels, modality=modality, splits=splits,
                       orientations=orientations,
                       batch_cells=batch_cells, devices=devices, num_nodes=num_nodes, accelerator=accelerator,
                       precision=precision, start_method=start_method, num_workers=num_workers, threads=threads,
                       progress_bar=progress_bar, provenance={
                           "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_stage": info.stage,
                           "checkpoint_global_step": info.global_step})


def embed_model(
    dataset: str | Path,
    model,
    out: str | Path | None = None,
    *,
    levels: tuple[str, ...] = LEVELS,
    modality: str = "both",
    splits: list[str] | tuple[str, ...] | None = None,
    batch_cells: int = 512,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    precision: str = "auto",
    start_method: str = "popen",
    num_workers: int = 0,
    threads: int | None = None,
    progress_bar: bool = True,
    provenance: dict[str, Any] | None = None,
    orientations: int | None = None,
) -> EmbedResult:
    """`embed_dataset` for a `SpatiaModel` in memory (e.g. an untrained baseline); `levels` are
    the levels to run and `provenance` extra entries for `uns["spatia"]`. `orientations` sets
    the model's `image.embed_orientations` for this and later calls (None: leave it)."""
    from spatia import __version__
    from spatia.mist.datasets import MultiScaleDataset
    from spatia.model import check_levels
    from spatia.outputs import atomic_output, refuse_existing
    from spatia.train.checkpoints import check_vocabulary
    from spatia.train.data import EmbeddingDataset, embedding_batches
    from spatia.train.progress import lightning_logs_to
    from spatia.train.pretrain import (
        LIGHTNING_NOISE,
        env_rank_is_zero,
        make_strategy,
        resolve_accelerator,
        resolve_precision,
    )

    started = time.perf_counter()
    dataset = Path(dataset)
    out = Path(out) if out is not None else None
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}", fix=f"use one of {', '.join(MODALITIES)}")
    if splits:
        unknown = [s for s in splits if s not in SPLIT_NAMES]
        if unknown:
            raise ConfigError(f"unknown split(s) {unknown}", fix=f"use some of {', '.join(SPLIT_NAMES)}, or none for all")
    rank_zero = env_rank_is_zero()
    if out is not None and rank_zero:
        refuse_existing(out, what="embedding file")
    if threads:
        torch.set_num_threads(int(threads))

    levels = check_levels(levels)
    if orientations is not None:
        if orientations not in EMBED_ORIENTATION_CHOICES:
            raise ConfigError(f"orientations must be one of {EMBED_ORIENTATION_CHOICES}, not {orientations}",
                              fix=f"use {EMBED_ORIENTATION_CHOICES[-1]} (every orientation of the crop) or 1 (as is)")
        model.config.image.embed_orientations = int(orientations)
    context = MultiScaleDataset(dataset, split=None)
    source = Path((provenance or {}).get("checkpoint", "<model in memory>"))
    check_vocabulary(list(model.gene_symbols), context.genes, checkpoint=source, dataset=dataset)
    wanted = np.ones(len(context.cell_index), dtype=bool) if not splits else \
        context.cell_index["split"].isin(list(splits)).to_numpy()
    if not wanted.any():
        raise ConfigError(f"the dataset has no cells of split(s) {list(splits or [])}", path=dataset,
                          fix="choose splits the dataset has (see `spatia dataset-info`)")
    plans = embedding_batches(context, wanted, batch_cells)
    accel = resolve_accelerator(accelerator)
    resolved_precision = resolve_precision(precision, accel)

    # per-rank results meet in a directory every rank knows: beside the output file (a shared
    # filesystem across nodes), or without one a temporary directory passed to the processes
    # launched from this one through the environment (spawned ones get it with the callback)
    if out is not None:
        shard_dir = out.parent / f".{out.name}.embed-shards"
        if rank_zero:
            shutil.rmtree(shard_dir, ignore_errors=True)
            shard_dir.mkdir(parents=True)
    elif rank_zero:
        shard_dir = Path(tempfile.mkdtemp(prefix=".spatia-embed-"))
        os.environ[SHARD_ENV] = str(shard_dir)
    else:
        shard_dir = Path(os.environ[SHARD_ENV])
    try:
        shard = _RankShard(EmbeddingDataset(context, plans))
        # Lightning's device lines and adverts go nowhere, its warnings to our logger
        with lightning_logs_to(None), warnings.catch_warnings():
            for message in (*LIGHTNING_NOISE, ".*infer the batch indices.*"):
                warnings.filterwarnings("ignore", message=message)
            trainer = L.Trainer(
                accelerator=accel, devices=devices, num_nodes=num_nodes,
                strategy=make_strategy(devices, num_nodes, accel, start_method),
                precision=resolved_precision, logger=False, enable_checkpointing=False,
                enable_progress_bar=progress_bar, enable_model_summary=False, use_distributed_sampler=False,
                callbacks=[ShardWriter(shard_dir)], inference_mode=True,
            )
            log.info("embedding %d cells of %s (%s, modality %s, levels %s) in %d batches", int(wanted.sum()), dataset,
                     source.name, modality, "+".join(levels), len(plans))
            model_device = next(model.parameters()).device
            trainer.predict(EmbedModule(model, modality, levels), datamodule=EmbedData(shard, num_workers),
                            return_predictions=False)
        model.to(model_device)  # Lightning's teardown leaves the module on the CPU
        if not rank_zero:
            return EmbedResult(adata=None, path=None, n_cells=0, seconds=time.perf_counter() - started,
                               cells_per_second=0.0)
        parts = []
        for path in sorted(shard_dir.glob("rank*.pkl")):
            with open(path, "rb") as handle:
                parts.extend(pickle.load(handle))
    finally:
        if rank_zero:
            shutil.rmtree(shard_dir, ignore_errors=True)
            os.environ.pop(SHARD_ENV, None)

    adata = _assemble(parts, context, model.config, levels, provenance or {}, dataset=dataset, modality=modality,
                      splits=splits, wanted=wanted, version=__version__)
    n_embedded = int(adata.obs[EMBEDDED_FLAG].sum())
    if n_embedded != int(wanted.sum()):
        raise RuntimeError(f"embedded {n_embedded} cells, expected {int(wanted.sum())}")
    if out is not None:
        with atomic_output(out) as tmp:
            adata.write_h5ad(tmp)
    seconds = time.perf_counter() - started
    log.info("embedded %d cells (%d rows, %d skipped by the build) in %.1f s (%.0f cells/s)%s", n_embedded,
             adata.n_obs, adata.n_obs - n_embedded, seconds, n_embedded / seconds,
             f"; wrote {out}" if out is not None else "")
    return EmbedResult(adata=adata, path=out, n_cells=n_embedded, seconds=seconds,
                       cells_per_second=n_embedded / seconds, obsm_keys=sorted(adata.obsm.keys()),
                       morphometry_weight=model.config.fusion.morphometry_weight)


def _assemble(parts: list[dict[str, Any]], context, config, levels, provenance: dict[str, Any], *, dataset: Path,
              modality: str, splits, wanted: np.ndarray, version: str):
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rows = np.concatenate([p["row"] for p in parts])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    if len(np.unique(rows)) != len(rows):
        raise RuntimeError("a cell was embedded twice")
    layout = output_rows(context, dataset, wanted)
    embedded = layout.index_row >= 0
    # position of each output row among the embedded rows (sorted cell-index rows)
    at = np.searchsorted(rows, layout.index_row[embedded])
    if (at >= len(rows)).any() or (rows[np.minimum(at, len(rows) - 1)] != layout.index_row[embedded]).any():
        raise RuntimeError("a wanted cell was not embedded")
    take = np.full(len(embedded), -1, dtype=np.int64)
    take[embedded] = order[at]  # row of the concatenated predictions
    n_genes = len(context.genes)
    predicted = sparse.vstack([p["counts"] for p in parts]).tocsr().astype(np.float32)
    pick = sparse.csr_matrix((np.ones(int(embedded.sum()), dtype=np.float32),
                              (np.flatnonzero(embedded), take[embedded])), shape=(len(embedded), predicted.shape[0]))
    counts = (pick @ predicted + layout.skipped_counts).tocsr().astype(np.float32)
    counts.sort_indices()

    obs = layout.obs.drop(columns=[c for c in ("key",) if c in layout.obs.columns])
    names = output_cell_names(obs["slide_id"], obs["cell_id"])
    spatial = obs[["x_centroid_um", "y_centroid_um"]].to_numpy(dtype=np.float64)
    renames = reader_names(obs.columns)
    label_columns = [renames.get(c, c) for c in obs.columns if c.startswith("label_")]
    obs = obs.rename(columns=renames)
    obs[EMBEDDED_FLAG] = embedded
    obs = h5ad_ready(obs)
    obs.index = pd.Index(names, name=None)
    manifest = context.manifest
    measured = np.zeros(n_genes, dtype=np.int64)
    for slide in manifest["slides"]:
        measured[np.asarray(slide["measured_gene_indices"], dtype=np.int64)] += 1
    var = pd.DataFrame({"n_slides_measured": measured}, index=pd.Index(context.genes))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    keys = EMBEDDING_KEYS_OF_MODALITY[modality]
    for attr in EMBEDDING_KEY_OF_OUTPUT:
        if attr in parts[0]:
            values = np.concatenate([p[attr] for p in parts]).astype(np.float32)
            full = np.full((len(embedded), values.shape[1]), np.nan, dtype=np.float32)
            full[embedded] = values[take[embedded]]
            adata.obsm[keys[attr]] = full
    adata.obsm[SPATIAL_KEY] = spatial
    adata.uns[UNS_KEY] = {
        "command": "embed",
        "version": version,
        "checkpoint": "",
        "checkpoint_stage": "",
        "checkpoint_global_step": -1,
        **provenance,
        "config_name": config.name,
        "config_yaml": config.to_yaml(),
        "modality": modality,
        "orientations": int(config.image.embed_orientations) if modality != "gene" else 1,
        "levels": list(levels),
        "splits": list(splits) if splits else ["all"],
        "embedding_keys": [k for k in EMBEDDING_KEYS_OF_MODALITY[modality].values() if k in adata.obsm],
        "label_columns": np.asarray(label_columns, dtype=str),
        "n_embedded": int(embedded.sum()),
        "n_skipped": int((~embedded).sum()),
        "embedding_dim": int(config.fusion.dim),
        "dataset": {
            "path": str(dataset.resolve()),
            "format_version": int(manifest.get("format_version", 0)),
            "created_utc": str(manifest.get("created_utc", "")),
            "preset": str(manifest.get("builder_config", {}).get("preset", "")),
            "n_genes": len(context.genes),
            "slides": [str(s["slide_id"]) for s in manifest["slides"]],
        },
    }
    return adata
