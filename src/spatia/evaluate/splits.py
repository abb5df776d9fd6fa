"""Spatially disjoint train/test splits.

A random per-cell split leaks: neighbouring cells share niche and tissue context (and, in
SPATIA, niche and tissue embeddings), so a test cell whose neighbour was trained on is not
unseen. `spatial_block_split` assigns whole square blocks of tissue to train or test and then
drops a buffer band of train cells around the test blocks, so that no test cell has a train
cell closer than `buffer_um`.

Split labels are the strings ``"train"``, ``"test"`` and ``"buffer"`` (buffer cells are
excluded from supervised tasks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from spatia.errors import ConfigError, InputDataError
from spatia.keys import SPLIT_BUFFER_UM

TRAIN, TEST, BUFFER = "train", "test", "buffer"
SPLIT_VALUES = (TRAIN, TEST, BUFFER)


@dataclass(frozen=True)
class SplitSummary:
    """Sizes and guarantees of a split (JSON-able through `dataclasses.asdict`)."""

    source: str  # "column:<name>" or "spatial_blocks"
    n_train: int
    n_test: int
    n_buffer: int
    n_blocks: int | None
    n_test_blocks: int | None
    block_um: float | None
    buffer_um: float | None
    min_train_test_distance_um: float | None


def _block_rank(seed: int, slide: str, bx: int, by: int) -> int:
    """A seeded hash of one block: stable whatever other blocks exist."""
    key = f"{seed}|{slide}|{bx}|{by}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def spatial_block_split(
    spatial_um: np.ndarray,
    *,
    block_um: float = 200.0,
    buffer_um: float = SPLIT_BUFFER_UM,
    test_fraction: float = 0.3,
    seed: int = 0,
    slide: np.ndarray | None = None,
) -> np.ndarray:
    """Assign cells to train/test by square spatial blocks, with a buffer band dropped.

    Args:
        spatial_um: (N, 2) float cell centroids in micrometres (x, y).
        block_um: side of the square blocks, um. Blocks are anchored at each slide's minimum
            x and y.
        buffer_um: train cells closer than this (Euclidean, um) to any test cell of the same
            slide become ``"buffer"``; 0 disables the buffer.
        test_fraction: fraction of each slide's occupied blocks that go to test (rounded,
            at least one test and one train block when the slide has two or more blocks).
        seed: the blocks of a slide are ordered by a seeded hash of (seed, slide, block) and
            the first ones taken for test.
        slide: optional (N,) slide / section identifiers; blocks never span slides.

    Returns:
        (N,) object array of ``"train"``, ``"test"`` or ``"buffer"``.
    """
    xy = np.asarray(spatial_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputDataError(f"spatial coordinates must have shape (N, 2); got {xy.shape}",
                             fix='store cell centroids in micrometres in adata.obsm["spatial"]')
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        raise InputDataError("spatial coordinates contain NaN or infinite values",
                             fix='remove cells without a centroid, or give a --split column')
    if block_um <= 0 or buffer_um < 0 or not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"invalid split settings block_um={block_um}, buffer_um={buffer_um}, test_fraction={test_fraction}",
            fix="use block_um > 0, buffer_um >= 0 and 0 < test_fraction < 1",
        )
    n = xy.shape[0]
    slides = np.zeros(n, dtype=object) if slide is None else np.asarray(slide).astype(str).astype(object)
    out = np.full(n, TRAIN, dtype=object)
    for name in pd.unique(slides):
        idx = np.flatnonzero(slides == name)
        pts = xy[idx]
        block = np.floor((pts - pts.min(axis=0)) / block_um).astype(np.int64)
        keys, inverse = np.unique(block, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        n_blocks = keys.shape[0]
        if n_blocks < 2:
            continue  # one block: everything stays train; the caller sees n_test == 0
        n_test_blocks = int(np.clip(round(test_fraction * n_blocks), 1, n_blocks - 1))
        ranks = np.array([_block_rank(seed, str(name), int(bx), int(by)) for bx, by in keys], dtype=np.uint64)
        test_blocks = np.zeros(n_blocks, dtype=bool)
        test_blocks[np.argsort(ranks, kind="stable")[:n_test_blocks]] = True
        is_test = test_blocks[inverse]
        local = np.where(is_test, TEST, TRAIN).astype(object)
        if buffer_um > 0 and is_test.any():
            dist, _ = cKDTree(pts[is_test]).query(pts[~is_test], k=1)
            train_idx = np.flatnonzero(~is_test)
            local[train_idx[dist < buffer_um]] = BUFFER
        out[idx] = local
    return out


def split_from_column(values: pd.Series | np.ndarray, *, column: str) -> np.ndarray:
    """Normalise a user's split column to ``"train"``/``"test"``/``"buffer"``.

    Accepted values (case-insensitive): train, test, buffer; also ``val``/``validation``
    (treated as buffer: not used) and missing values (buffer).
    """
    series = pd.Series(np.asarray(values, dtype=object))
    lowered = series.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip().lower())
    mapping = {"train": TRAIN, "training": TRAIN, "test": TEST, "testing": TEST,
               "buffer": BUFFER, "val": BUFFER, "valid": BUFFER, "validation": BUFFER, "none": BUFFER}
    unknown = sorted({v for v in lowered.dropna().unique() if v not in mapping})
    if unknown:
        raise InputDataError(
            f"split column {column!r} holds values {unknown[:5]} that are not train/test/buffer",
            fix=f"write 'train', 'test' or 'buffer' in obs[{column!r}], or omit --split to make a spatial block split",
        )
    result = lowered.map(lambda v: BUFFER if v is None else mapping[v]).to_numpy(dtype=object)
    if not (result == TRAIN).any() or not (result == TEST).any():
        raise InputDataError(
            f"split column {column!r} needs both train and test cells "
            f"(has {int((result == TRAIN).sum())} train, {int((result == TEST).sum())} test)",
            fix="label some cells 'train' and some 'test', or omit --split",
        )
    return result


def min_train_test_distance(spatial_um: np.ndarray, split: np.ndarray, slide: np.ndarray | None = None) -> float:
    """Smallest distance (um) between a train and a test cell of the same slide (inf if none)."""
    xy = np.asarray(spatial_um, dtype=np.float64)[:, :2]
    split = np.asarray(split)
    slides = np.zeros(len(split), dtype=object) if slide is None else np.asarray(slide).astype(str)
    best = np.inf
    for name in pd.unique(slides):
        on = slides == name
        train, test = xy[on & (split == TRAIN)], xy[on & (split == TEST)]
        if len(train) and len(test):
            best = min(best, float(cKDTree(test).query(train, k=1)[0].min()))
    return best


def summarise_split(split: np.ndarray, *, source: str, spatial_um: np.ndarray | None = None,
                    slide: np.ndarray | None = None, block_um: float | None = None,
                    buffer_um: float | None = None) -> SplitSummary:
    """Counts, block numbers and the measured train-test gap of a split."""
    split = np.asarray(split)
    n_blocks = n_test_blocks = None
    if source == "spatial_blocks" and spatial_um is not None and block_um is not None:
        xy = np.asarray(spatial_um, dtype=np.float64)[:, :2]
        slides = np.zeros(len(split), dtype=object) if slide is None else np.asarray(slide).astype(str)
        n_blocks = n_test_blocks = 0
        for name in pd.unique(slides):
            on = slides == name
            pts = xy[on]
            block = np.floor((pts - pts.min(axis=0)) / block_um).astype(np.int64)
            keys, inverse = np.unique(block, axis=0, return_inverse=True)
            n_blocks += keys.shape[0]
            n_test_blocks += np.unique(inverse.ravel()[split[on] == TEST]).size
    gap = min_train_test_distance(spatial_um, split, slide) if spatial_um is not None else None
    return SplitSummary(
        source=source,
        n_train=int((split == TRAIN).sum()),
        n_test=int((split == TEST).sum()),
        n_buffer=int((split == BUFFER).sum()),
        n_blocks=n_blocks,
        n_test_blocks=n_test_blocks,
        block_um=block_um,
        buffer_um=buffer_um,
        min_train_test_distance_um=None if gap is None or not np.isfinite(gap) else gap,
    )
