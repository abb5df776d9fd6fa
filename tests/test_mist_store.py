"""MIST storage pieces: record encoding, manifest checks, build config, split rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spatia.config import config_to_dict, load_config
from spatia.errors import ConfigError, DatasetError
from spatia.mist import BuildConfig
from spatia.keys import SPLIT_CODES
from spatia.mist.splits import NO_BLOCK, assign_units, block_split_grid, buffer_cells, split_sizes
from spatia.mist.store import decode_record, encode_record, encode_records, read_manifest

TRAIN, VAL, TEST, BUFFER = (SPLIT_CODES[name] for name in ("train", "val", "test", "buffer"))


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_record_round_trip(codec):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    mask = rng.random((64, 64)) > 0.5
    indices = np.array([3, 17, 400], dtype=np.uint32)
    values = np.array([1, 250, 70000], dtype=np.uint32)
    meta = {"cell_ids": ["a-1", "b-2"], "grid_rc": [3, 4]}
    record = decode_record(encode_record("niche", image, mask, indices, values, meta, codec=codec))
    assert record.level == "niche"
    np.testing.assert_array_equal(record.image, image)
    np.testing.assert_array_equal(record.mask, mask)
    np.testing.assert_array_equal(record.indices, indices)
    np.testing.assert_array_equal(record.values, values)
    assert record.meta == meta
    dense = record.dense_counts(500)
    assert dense.dtype == np.float32 and dense.shape == (500,)
    assert dense[17] == 250 and dense[400] == 70000 and dense.sum() == values.sum()


def test_batch_encoding_equals_single_encoding_and_compresses_masked_crops():
    rng = np.random.default_rng(1)
    images = np.zeros((5, 64, 64), dtype=np.uint8)
    images[:, 20:40, 25:45] = rng.integers(0, 256, (5, 20, 20), dtype=np.uint8)
    masks = images > 0
    indptr = np.array([0, 2, 2, 5, 6, 8])
    indices = np.array([1, 5, 0, 2, 9, 4, 3, 7], dtype=np.uint32)
    values = np.arange(1, 9, dtype=np.uint32)
    batch = encode_records("cell", images, masks, indptr, indices, values)
    for i, blob in enumerate(batch):
        lo, hi = indptr[i], indptr[i + 1]
        assert blob == encode_record("cell", images[i], masks[i], indices[lo:hi], values[lo:hi])
        assert len(blob) < 64 * 64 // 2  # a mostly-zero masked crop compresses well
    empty = decode_record(batch[1])
    assert len(empty.indices) == 0 and empty.meta == {} and empty.mask is not None


def test_corrupt_record_is_a_dataset_error():
    blob = bytearray(encode_record("cell", np.zeros((8, 8), np.uint8), None, np.zeros(0), np.zeros(0)))
    blob[:4] = b"XXXX"
    with pytest.raises(DatasetError, match="magic"):
        decode_record(bytes(blob))


def test_read_manifest_refuses_missing_foreign_and_incomplete_directories(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a MIST dataset"):
        read_manifest(tmp_path / "plain")
    interrupted = tmp_path / "interrupted"
    (interrupted / ".build").mkdir(parents=True)
    (interrupted / ".build" / "progress.json").write_text(json.dumps({"done": 3, "total": 9}))
    with pytest.raises(DatasetError, match=r"incomplete.*3 of 9 chunks") as excinfo:
        read_manifest(interrupted)
    assert "resume" in str(excinfo.value)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DatasetError, match="not a spatia-mist manifest"):
        read_manifest(foreign)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "manifest.json").write_text(json.dumps({"format": "spatia-mist", "format_version": 99, "complete": True}))
    with pytest.raises(DatasetError, match="version 99"):
        read_manifest(newer)


def test_build_config_presets_and_validation():
    cpu, paper = BuildConfig.cpu(), BuildConfig.paper()
    assert (cpu.cell_image_px, cpu.niche_image_px, cpu.tissue_image_px) == (64, 64, 128)
    assert (paper.cell_image_px, paper.niche_image_px, paper.tissue_image_px) == (224, 224, 224)
    assert cpu.tissue_px == 1024
    assert BuildConfig.from_preset("paper", cell_image_px=256, tissue_image_px=None).cell_image_px == 256
    assert load_config(BuildConfig, config_to_dict(paper)) == paper  # read back from a manifest
    with pytest.raises(ConfigError, match="unknown key 'cell_px'"):
        load_config(BuildConfig, {"cell_px": 32})
    with pytest.raises(ConfigError, match="preset"):
        BuildConfig.from_preset("gpu")
    with pytest.raises(ConfigError, match="split_fractions"):
        BuildConfig(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ConfigError, match="scale_percentile"):
        BuildConfig(scale_percentile=0)
    with pytest.raises(ConfigError, match="slide_splits"):
        BuildConfig(slide_splits={"a": "holdout"})


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (8, 1, 1)), (16, (12, 2, 2)), (100, (80, 10, 10))],
)
def test_split_sizes(n, expected):
    assert split_sizes(n, (0.8, 0.1, 0.1)) == expected


def test_assign_units_is_seeded_and_exact():
    a = assign_units(50, (0.6, 0.2, 0.2), np.random.default_rng(7))
    b = assign_units(50, (0.6, 0.2, 0.2), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert np.bincount(a, minlength=3).tolist() == [30, 10, 10]


def test_block_grid_and_buffer_distances():
    blocks = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0]])
    grid = block_split_grid(blocks, (0.5, 0.25, 0.25), np.random.default_rng(0))
    assert grid.shape == (2, 2) and sorted(grid.ravel().tolist()) == sorted([TRAIN, TRAIN, VAL, TEST])
    # a hand-made grid: train at (0, 0), test at (0, 1), nothing at (1, *)
    grid = np.array([[TRAIN, TEST], [NO_BLOCK, NO_BLOCK]], dtype=np.int8)
    block_px, buffer_px = 100.0, 10.0
    x = np.array([95.0, 89.0, 50.0, 91.0])
    y = np.array([50.0, 50.0, 50.0, 99.0])
    rc = np.array([[0, 0]] * 4)
    near = buffer_cells(x, y, rc, grid, block_px, buffer_px)
    assert near.tolist() == [True, False, False, True]
    assert BUFFER not in grid
