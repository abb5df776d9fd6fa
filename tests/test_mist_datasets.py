"""Readers of a MIST dataset: the per-level items and the localised multi-scale batches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from spatia.errors import ConfigError
from spatia.mist import (
    BuildConfig,
    CellDataset,
    LocalizedBatchSampler,
    MultiScaleDataset,
    NicheDataset,
    TissueDataset,
    build_dataset,
    collate_multiscale,
)

CONFIG = BuildConfig.cpu(cell_image_px=48, niche_image_px=32, tissue_image_px=64)


@pytest.fixture(scope="module")
def root(simulated_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("mist") / "dataset"
    build_dataset([simulated_bundle], out, CONFIG, seed=0)
    return out


@pytest.fixture(scope="module")
def n_genes(root):
    return len(json.loads((root / "manifest.json").read_text())["genes"])


def test_cell_items(root, n_genes):
    ds = CellDataset(root, split="test")
    assert len(ds) == (pd.read_parquet(root / "cell_index.parquet")["split"] == "test").sum() > 0
    item = ds[3]
    assert item["cell_image"].shape == (1, 48, 48) and item["cell_image"].dtype == torch.float32
    assert item["cell_mask"].shape == (1, 48, 48) and item["cell_mask"].dtype == torch.bool
    assert 0 <= item["cell_image"].min() and item["cell_image"].max() <= 1
    assert not item["cell_image"][~item["cell_mask"]].any()
    assert item["cell_counts"].shape == (n_genes,) and item["cell_counts"].dtype == torch.float32
    assert item["cell_gene_measured"].dtype == torch.bool and item["cell_gene_measured"].all()
    row = ds.index.iloc[3]
    assert item["cell_counts"].sum() == row["total_counts"]
    assert (item["cell_id"], item["niche_id"], item["tissue_id"]) == (row["cell_id"], row["niche_id"], row["tissue_id"])
    # two readers of the same store in one process share its handle
    both = MultiScaleDataset(root, split=None)
    full_row = int(np.flatnonzero(both.cell_index["cell_id"].to_numpy() == row["cell_id"])[0])
    assert torch.equal(both[("cell", full_row)]["cell_image"], item["cell_image"])
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["cell_image"].shape == (4, 1, 48, 48) and len(batch["cell_id"]) == 4
    with pytest.raises(ConfigError, match="unknown split"):
        CellDataset(root, split="holdout")


def test_niche_and_tissue_items(root, n_genes):
    niches = NicheDataset(root)
    item = niches[0]
    assert item["niche_image"].shape == (1, 32, 32) and item["niche_image"].dtype == torch.float32
    assert item["niche_counts"].shape == (n_genes,)
    assert item["niche_grid_rc"].dtype == torch.int64 and item["niche_grid_rc"].shape == (2,)
    members = niches.member_cell_ids(0)
    cells = pd.read_parquet(root / "cell_index.parquet")
    assert sorted(members) == sorted(cells.loc[cells["niche_id"] == item["niche_id"], "cell_id"])
    tissues = TissueDataset(root)
    item = tissues[0]
    assert item["tissue_image"].shape == (1, 64, 64)
    assert len(item["tissue_niche_ids"]) == 16
    assert item["tissue_counts"].sum() == tissues.index.iloc[0]["total_counts"]


def check_batch(batch: dict, ds: MultiScaleDataset, cells_per_tissue: int, tissues_per_batch: int) -> None:
    b, bn, bt = len(batch["cell_id"]), len(batch["niche_id"]), len(batch["tissue_id"])
    g = ds.n_genes
    shapes = {
        "cell_image": ((b, 1, 48, 48), torch.float32),
        "cell_mask": ((b, 1, 48, 48), torch.bool),
        "cell_counts": ((b, g), torch.float32),
        "cell_gene_measured": ((b, g), torch.bool),
        "cell_niche_index": ((b,), torch.int64),
        "niche_image": ((bn, 1, 32, 32), torch.float32),
        "niche_counts": ((bn, g), torch.float32),
        "niche_gene_measured": ((bn, g), torch.bool),
        "niche_tissue_index": ((bn,), torch.int64),
        "niche_grid_rc": ((bn, 2), torch.int64),
        "tissue_image": ((bt, 1, 64, 64), torch.float32),
        "tissue_counts": ((bt, g), torch.float32),
        "tissue_gene_measured": ((bt, g), torch.bool),
        "tissue_niche_index": ((bt, 16), torch.int64),
    }
    for key, (shape, dtype) in shapes.items():
        assert tuple(batch[key].shape) == shape, key
        assert batch[key].dtype == dtype, key
    assert 1 <= bt <= tissues_per_batch and b <= tissues_per_batch * cells_per_tissue
    cells = ds.cell_index.set_index("cell_id")
    niches = ds.niche_index.set_index("niche_id")
    # every cell points at its own niche, every niche at its own tissue
    for i, cell in enumerate(batch["cell_id"]):
        assert batch["niche_id"][batch["cell_niche_index"][i]] == cells.loc[cell, "niche_id"]
    for j, niche in enumerate(batch["niche_id"]):
        assert batch["tissue_id"][batch["niche_tissue_index"][j]] == niches.loc[niche, "tissue_id"]
        assert batch["niche_grid_rc"][j].tolist() == [niches.loc[niche, "grid_row"], niches.loc[niche, "grid_col"]]
    # tissue grids are complete and in row-major order
    for t, tissue in enumerate(batch["tissue_id"]):
        stored = niches[niches["tissue_id"] == tissue]
        slots = batch["tissue_niche_index"][t]
        assert (slots >= 0).sum() == len(stored)
        for slot, j in enumerate(slots.tolist()):
            if j >= 0:
                assert batch["niche_grid_rc"][j].tolist() == [slot // 4, slot % 4]
                assert batch["niche_tissue_index"][j] == t
    # niche counts are the stored sums, and cells only come from the batch's tissues
    assert set(cells.loc[batch["cell_id"], "tissue_id"]) <= set(batch["tissue_id"])
    assert torch.equal(batch["niche_counts"].sum(1), torch.tensor(niches.loc[batch["niche_id"], "total_counts"].to_numpy(), dtype=torch.float32))


def test_localized_batches_follow_the_contract(root):
    ds = MultiScaleDataset(root, split="train")
    assert set(ds.cell_index.iloc[ds.eligible_cells]["split"]) == {"train"}
    sampler = LocalizedBatchSampler(ds, tissues_per_batch=2, cells_per_tissue=16, seed=0)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_multiscale))
    assert len(batches) == len(sampler) == int(np.ceil(len(sampler.tissues) / 2))
    for batch in batches:
        check_batch(batch, ds, 16, 2)
        assert set(ds.cell_index.set_index("cell_id").loc[batch["cell_id"], "split"]) == {"train"}
    # every eligible tissue once per epoch, draws change with the epoch and repeat with the seed
    seen = [t for batch in batches for t in batch["tissue_id"]]
    assert sorted(seen) == sorted(ds.tissue_index.iloc[sampler.tissues]["tissue_id"])
    first = [k for k in iter(sampler)]
    assert first == [k for k in iter(LocalizedBatchSampler(ds, 2, 16, seed=0))]
    sampler.set_epoch(1)
    assert [k for k in iter(sampler)] != first


def test_cover_all_cells_visits_each_cell_once_and_workers_agree(root):
    ds = MultiScaleDataset(root, split=None)
    sampler = LocalizedBatchSampler(ds, tissues_per_batch=3, cells_per_tissue=50, seed=0, shuffle=False, cover_all_cells=True)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_multiscale, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(sampler)
    cell_ids = [c for batch in batches for c in batch["cell_id"]]
    assert len(cell_ids) == len(set(cell_ids)) == len(ds.cell_index)
    check_batch(batches[0], ds, 50, 3)
    parallel = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_multiscale, num_workers=2))
    assert len(parallel) == len(batches)
    for a, b in zip(batches, parallel):
        assert a["cell_id"] == b["cell_id"] and a["niche_id"] == b["niche_id"]
        assert torch.equal(a["cell_image"], b["cell_image"]) and torch.equal(a["tissue_niche_index"], b["tissue_niche_index"])


def test_distributed_ranks_partition_the_batches(root):
    ds = MultiScaleDataset(root, split="train")
    whole = LocalizedBatchSampler(ds, 1, 8, seed=3)
    ranks = [LocalizedBatchSampler(ds, 1, 8, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == int(np.ceil(len(whole) / 2))
    tissues = [[k for k in batch if k.level == "tissue"][0].row for r in ranks for batch in r]
    assert set(tissues) == {[k for k in batch if k.level == "tissue"][0].row for batch in whole}


def test_collate_refuses_incomplete_batches(root):
    ds = MultiScaleDataset(root, split="train")
    keys = LocalizedBatchSampler(ds, 1, 4, seed=0).__iter__().__next__()
    items = [ds[k] for k in keys]
    with pytest.raises(ValueError, match="lacks"):
        collate_multiscale([it for it in items if it["level"] != "tissue"])
    with pytest.raises(ValueError, match="lacks"):
        collate_multiscale([it for it in items if not (it["level"] == "niche" and it is items[1])])
