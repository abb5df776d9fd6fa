"""Inputs of the flow stage: pairs (`spatia pair`), embeddings (`spatia embed`), crops (MIST).

`load_flow_data` joins them into one `FlowData`: per involved cell its crop, mask, frozen
SPATIA embeddings and MIST split; per pair its control and target rows, transition, niche,
slide, match score and whether it is held out; per transition its signature coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spatia.errors import InputDataError
from spatia.keys import EMBEDDED_FLAG, EMBEDDING_KEYS_OF_MODALITY, X_SPATIA

log = logging.getLogger(__name__)

HELDOUT_SPLITS = ("val", "test")


@dataclass
class FlowData:
    """Cells and pairs of the flow stage.

    cell_ids: (N,) names of the involved cells (embedding obs names).
    images: uint8 (N, S, S) crops, zero outside the cell polygon; masks: bool (N, S, S).
    embeddings: obsm key -> float32 (N, D) frozen SPATIA embeddings.
    cell_split: (N,) MIST split of each cell; cell_label: (N,) state label (or "").
    pairs: one row per pair: pair_id (row of pairs.parquet), ctrl_row, tgt_row (rows of the
      cell arrays), transition (index into `transitions`), transition_tag, niche, slide_id,
      match_score, heldout (bool).
    transitions: names; signature_coords: float32 (T, k) signature PCA coordinates.
    """

    cell_ids: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    embeddings: dict[str, np.ndarray]
    cell_split: np.ndarray
    pairs: pd.DataFrame
    transitions: list[str]
    signature_coords: np.ndarray

    @property
    def image_size_px(self) -> int:
        return int(self.images.shape[-1])


def signature_coordinates(delta: np.ndarray, n_components: int) -> np.ndarray:
    """Coordinates of each transition's Delta g on the top principal axes of the signatures.

    The signatures are few (one per transition), so the axes are the right singular vectors of
    the uncentred (T, G) matrix (centring T = 1 or 2 signatures would leave nothing); the
    coordinates are scaled to unit root-mean-square. Returns float32 (T, min(k, T)).
    """
    delta = np.nan_to_num(np.asarray(delta, dtype=np.float64))
    k = max(1, min(int(n_components), delta.shape[0]))
    _, _, vt = np.linalg.svd(delta, full_matrices=False)
    coords = delta @ vt[:k].T
    rms = float(np.sqrt(np.mean(coords**2))) or 1.0
    return (coords / rms).astype(np.float32)


def _check_file(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise InputDataError(f"the {what} does not exist", path=path, fix=fix)
    return path


def load_flow_data(dataset: str | Path, pairs_dir: str | Path, embeddings: str | Path, *, signature_pcs: int,
                   holdout: str = "split", holdout_fraction: float = 0.2, seed: int = 0) -> FlowData:
    """Read pairs, signatures, embeddings and crops; mark held-out pairs.

    holdout "split": a pair is held out when its control cell is in the MIST val or test split
    (falls back to "random" with a warning when that leaves no training or no held-out pair);
    "random": a seeded `holdout_fraction` of each transition's pairs.
    """
    import anndata as ad

    from spatia.mist import CellDataset
    from spatia.perturb import Signatures

    pairs_dir, embeddings, dataset = Path(pairs_dir), Path(embeddings), Path(dataset)
    pairs_path = _check_file(pairs_dir / "pairs.parquet", "pairs table", "give the folder written by `spatia pair`")
    sig_path = _check_file(pairs_dir / "signatures.npz", "signatures file", "give the folder written by `spatia pair`")
    _check_file(embeddings, "embeddings file", "give the .h5ad written by `spatia embed`")
    pairs = pd.read_parquet(pairs_path)
    if pairs.empty:
        raise InputDataError("the pairs table is empty", path=pairs_path, fix="rerun `spatia pair` with transitions that match the data")
    signatures = Signatures.read_npz(sig_path)

    adata = ad.read_h5ad(embeddings, backed="r")
    names = pd.Index(np.asarray(adata.obs_names).astype(str))
    # cells the MIST build skipped are rows of the file with NaN embeddings and no crop: unusable
    embedded = (adata.obs[EMBEDDED_FLAG].to_numpy(dtype=bool, na_value=False) if EMBEDDED_FLAG in adata.obs
                else np.ones(len(names), dtype=bool))
    ctrl = names.get_indexer(pairs["x_ctrl_id"].astype(str))
    tgt = names.get_indexer(pairs["x_tgt_id"].astype(str))
    found = (ctrl >= 0) & (tgt >= 0)
    found[found] = embedded[ctrl[found]] & embedded[tgt[found]]
    if found.mean() < 0.5:
        raise InputDataError(f"only {int(found.sum())} of {len(pairs)} pairs have both cells embedded in the embeddings",
                             path=embeddings, fix="embed the same cells (the MIST dataset of the bundle that was paired)")
    if not found.all():
        log.warning("%d of %d pairs have a cell missing from the embeddings or skipped by the MIST build; left out",
                    int((~found).sum()), len(pairs))
    pairs = pairs.assign(pair_id=np.arange(len(pairs)))[found].reset_index(drop=True)
    ctrl, tgt = ctrl[found], tgt[found]
    used = np.unique(np.concatenate([ctrl, tgt]))
    local = np.full(len(names), -1, dtype=np.int64)
    local[used] = np.arange(len(used))
    keys = [k for k in EMBEDDING_KEYS_OF_MODALITY["both"].values() if k in adata.obsm]
    if X_SPATIA not in keys:
        raise InputDataError("the embeddings lack obsm['X_spatia']", path=embeddings,
                             fix="use the .h5ad written by `spatia embed` (modality both)")
    emb = {k: np.asarray(adata.obsm[k][used], dtype=np.float32) for k in keys}
    obs = adata.obs.iloc[used]
    cell_ids = names[used].to_numpy()

    cells = CellDataset(dataset)
    index = cells.index
    mist_names = index["cell_id"].astype(str)
    if mist_names.duplicated().any():
        mist_names = index["slide_id"].astype(str) + "/" + mist_names
    rows = pd.Index(mist_names).get_indexer(cell_ids)
    if (rows < 0).any():
        raise InputDataError(f"{int((rows < 0).sum())} paired cells are not in the MIST dataset", path=dataset,
                             fix="give the MIST dataset the embeddings were computed from")
    images, masks = [], []
    for r in rows:
        item = cells[int(r)]
        images.append(np.rint(item["cell_image"][0].numpy() * 255.0).astype(np.uint8))
        masks.append(item["cell_mask"][0].numpy().astype(bool))
    split = index["split"].astype(str).to_numpy()[rows]

    niche_col = "niche_ctrl" if "niche_ctrl" in pairs and pairs["niche_ctrl"].notna().all() else None
    niche = pairs[niche_col].astype(str) if niche_col else pd.Series(obs["niche_id"].astype(str).to_numpy()[local[ctrl]])
    transitions = list(signatures.transitions)
    t_index = pd.Index(transitions).get_indexer(pairs["transition_tag"].astype(str))
    if (t_index < 0).any():
        raise InputDataError("pairs name transitions that the signatures lack", path=sig_path,
                             fix="use pairs.parquet and signatures.npz from the same `spatia pair` run")
    table = pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(),
        "ctrl_row": local[ctrl], "tgt_row": local[tgt],
        "transition": t_index, "transition_tag": pairs["transition_tag"].astype(str).to_numpy(),
        "niche": niche.to_numpy(), "slide_id": pairs["slide_id"].astype(str).to_numpy(),
        "match_score": pairs["match_score"].astype(float).to_numpy(),
        "x_ctrl_id": pairs["x_ctrl_id"].astype(str).to_numpy(), "x_tgt_id": pairs["x_tgt_id"].astype(str).to_numpy(),
    })
    table["heldout"] = _holdout(table, split, holdout, holdout_fraction, seed)
    return FlowData(cell_ids, np.stack(images), np.stack(masks), emb, split, table, transitions,
                    signature_coordinates(signatures.delta, signature_pcs))


def training_crops(dataset: str | Path, exclude: np.ndarray, max_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops and masks of up to `max_cells` cells (seeded) of the MIST train and buffer splits,
    leaving out the cell names in `exclude` (e.g. every cell of a held-out pair)."""
    from spatia.mist import CellDataset

    cells = CellDataset(dataset, split=["train", "buffer"])
    names = cells.index["cell_id"].astype(str)
    if names.duplicated().any():
        names = cells.index["slide_id"].astype(str) + "/" + names
    rows = np.flatnonzero(~np.isin(names.to_numpy(), np.asarray(exclude).astype(str)))
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    images, masks = [], []
    for r in rows:
        item = cells[int(r)]
        images.append(np.rint(item["cell_image"][0].numpy() * 255.0).astype(np.uint8))
        masks.append(item["cell_mask"][0].numpy().astype(bool))
    if not images:
        raise InputDataError("no training cells left for the autoencoder", path=dataset,
                             fix="use autoencoder.cells = 'pairs', or a dataset with a train split")
    return np.stack(images), np.stack(masks)


