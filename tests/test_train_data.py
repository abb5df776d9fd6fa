"""Training and embedding data: resumable localised batches, fixed validation draws, whole-tissue
embedding batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spatia.errors import ConfigError
from spatia.mist import LocalizedBatchSampler, MultiScaleDataset
from spatia.train import BatchPosition, MistDataModule, ResumableBatchSampler, embedding_batches
from spatia.train.data import EmbeddingDataset, _PositionKey


def _tissues(batch_keys):
    return [k.row for k in batch_keys if getattr(k, "level", None) == "tissue"]


def test_resumable_sampler_tags_and_resumes(simulated_mist):
    ds = MultiScaleDataset(simulated_mist, split="train")
    epochs = {"now": 0}
    sampler = ResumableBatchSampler(LocalizedBatchSampler(ds, 2, 8, seed=5), lambda: epochs["now"])
    first = list(sampler)
    assert len(first) == len(sampler) >= 3
    assert [b[-1] for b in first] == [_PositionKey(0, i) for i in range(len(first))]
    epochs["now"] = 1
    second = list(sampler)
    assert [b[-1].epoch for b in second] == [1] * len(second)
    assert [b[:-1] for b in first] != [b[:-1] for b in second]  # a new draw per epoch

    # resume after batch 1 of epoch 1: the remaining batches, identical keys
    fresh = ResumableBatchSampler(LocalizedBatchSampler(ds, 2, 8, seed=5), lambda: 99)
    fresh.resume_after(BatchPosition(1, 1))
    assert list(fresh) == second[2:]
    # the resume applies once; later iterations follow the epoch source
    assert [b[-1].epoch for b in fresh] == [99] * len(second)

    # resuming after the last batch of an epoch starts the next epoch from its first batch
    epochs["now"] = 2
    third = list(sampler)
    after_end = ResumableBatchSampler(LocalizedBatchSampler(ds, 2, 8, seed=5), lambda: 1)
    after_end.resume_after(BatchPosition(1, len(second) - 1))
    assert list(after_end) == third


def test_datamodule_batches_and_fixed_validation(simulated_mist):
    dm = MistDataModule(simulated_mist, tissues_per_batch=2, cells_per_tissue=16, seed=0, val_batches=2)
    batches = list(dm.train_dataloader())
    assert batches
    for i, batch in enumerate(batches):
        assert batch["batch_position"].tolist() == [0, i]
        n_tissues = batch["tissue_image"].shape[0]
        assert 1 <= n_tissues <= 2
        assert len(batch["cell_id"]) <= 16 * n_tissues
        # every cell's niche is in the batch and belongs to one of its tissues
        assert int(batch["cell_niche_index"].max()) < batch["niche_image"].shape[0]
        assert int(batch["niche_tissue_index"].max()) < n_tissues
    train_ids = {c for b in batches for c in b["cell_id"]}
    index = MultiScaleDataset(simulated_mist, split=None).cell_index
    splits = set(index.set_index("cell_id").loc[sorted(train_ids), "split"])
    assert splits == {"train"}

    val1 = [b["cell_id"] for b in dm.val_dataloader()]
    val2 = [b["cell_id"] for b in dm.val_dataloader()]
    assert val1 == val2 and 1 <= len(val1) <= 2  # the same draws at every validation
    assert "batch_position" not in next(iter(dm.val_dataloader()))
    assert set(index.set_index("cell_id").loc[[c for v in val1 for c in v], "split"]) == {"val"}


def test_embedding_batches_keep_whole_tissues(simulated_mist):
    ds = MultiScaleDataset(simulated_mist, split=None)
    n = len(ds.cell_index)
    wanted = np.ones(n, dtype=bool)
    sizes = [len(r) for r in ds.tissue_cell_rows]
    plans = embedding_batches(ds, wanted, max_cells=max(sizes) + 1)
    cells = np.concatenate([p.cell_rows for p in plans])
    assert np.array_equal(np.sort(cells), np.arange(n))  # every cell exactly once
    for plan in plans:
        assert plan.keep.all()
        assert len(plan.cell_rows) <= max(sizes) + 1 or len(plan.tissue_rows) == 1
        for t in plan.tissue_rows:  # a tissue's cells are all in its batch
            assert set(ds.tissue_cell_rows[t]) <= set(plan.cell_rows.tolist())
    one_each = embedding_batches(ds, wanted, max_cells=1)  # a region larger than the cap: its own batch
    assert len(one_each) == sum(1 for s in sizes if s)

    test_only = ds.cell_index["split"].eq("test").to_numpy()
    plans = embedding_batches(ds, test_only, max_cells=10_000)
    kept = np.concatenate([p.cell_rows[p.keep] for p in plans])
    assert np.array_equal(np.sort(kept), np.flatnonzero(test_only))
    context = np.concatenate([p.cell_rows for p in plans])
    tissue_of = ds.niche_tissue_row[ds.cell_niche_row]
    assert set(tissue_of[context]) == set(tissue_of[test_only])  # only regions holding test cells

    with pytest.raises(ConfigError):
        embedding_batches(ds, wanted, max_cells=0)


def test_embedding_dataset_items(simulated_mist):
    ds = MultiScaleDataset(simulated_mist, split=None)
    plans = embedding_batches(ds, np.ones(len(ds.cell_index), dtype=bool), max_cells=400)
    item = EmbeddingDataset(ds, plans)[0]
    assert item["cell_row"].dtype == torch.int64 and item["keep"].dtype == torch.bool
    assert item["cell_image"].shape[0] == len(plans[0].cell_rows) == len(item["cell_id"])
    assert list(item["cell_id"]) == ds.cell_index["cell_id"].iloc[plans[0].cell_rows].astype(str).tolist()
    # the niche of each cell is the cell's own niche
    niche_ids = np.asarray(item["niche_id"])[item["cell_niche_index"].numpy()]
    assert list(niche_ids) == ds.cell_index["niche_id"].iloc[plans[0].cell_rows].astype(str).tolist()


def test_token_cap_and_pixel_statistics_come_from_the_train_cells(simulated_mist, simulated_checkpoint):
    """`gene.max_tokens`, `gene.target_sum` and `image.pixel_mean/std: null` are measured on the
    train cells (every one of them here: fewer than the sample size) and written into the run's
    config."""
    from spatia.mist import CellDataset
    from spatia.model import load_config
    from spatia.train import load_model
    from spatia.model.morphometry import morphometry_measures
    from spatia.train.data import TOKEN_CAP_PERCENTILE, dataset_statistics, resolve_data_config

    cells = CellDataset(simulated_mist, split="train")
    items = [cells[i] for i in range(len(cells))]
    nonzero = np.array([int(((it["cell_counts"] > 0) & it["cell_gene_measured"]).sum()) for it in items])
    pixels = torch.cat([it["cell_image"].flatten() for it in items]).double()
    stats = dataset_statistics(simulated_mist, n_cells=len(cells))
    assert stats.n_cells == len(cells)
    assert stats.token_cap == int(np.ceil(np.percentile(nonzero, TOKEN_CAP_PERCENTILE)))
    # the cap covers at least the cells a linearly interpolated percentile puts below it:
    # floor(q (n - 1)) + 1 of n (a little under q itself for some n, e.g. 96 of 97 at q = 0.99)
    n, q = len(nonzero), TOKEN_CAP_PERCENTILE / 100
    assert (nonzero <= stats.token_cap).sum() >= np.floor(q * (n - 1)) + 1
    assert stats.token_cap < nonzero.max() + 1
    assert stats.pixel_mean == pytest.approx(float(pixels.mean()), rel=1e-6)
    assert stats.pixel_std == pytest.approx(float(pixels.std(unbiased=False)), rel=1e-5)
    libraries = np.array([float((it["cell_counts"] * it["cell_gene_measured"]).sum()) for it in items])
    assert stats.median_library == pytest.approx(float(np.median(libraries[libraries > 0])), rel=1e-6)

    tiny = load_config("tiny")
    assert tiny.gene.max_tokens is None and tiny.image.pixel_mean is None
    resolved = resolve_data_config(tiny, simulated_mist)
    assert resolved.gene.max_tokens == dataset_statistics(simulated_mist).token_cap
    assert tiny.gene.target_sum is None
    assert resolved.gene.target_sum == round(dataset_statistics(simulated_mist).median_library, 3)
    assert resolved.image.pixel_std > 0
    assert resolve_data_config(resolved, simulated_mist) is resolved  # nothing left to measure
    model, _ = load_model(simulated_checkpoint)  # pretrain wrote the measured values
    assert model.config.gene.max_tokens == resolved.gene.max_tokens
    assert model.config.gene.target_sum == resolved.gene.target_sum
    assert model.config.image.pixel_mean == resolved.image.pixel_mean
    assert tiny.fusion.morphometry_weight is None
    assert resolved.fusion.morphometry_weight == float(f"{dataset_statistics(simulated_mist).morphometry_weight():.3g}")
    assert model.config.fusion.morphometry_weight == resolved.fusion.morphometry_weight
    assert model.cell_fusion.morphometry.weight == resolved.fusion.morphometry_weight
    # the image queries' share of z_cell's pool is the same gauge, written into the config
    assert tiny.fusion.image_query_weight is None
    assert resolved.fusion.image_query_weight == resolved.fusion.morphometry_weight
    assert model.cell_fusion.image_query_share == resolved.fusion.image_query_weight
    assert (model.cell_fusion.gene_query is None) == (resolved.fusion.image_query_weight == 1.0)

    # the morphometry input is standardised with the train cells' measures, saved with the weights
    measures = morphometry_measures(torch.stack([it["cell_image"] for it in items]),
                                    torch.stack([it["cell_mask"] for it in items])).double()
    assert np.allclose(stats.morphometry_mean, measures.mean(dim=0).numpy(), atol=1e-6)
    assert np.allclose(stats.morphometry_std, measures.std(dim=0, unbiased=False).numpy(), atol=1e-6)
    saved = model.cell_fusion.morphometry
    default = dataset_statistics(simulated_mist)  # the sample pretrain measured on
    assert np.allclose(saved.mean.numpy(), default.morphometry_mean, atol=1e-5)
    constant = default.morphometry_std < 1e-6
    assert np.allclose(saved.std.numpy()[~constant], default.morphometry_std[~constant], rtol=1e-5)
    assert np.all(saved.std.numpy()[constant] == 1.0)


def test_statistics_refuse_a_dataset_without_train_cells(tmp_path, simulated_mist):
    from spatia.train.data import dataset_statistics

    with pytest.raises(ConfigError, match="no train cells"):
        dataset_statistics(_copy_without_train(simulated_mist, tmp_path))


def test_pretrain_refuses_a_dataset_without_train_cells_before_writing(tmp_path, simulated_mist):
    from spatia.train import pretrain

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no train cell to pretrain on") as error:
        pretrain(_copy_without_train(simulated_mist, tmp_path), out, train_overrides={"max_steps": 1})
    assert "another --seed" in str(error.value) and "split_buffer_um" in str(error.value)
    assert not out.exists()


def _copy_without_train(root, tmp_path):
    """A copy of a MIST dataset whose cell index has no train cells."""
    import shutil

    import pandas as pd

    from spatia.keys import TEST, TRAIN

    copy = tmp_path / "mist"
    shutil.copytree(root, copy)
    index_path = copy / "cell_index.parquet"
    index = pd.read_parquet(index_path)
    index["split"] = index["split"].replace(TRAIN, TEST)
    index.to_parquet(index_path)
    return copy


def test_morphometry_r2_known_answers_and_the_weight_rule():
    from spatia.train.data import (
        MORPHOMETRY_FULL_WEIGHT_R2,
        MORPHOMETRY_R2_MIN_CELLS,
        DatasetStatistics,
        morphometry_expression_r2,
    )

    rng = np.random.default_rng(0)
    n, n_genes = 600, 60
    size = rng.normal(size=n)                                   # one nuclear measure drives expression
    rate = np.exp(3.0 + np.outer(size, rng.normal(size=n_genes)))  # little Poisson noise
    counts = rng.poisson(rate)
    measures = np.column_stack([size + 0.1 * rng.normal(size=n), rng.normal(size=(n, 5)), np.ones(n)])
    informative = morphometry_expression_r2(measures, counts)
    # the first component is linear in the measure, the second (library-size normalisation) is not
    assert informative > 3 * MORPHOMETRY_FULL_WEIGHT_R2
    noise = morphometry_expression_r2(rng.normal(size=measures.shape), counts)
    assert 0.0 <= noise < 0.02                             # cross-validated: noise explains nothing
    assert morphometry_expression_r2(np.ones((n, 3)), counts) == 0.0  # constant measures
    assert morphometry_expression_r2(measures[:MORPHOMETRY_R2_MIN_CELLS - 1],
                                     counts[:MORPHOMETRY_R2_MIN_CELLS - 1]) is None

    def weight(r2):
        return DatasetStatistics(1, 1.0, 0.0, 1.0, n, np.zeros(3), np.ones(3), r2).morphometry_weight()

    assert weight(None) == 1.0
    assert weight(0.0) == 0.0
    assert weight(MORPHOMETRY_FULL_WEIGHT_R2 / 2) == pytest.approx(0.25)   # the square of the R2 ratio
    assert weight(MORPHOMETRY_FULL_WEIGHT_R2 / 10) == pytest.approx(0.01)
    assert weight(3 * MORPHOMETRY_FULL_WEIGHT_R2) == 1.0

    # a section whose measures explain little: the image queries get the same small share, and
    # a share set in the config is kept
    from spatia.model import load_config
    from spatia.train.data import resolve_data_config

    stats = DatasetStatistics(40, 8.0, 0.01, 0.05, n, np.zeros(23), np.ones(23), MORPHOMETRY_FULL_WEIGHT_R2 / 2)
    tiny = load_config("tiny")
    resolved = resolve_data_config(tiny, "unused: stats given", stats=stats)
    assert resolved.fusion.morphometry_weight == resolved.fusion.image_query_weight == pytest.approx(0.25)
    # a weight far below 1 is kept to three significant digits, not rounded to 0
    faint = stats._replace(morphometry_r2=0.0037)        # region1's seed-3 split
    assert resolve_data_config(tiny, "unused", stats=faint).fusion.morphometry_weight == 0.00137
    given = dataclasses.replace(tiny, fusion=dataclasses.replace(tiny.fusion, image_query_weight=0.9))
    assert resolve_data_config(given, "unused", stats=stats).fusion.image_query_weight == 0.9


def test_simulated_nuclei_explain_expression_and_shuffled_ones_do_not(simulated_mist):
    """The simulator draws nuclei by cell type: their measures explain the expression of the
    train cells well enough for full weight; shuffled across cells they explain nothing."""
    from spatia.mist.datasets import CellDataset
    from spatia.model.morphometry import morphometry_measures
    from spatia.train.data import MORPHOMETRY_FULL_WEIGHT_R2, dataset_statistics, morphometry_expression_r2

    stats = dataset_statistics(simulated_mist)
    assert stats.morphometry_r2 > MORPHOMETRY_FULL_WEIGHT_R2 and stats.morphometry_weight() == 1.0
    cells = CellDataset(simulated_mist, split="train")
    items = [cells[i] for i in range(min(len(cells), 400))]
    measures = morphometry_measures(torch.stack([it["cell_image"] for it in items]),
                                    torch.stack([it["cell_mask"] for it in items])).double().numpy()
    counts = np.stack([(it["cell_counts"] * it["cell_gene_measured"]).numpy() for it in items])
    assert morphometry_expression_r2(measures, counts) > MORPHOMETRY_FULL_WEIGHT_R2
    shuffled = measures[np.random.default_rng(0).permutation(len(items))]
    assert morphometry_expression_r2(shuffled, counts) < 0.03
