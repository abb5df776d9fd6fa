"""PyTorch datasets over a MIST dataset directory.

Single-level datasets (`CellDataset`, `NicheDataset`, `TissueDataset`) return one dict per
record; `MultiScaleDataset` with `LocalizedBatchSampler` and `collate_multiscale` returns the
multi-scale batches SPATIA trains on. Shapes and dtypes (G = vocabulary size, S* = stored image
sizes from the build config, B / Bn / Bt = cells / niches / tissue regions in a batch):

Cell item:    cell_image float32 (1, Sc, Sc) in [0, 1], zero outside the polygon;
              cell_mask bool (1, Sc, Sc); cell_counts float32 (G,) raw counts in vocabulary
              order; cell_gene_measured bool (G,); cell_id, slide_id, niche_id, tissue_id str.
Niche item:   niche_image float32 (1, Sn, Sn); niche_counts float32 (G,) (sum over member
              cells); niche_gene_measured bool (G,); niche_grid_rc int64 (2,) row/col inside
              its tissue's grid; niche_id, slide_id, tissue_id str.
Tissue item:  tissue_image float32 (1, St, St); tissue_counts float32 (G,); tissue_gene_measured
              bool (G,); tissue_niche_ids: the niche IDs in grid order ("" for empty slots) --
              only on `TissueDataset` items; tissue_id, slide_id str.
Batch (collate_multiscale): the per-level tensors stacked, plus cell_niche_index int64 (B,),
              niche_tissue_index int64 (Bn,), niche_grid_rc int64 (Bn, 2), tissue_niche_index
              int64 (Bt, grid*grid) (rows of the niche tensors in row-major grid order, -1 for
              empty slots), and cell_id / niche_id / tissue_id / slide_id lists of str.

Images are stored as uint8 and divided by 255 here. LMDB environments are opened lazily in the
process that reads (one per DataLoader worker), so the datasets are safe with `num_workers > 0`
under fork, forkserver or spawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from spatia.errors import ConfigError, DatasetError
from spatia.keys import LEVELS, SPLIT_NAMES
from spatia.mist.store import RecordReader, gene_mask_from_manifest, index_path, read_manifest, store_path


def _select_split(index: pd.DataFrame, split: str | Sequence[str] | None, where: Path) -> pd.DataFrame:
    if split is None:
        return index.reset_index(drop=True)
    wanted = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in wanted if s not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(f"unknown split(s) {unknown}", path=where, fix=f"use one or more of {list(SPLIT_NAMES)}, or None for all")
    return index[index["split"].isin(wanted)].reset_index(drop=True)


class _LevelAccess:
    """Manifest, gene masks and the record reader of one level of a dataset."""

    def __init__(self, root: str | Path, level: str):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.genes: list[str] = list(self.manifest["genes"])
        self.gene_masks = torch.from_numpy(gene_mask_from_manifest(self.manifest))  # (n_slides, G)
        self.level = level
        self.reader = RecordReader(store_path(self.root, level))

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def load(self, key: str, slide_index: int) -> dict[str, Any]:
        """Decode one record into tensors (image scaled to [0, 1], dense float32 counts)."""
        record = self.reader.get(key)
        image = torch.from_numpy(record.image.astype(np.float32) / np.float32(255.0)).unsqueeze(0)
        counts = torch.from_numpy(record.dense_counts(self.n_genes, np.float32))
        out = {"image": image, "counts": counts, "gene_measured": self.gene_masks[slide_index].clone(), "meta": record.meta}
        if record.mask is not None:
            out["mask"] = torch.from_numpy(record.mask.copy()).unsqueeze(0)
        return out


class _LevelDataset(Dataset):
    """Records of one level (optionally of some splits). Item i is row i of `index`."""

    level: str

    def __init__(self, root: str | Path, split: str | Sequence[str] | None = None):
        self._access = _LevelAccess(root, self.level)
        self.root = self._access.root
        self.manifest = self._access.manifest
        self.genes = self._access.genes
        self.index = _select_split(pd.read_parquet(index_path(self.root, self.level)), split, self.root)

    def __len__(self) -> int:
        return len(self.index)

    def _row_and_record(self, i: int) -> tuple[pd.Series, dict[str, Any]]:
        row = self.index.iloc[int(i)]
        return row, self._access.load(row["key"], int(row["slide_index"]))


class CellDataset(_LevelDataset):
    """Cell records (optionally of some splits). Item i is row i of `index`."""

    level = "cell"

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, data = self._row_and_record(i)
        return {
            "cell_image": data["image"],
            "cell_mask": data["mask"],
            "cell_counts": data["counts"],
            "cell_gene_measured": data["gene_measured"],
            "cell_id": str(row["cell_id"]),
            "slide_id": str(row["slide_id"]),
            "niche_id": str(row["niche_id"]),
            "tissue_id": str(row["tissue_id"]),
        }


class NicheDataset(_LevelDataset):
    """Niche records (non-empty 256 px tiles). Item i is row i of `index`."""

    level = "niche"

    def member_cell_ids(self, i: int) -> list[str]:
        """Cell IDs of niche i (its record's metadata)."""
        row = self.index.iloc[int(i)]
        return list(self._access.reader.get(row["key"]).meta["cell_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, data = self._row_and_record(i)
        return {
            "niche_image": data["image"],
            "niche_counts": data["counts"],
            "niche_gene_measured": data["gene_measured"],
            "niche_grid_rc": torch.tensor([int(row["grid_row"]), int(row["grid_col"])], dtype=torch.int64),
            "niche_id": str(row["niche_id"]),
            "slide_id": str(row["slide_id"]),
            "tissue_id": str(row["tissue_id"]),
        }


class TissueDataset(_LevelDataset):
    """Tissue-region records. Item i is row i of `index`."""

    level = "tissue"

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, data = self._row_and_record(i)
        return {
            "tissue_image": data["image"],
            "tissue_counts": data["counts"],
            "tissue_gene_measured": data["gene_measured"],
            "tissue_niche_ids": list(data["meta"]["niche_ids"]),
            "tissue_id": str(row["tissue_id"]),
            "slide_id": str(row["slide_id"]),
        }


# ---------------------------------------------------------------------------------------------
# Multi-scale
# ---------------------------------------------------------------------------------------------


class MultiScaleKey(NamedTuple):
    """An index into `MultiScaleDataset`: a level ("cell", "niche", "tissue") and a row of that
    level's full index table."""

    level: str
    row: int


class MultiScaleDataset(Dataset):
    """All three levels of a dataset, addressed by `MultiScaleKey`, for localised batches.

    `split` selects the cells a sampler may draw (`"train"` leaves out `buffer` cells, see
    docs/mist.md); niches and tissue regions are always reachable, since a drawn cell needs its
    own. Use with `LocalizedBatchSampler` and `collate_multiscale`, or `loader(...)`.

    Attributes:
        cell_index, niche_index, tissue_index: the full index tables (row = key row).
        eligible_cells: int64 rows of `cell_index` in `split`.
        cell_niche_row: int64 (n_cells,) row of each cell's niche in `niche_index`.
        niche_tissue_row: int64 (n_niches,) row of each niche's tissue in `tissue_index`.
        tissue_niche_rows: int64 (n_tissues, grid*grid) niche rows in grid order, -1 if empty.
        tissue_cell_rows: per tissue row, the eligible cell rows inside it (int64 arrays).
    """

    def __init__(self, root: str | Path, split: str | Sequence[str] | None = "train"):
        self.root = Path(root)
        self._access = {level: _LevelAccess(self.root, level) for level in LEVELS}
        self.manifest = self._access["cell"].manifest
        self.genes = self._access["cell"].genes
        self.grid = int(self.manifest["levels"]["tissue"]["grid"])
        self.cell_index = pd.read_parquet(index_path(self.root, "cell"))
        self.niche_index = pd.read_parquet(index_path(self.root, "niche"))
        self.tissue_index = pd.read_parquet(index_path(self.root, "tissue"))
        self.split = split
        selected = _select_split(self.cell_index.assign(_row=np.arange(len(self.cell_index))), split, self.root)
        self.eligible_cells = selected["_row"].to_numpy(dtype=np.int64)

        niche_rows = pd.Series(np.arange(len(self.niche_index)), index=self.niche_index["niche_id"].to_numpy())
        tissue_rows = pd.Series(np.arange(len(self.tissue_index)), index=self.tissue_index["tissue_id"].to_numpy())
        self.cell_niche_row = _lookup(niche_rows, self.cell_index["niche_id"], "niche", self.root)
        self.niche_tissue_row = _lookup(tissue_rows, self.niche_index["tissue_id"], "tissue", self.root)
        slots = self.niche_index["grid_row"].to_numpy(np.int64) * self.grid + self.niche_index["grid_col"].to_numpy(np.int64)
        self.tissue_niche_rows = np.full((len(self.tissue_index), self.grid * self.grid), -1, dtype=np.int64)
        self.tissue_niche_rows[self.niche_tissue_row, slots] = np.arange(len(self.niche_index))
        cell_tissue = self.niche_tissue_row[self.cell_niche_row[self.eligible_cells]]
        order = np.argsort(cell_tissue, kind="stable")
        bounds = np.searchsorted(cell_tissue[order], np.arange(len(self.tissue_index) + 1))
        sorted_cells = self.eligible_cells[order]
        self.tissue_cell_rows = [sorted_cells[bounds[t] : bounds[t + 1]] for t in range(len(self.tissue_index))]

        self._cell_slide = self.cell_index["slide_index"].to_numpy(np.int64)
        self._niche_slide = self.niche_index["slide_index"].to_numpy(np.int64)
        self._tissue_slide = self.tissue_index["slide_index"].to_numpy(np.int64)
        self._niche_grid = np.stack(
            [self.niche_index["grid_row"].to_numpy(np.int64), self.niche_index["grid_col"].to_numpy(np.int64)], axis=1
        )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def __len__(self) -> int:
        """Number of cells a sampler may draw."""
        return len(self.eligible_cells)

    def __getitem__(self, key: MultiScaleKey | tuple[str, int]) -> dict[str, Any]:
        level, row = key
        row = int(row)
        if level == "cell":
            index = self.cell_index
            data = self._access["cell"].load(index["key"].iat[row], int(self._cell_slide[row]))
            return {
                "level": "cell",
                "row": row,
                "niche_row": int(self.cell_niche_row[row]),
                "cell_image": data["image"],
                "cell_mask": data["mask"],
                "cell_counts": data["counts"],
                "cell_gene_measured": data["gene_measured"],
                "cell_id": str(index["cell_id"].iat[row]),
                "slide_id": str(index["slide_id"].iat[row]),
            }
        if level == "niche":
            index = self.niche_index
            data = self._access["niche"].load(index["key"].iat[row], int(self._niche_slide[row]))
            return {
                "level": "niche",
                "row": row,
                "tissue_row": int(self.niche_tissue_row[row]),
                "niche_image": data["image"],
                "niche_counts": data["counts"],
                "niche_gene_measured": data["gene_measured"],
                "niche_grid_rc": torch.from_numpy(self._niche_grid[row].copy()),
                "niche_id": str(index["niche_id"].iat[row]),
            }
        if level == "tissue":
            index = self.tissue_index
            data = self._access["tissue"].load(index["key"].iat[row], int(self._tissue_slide[row]))
            return {
                "level": "tissue",
                "row": row,
                "niche_rows": self.tissue_niche_rows[row].copy(),
                "tissue_image": data["image"],
                "tissue_counts": data["counts"],
                "tissue_gene_measured": data["gene_measured"],
                "tissue_id": str(index["tissue_id"].iat[row]),
            }
        raise KeyError(f"unknown level {level!r}; expected one of {LEVELS}")

    def keys_for(self, tissue_rows: Iterable[int], cell_rows: Iterable[int]) -> list[MultiScaleKey]:
        """The keys of one localised batch: the tissues, every niche of them (grid order), and
        the cells. Each tissue and niche appears once."""
        tissue_rows = list(dict.fromkeys(int(t) for t in tissue_rows))
        keys = [MultiScaleKey("tissue", t) for t in tissue_rows]
        for t in tissue_rows:
            keys += [MultiScaleKey("niche", int(n)) for n in self.tissue_niche_rows[t] if n >= 0]
        keys += [MultiScaleKey("cell", int(c)) for c in cell_rows]
        return keys

    def loader(
        self,
        tissues_per_batch: int,
        cells_per_tissue: int,
        seed: int = 0,
        *,
        num_workers: int = 0,
        cover_all_cells: bool = False,
        **kwargs: Any,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader of localised multi-scale batches (see `LocalizedBatchSampler`)."""
        from spatia.mist.samplers import LocalizedBatchSampler

        sampler = LocalizedBatchSampler(self, tissues_per_batch, cells_per_tissue, seed, cover_all_cells=cover_all_cells)
        return torch.utils.data.DataLoader(
            self, batch_sampler=sampler, collate_fn=collate_multiscale, num_workers=num_workers, **kwargs
        )


def _lookup(rows: pd.Series, ids: pd.Series, what: str, root: Path) -> np.ndarray:
    found = rows.reindex(ids.to_numpy())
    if found.isna().any():
        missing = ids[found.isna().to_numpy()].iloc[0]
        raise DatasetError(
            f"the index refers to {what} {missing!r}, which is not in the {what} index",
            path=root,
            fix="the dataset is damaged: rebuild it with `spatia build`",
        )
    return found.to_numpy(dtype=np.int64)


def collate_multiscale(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble `MultiScaleDataset` items (any order) into one localised batch dict.

    Cells, niches and tissues keep the order of their first appearance; repeated niches or
    tissues are kept once. Every cell's niche and every niche's tissue must be in `items`
    (`LocalizedBatchSampler` guarantees it); tissue grid slots whose niche exists but is not in
    the batch raise, so tissue grids are always complete.
    """
    by_level: dict[str, dict[int, dict[str, Any]]] = {"cell": {}, "niche": {}, "tissue": {}}
    cell_items: list[dict[str, Any]] = []
    for item in items:
        level = item["level"]
        if level == "cell":
            cell_items.append(item)
        else:
            by_level[level].setdefault(item["row"], item)
    niches = list(by_level["niche"].values())
    tissues = list(by_level["tissue"].values())
    niche_pos = {item["row"]: i for i, item in enumerate(niches)}
    tissue_pos = {item["row"]: i for i, item in enumerate(tissues)}

    def position(table: dict[int, int], row: int, what: str) -> int:
        if row not in table:
            raise ValueError(f"the batch lacks the {what} (index row {row}) that one of its items belongs to")
        return table[row]

    grid_slots = len(tissues[0]["niche_rows"]) if tissues else 0
    tissue_niche_index = torch.full((len(tissues), grid_slots), -1, dtype=torch.int64)
    for i, item in enumerate(tissues):
        for slot, row in enumerate(item["niche_rows"]):
            if row >= 0:
                tissue_niche_index[i, slot] = position(niche_pos, int(row), "niche of a tissue grid slot")

    def stack(rows: list[dict[str, Any]], key: str) -> torch.Tensor:
        return torch.stack([r[key] for r in rows]) if rows else torch.zeros(0)

    return {
        "cell_image": stack(cell_items, "cell_image"),
        "cell_mask": stack(cell_items, "cell_mask"),
        "cell_counts": stack(cell_items, "cell_counts"),
        "cell_gene_measured": stack(cell_items, "cell_gene_measured"),
        "cell_niche_index": torch.tensor([position(niche_pos, c["niche_row"], "niche") for c in cell_items], dtype=torch.int64),
        "niche_image": stack(niches, "niche_image"),
        "niche_counts": stack(niches, "niche_counts"),
        "niche_gene_measured": stack(niches, "niche_gene_measured"),
        "niche_tissue_index": torch.tensor([position(tissue_pos, n["tissue_row"], "tissue") for n in niches], dtype=torch.int64),
        "niche_grid_rc": stack(niches, "niche_grid_rc").to(torch.int64).reshape(len(niches), 2),
        "tissue_image": stack(tissues, "tissue_image"),
        "tissue_counts": stack(tissues, "tissue_counts"),
        "tissue_gene_measured": stack(tissues, "tissue_gene_measured"),
        "tissue_niche_index": tissue_niche_index,
        "cell_id": [c["cell_id"] for c in cell_items],
        "slide_id": [c["slide_id"] for c in cell_items],
        "niche_id": [n["niche_id"] for n in niches],
        "tissue_id": [t["tissue_id"] for t in tissues],
    }