def _holdout(table: pd.DataFrame, split: np.ndarray, mode: str, fraction: float, seed: int) -> np.ndarray:
    if mode == "split":
        held = np.isin(split[table["ctrl_row"].to_numpy()], HELDOUT_SPLITS)
        if held.any() and not held.all():
            return held
        log.warning("the MIST split leaves %s held-out pairs; holding out a random %.0f%% instead",
                    "no" if not held.any() else "only", 100 * fraction)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(table), dtype=bool)
    for _, rows in table.groupby("transition").indices.items():
        n = max(1, int(round(fraction * len(rows)))) if len(rows) > 1 else 0
        held[rng.choice(rows, size=n, replace=False)] = True
    return held


def swap_targets(tgt_rows: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair noise (Table 5): round(fraction * n) pairs, drawn at random, hand their targets on in
    a random cycle within their group (a slide, or a slide and transition). Returns the new target
    rows and a bool flag of the pairs whose target changed."""
    original = np.asarray(tgt_rows)
    tgt_rows = original.copy()
    swapped = np.zeros(len(tgt_rows), dtype=bool)
    if fraction <= 0:
        return tgt_rows, swapped
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(tgt_rows), size=int(round(fraction * len(tgt_rows))), replace=False)
    for g in np.unique(groups[chosen]):
        members = rng.permutation(chosen[groups[chosen] == g])
        if len(members) < 2:
            continue
        tgt_rows[members] = tgt_rows[np.roll(members, 1)]
        swapped[members] = True
    swapped &= tgt_rows != original  # two pairs may share a target: handing it on changes nothing
    return tgt_rows, swapped
