"""Crops for the morphology baselines: per cell (from a MIST dataset or a ``.npz`` file) and per niche.

A `CellCrops` holds uint8 images (N, S, S) or (N, C, S, S), bool masks (N, S, S) and the
cell IDs; `align_crops` reorders them to the rows of the AnnData being evaluated. A
`NicheCrops` holds the niche tiles of a MIST dataset for the patch-level task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spatia.errors import DatasetError, InputDataError


@dataclass
class CellCrops:
    """Per-cell crops for morphology features.

    Attributes:
        images: uint8 (N, S, S) or (N, C, S, S).
        masks: bool (N, S, S), the cell's polygon.
        cell_ids: (N,) cell IDs; None means the rows already match the AnnData's rows.
        channel_names: optional names of the C channels.
    """

    images: np.ndarray
    masks: np.ndarray
    cell_ids: np.ndarray | None = None
    channel_names: Sequence[str] | None = field(default=None)


def load_crops_npz(path: str | Path) -> CellCrops:
    """Read crops from a ``.npz`` with arrays ``images``, ``masks``, ``cell_id`` (and optional
    ``channel_names``)."""
    path = Path(path)
    if not path.exists():
        raise InputDataError("the crops file does not exist", path=path,
                             fix="give the path of a .npz with images, masks and cell_id")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("images", "masks", "cell_id") if k not in data]
        if missing:
            raise InputDataError(f"the crops file lacks array(s) {missing}", path=path,
                                 fix="save it with np.savez(path, images=..., masks=..., cell_id=...)")
        channels = [str(c) for c in data["channel_names"]] if "channel_names" in data else None
        return CellCrops(data["images"], data["masks"].astype(bool), data["cell_id"].astype(str), channels)


def crops_from_mist(dataset_dir: str | Path, cell_ids: Sequence[str] | None = None) -> CellCrops:
    """Cell crops of a MIST dataset (its cell level), as uint8 images and polygon masks.

    Args:
        dataset_dir: a directory written by `spatia build`.
        cell_ids: only these cells (in any order; IDs absent from the dataset are skipped, and
            `align_crops` reports them); None reads every cell.

    Returns:
        `CellCrops` with images uint8 (N, Sc, Sc) (the stored crop, zero outside the polygon),
        masks bool (N, Sc, Sc) and the cell IDs.
    """
    from spatia.mist import CellDataset

    dataset = CellDataset(dataset_dir)
    index = dataset.index
    if index["cell_id"].duplicated().any():
        raise DatasetError("cell IDs repeat across the slides of this MIST dataset, so crops cannot be matched "
                           "to AnnData rows by cell ID", path=dataset_dir,
                           fix="evaluate one slide at a time, or pass crops with unique IDs (--crops)")
    if cell_ids is None:
        rows = np.arange(len(index))
    else:
        positions = pd.Index(index["cell_id"].astype(str)).get_indexer(np.asarray(cell_ids).astype(str))
        rows = positions[positions >= 0]
    images, masks, ids = [], [], []
    for i in rows:
        item = dataset[int(i)]
        images.append(np.rint(item["cell_image"][0].numpy() * 255.0).astype(np.uint8))
        masks.append(item["cell_mask"][0].numpy().astype(bool))
        ids.append(item["cell_id"])
    if not images:
        raise DatasetError("none of the evaluated cells is in this MIST dataset", path=dataset_dir,
                           fix="give the dataset built from the same Xenium bundle as the AnnData")
    return CellCrops(np.stack(images), np.stack(masks), np.asarray(ids, dtype=str))


def align_crops(crops: CellCrops, obs_names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks in the order of `obs_names`; every cell must have a crop."""
    images, masks = np.asarray(crops.images), np.asarray(crops.masks, dtype=bool)
    if crops.cell_ids is None:
        if images.shape[0] != len(obs_names):
            raise InputDataError(f"{images.shape[0]} crops for {len(obs_names)} cells and no cell IDs to match them",
                                 fix="give crops with cell_id, or one crop per AnnData row in order")
        return images, masks
    index = pd.Index(np.asarray(crops.cell_ids).astype(str))
    rows = index.get_indexer(obs_names)
    missing = int((rows < 0).sum())
    if missing:
        raise InputDataError(
            f"{missing} of {len(obs_names)} cells have no crop (e.g. {obs_names[rows < 0][:3].tolist()})",
            fix="build crops for every evaluated cell, or subset the AnnData to the cells with crops",
        )
    return images[rows], masks[rows]


@dataclass
class NicheCrops:
    """Niche images for the patch-level task: uint8 (M, S, S) and the niche IDs (M,)."""

    images: np.ndarray
    niche_ids: np.ndarray


def niche_crops_from_mist(dataset_dir: str | Path, niche_ids: Sequence[str] | None = None) -> NicheCrops:
    """Niche tiles of a MIST dataset (its niche level) as uint8 images with their niche IDs.

    Args:
        dataset_dir: a directory written by `spatia build`.
        niche_ids: only these niches (IDs absent from the dataset are skipped); None reads all.
    """
    from spatia.mist import NicheDataset

    dataset = NicheDataset(dataset_dir)
    index = dataset.index
    if niche_ids is None:
        rows = np.arange(len(index))
    else:
        positions = pd.Index(index["niche_id"].astype(str)).get_indexer(np.asarray(niche_ids).astype(str))
        rows = positions[positions >= 0]
    images, ids = [], []
    for i in rows:
        item = dataset[int(i)]
        images.append(np.rint(item["niche_image"][0].numpy() * 255.0).astype(np.uint8))
        ids.append(item["niche_id"])
    if not images:
        raise DatasetError("none of the requested niches is in this MIST dataset", path=dataset_dir,
                           fix="give the dataset the cells were embedded from")
    return NicheCrops(np.stack(images), np.asarray(ids, dtype=str))
