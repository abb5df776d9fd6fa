"""Spatially disjoint train / val / test splits.

Blocks mode: each slide's tissue-region grid is cut into square blocks of
`split_block_tissues` regions; every block holding kept cells goes wholly to one split (a
seeded permutation, with the configured fractions of blocks). A tissue region, its niches and
its cells therefore always share a split, and no niche or tissue image crosses a split border.
Train cells closer than `split_buffer_um` to a val/test block are relabelled `buffer`: they stay
in the dataset (and in their niche and tissue sums) but training samplers never draw them.

Slides mode: whole slides go to one split (fixed ones from `slide_splits`, the rest by a seeded
permutation with the configured fractions).
"""

from __future__ import annotations

import zlib

import numpy as np

from spatia.keys import SPLIT_CODES, TEST, TRAIN, VAL

NO_BLOCK = -1
"""Code of a block grid cell where no kept cell falls (split codes are `spatia.keys.SPLIT_CODES`)."""


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many of `n` units go to train / val / test.

    Val and test get `round(fraction * n)`, at least one each when their fraction is positive
    and `n >= 3`; train keeps the rest and always at least one unit.
    """
    if n <= 0:
        return 0, 0, 0
    _, f_val, f_test = fractions
    n_val, n_test = int(round(f_val * n)), int(round(f_test * n))
    if n >= 3:
        n_val = max(n_val, 1 if f_val > 0 else 0)
        n_test = max(n_test, 1 if f_test > 0 else 0)
    while n_val + n_test > n - 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        elif n_test > 0:
            n_test -= 1
        else:
            break
    return n - n_val - n_test, n_val, n_test


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """A generator that depends on the seed and the slide ID (not on the slide's position)."""
    return np.random.default_rng([int(seed), zlib.crc32(slide_id.encode())])


def assign_units(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Split codes for `n` units: int8 (n,), a random permutation of the `split_sizes` counts."""
    n_train, n_val, n_test = split_sizes(n, fractions)
    codes = np.empty(n, dtype=np.int8)
    order = rng.permutation(n)
    codes[order[:n_test]] = SPLIT_CODES[TEST]
    codes[order[n_test : n_test + n_val]] = SPLIT_CODES[VAL]
    codes[order[n_test + n_val :]] = SPLIT_CODES[TRAIN]
    return codes


def block_split_grid(
    block_rc: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Split code of every block of a slide's block grid: int8 (n_rows, n_cols), `NO_BLOCK`
    where no kept cell falls. `block_rc` int (m, 2) lists the occupied blocks (any order,
    duplicates allowed)."""
    unique = np.unique(np.asarray(block_rc, dtype=np.int64).reshape(-1, 2), axis=0)
    if len(unique) == 0:
        return np.full((0, 0), NO_BLOCK, dtype=np.int8)
    grid = np.full((unique[:, 0].max() + 1, unique[:, 1].max() + 1), NO_BLOCK, dtype=np.int8)
    grid[unique[:, 0], unique[:, 1]] = assign_units(len(unique), fractions, rng)
    return grid


def buffer_cells(
    x_px: np.ndarray, y_px: np.ndarray, block_rc: np.ndarray, grid: np.ndarray, block_px: float, buffer_px: float
) -> np.ndarray:
    """bool (n,): train cells within `buffer_px` of an occupied val/test block (8-neighbours).

    Distances are from the cell centroid to the nearest point of the neighbouring block's
    square; blocks are `block_px` wide and aligned to the slide origin.
    """
    n = len(x_px)
    out = np.zeros(n, dtype=bool)
    if n == 0 or buffer_px <= 0 or grid.size == 0:
        return out
    br, bc = block_rc[:, 0].astype(np.int64), block_rc[:, 1].astype(np.int64)
    is_train = grid[br, bc] == SPLIT_CODES[TRAIN]
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            nr, nc = br + dr, bc + dc
            valid = (nr >= 0) & (nc >= 0) & (nr < grid.shape[0]) & (nc < grid.shape[1])
            code = np.full(n, NO_BLOCK, dtype=np.int8)
            code[valid] = grid[nr[valid], nc[valid]]
            held_out = (code == SPLIT_CODES[VAL]) | (code == SPLIT_CODES[TEST])
            x0, y0 = nc * block_px, nr * block_px
            dx = np.maximum(np.maximum(x0 - x_px, x_px - (x0 + block_px)), 0.0)
            dy = np.maximum(np.maximum(y0 - y_px, y_px - (y0 + block_px)), 0.0)
            out |= is_train & held_out & (np.hypot(dx, dy) < buffer_px)
    return out
