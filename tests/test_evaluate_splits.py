"""Spatial block split: disjoint blocks, buffer band, per-slide blocks, split columns."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from spatia.errors import ConfigError, InputDataError
from spatia.evaluate.splits import (
    min_train_test_distance,
    spatial_block_split,
    split_from_column,
    summarise_split,
)


def _cells(n=4000, extent=1000.0, seed=0):
    return np.random.default_rng(seed).uniform(0, extent, size=(n, 2))


def test_blocks_are_disjoint_and_buffer_is_respected():
    xy = _cells()
    split = spatial_block_split(xy, block_um=200, buffer_um=40, test_fraction=0.3, seed=1)
    assert set(split) == {"train", "test", "buffer"}
    # every block is wholly test or wholly not test
    block = np.floor((xy - xy.min(axis=0)) / 200).astype(int)  # blocks anchored at the minimum
    for key in np.unique(block, axis=0):
        inside = (block == key).all(axis=1)
        assert len(set(split[inside] == "test")) == 1
    # no train cell within the buffer of a test cell; buffer cells are train cells near test
    train, test, buffer = xy[split == "train"], xy[split == "test"], xy[split == "buffer"]
    assert cKDTree(test).query(train)[0].min() >= 40
    assert cKDTree(test).query(buffer)[0].max() < 40
    assert min_train_test_distance(xy, split) >= 40
    # 30 % of 25 blocks -> 8 test blocks
    summary = summarise_split(split, source="spatial_blocks", spatial_um=xy, block_um=200, buffer_um=40)
    assert (summary.n_blocks, summary.n_test_blocks) == (25, 8)
    assert summary.n_train + summary.n_test + summary.n_buffer == len(xy)


def test_split_is_seeded_and_zero_buffer_keeps_all_cells():
    xy = _cells()
    a = spatial_block_split(xy, seed=3, buffer_um=0)
    assert np.array_equal(a, spatial_block_split(xy, seed=3, buffer_um=0))
    assert not np.array_equal(a, spatial_block_split(xy, seed=4, buffer_um=0))
    assert "buffer" not in set(a)


def test_blocks_never_span_slides():
    xy = np.concatenate([_cells(2000, seed=1), _cells(2000, seed=2)])  # same coordinates range
    slide = np.repeat(["s1", "s2"], 2000)
    split = spatial_block_split(xy, slide=slide, block_um=250, buffer_um=30, seed=0)
    for name in ("s1", "s2"):
        on = slide == name
        assert (split[on] == "test").any() and (split[on] == "train").any()  # each slide has both
    # the buffer is measured within a slide only: cross-slide proximity does not drop cells
    assert min_train_test_distance(xy, split, slide) >= 30
    assert min_train_test_distance(xy, split) < 30  # but ignoring slides, cells overlap


def test_single_block_tissue_has_no_test_cells():
    xy = _cells(100, extent=50.0)
    assert set(spatial_block_split(xy, block_um=200)) == {"train"}


def test_invalid_settings_and_coordinates_raise():
    with pytest.raises(ConfigError):
        spatial_block_split(_cells(10), test_fraction=1.5)
    bad = _cells(10)
    bad[0, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        spatial_block_split(bad)


def test_split_column_values():
    values = np.array(["Train", "test", None, "validation", "TEST"], dtype=object)
    assert split_from_column(values, column="s").tolist() == ["train", "test", "buffer", "buffer", "test"]
    with pytest.raises(InputDataError, match="not train/test/buffer"):
        split_from_column(np.array(["train", "holdout"]), column="s")
    with pytest.raises(InputDataError, match="needs both train and test"):
        split_from_column(np.array(["train", "train"]), column="s")


def test_evaluation_defaults_to_the_split_spatia_embed_wrote():
    """An output of `spatia embed` (obs "split" beside uns["spatia"]) is scored on the split its
    model trained on; any other AnnData, or one whose column holds no train cells, gets blocks."""
    import anndata as ad

    from spatia.evaluate import EvaluateConfig
    from spatia.evaluate.inputs import make_split

    xy = _cells(600)
    stored = np.where(xy[:, 0] < 500, "train", np.where(xy[:, 0] < 600, "val", "test"))
    adata = ad.AnnData(np.zeros((600, 2), dtype=np.float32), obsm={"spatial": xy})
    adata.obs["split"] = stored
    config = EvaluateConfig(labels="x")
    split, summary = make_split(adata, config)                    # no uns["spatia"]: not spatia's
    assert summary["source"] == "spatial_blocks"
    adata.uns["spatia"] = {"stage": "joint"}
    split, summary = make_split(adata, config)
    assert summary["source"] == "column:split"
    assert np.array_equal(split, np.where(stored == "val", "buffer", stored))  # val cells are not scored
    adata.obs["split"] = "test"                                    # e.g. `spatia embed --splits test`
    assert make_split(adata, config)[1]["source"] == "spatial_blocks"
    other = EvaluateConfig(labels="x", split="fold")
    adata.obs["fold"] = np.where(xy[:, 1] < 500, "train", "test")
    assert make_split(adata, other)[1]["source"] == "column:fold"  # a column named wins
