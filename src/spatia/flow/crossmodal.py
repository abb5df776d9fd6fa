"""`flow_crossmodal`: cross-modal generation (paper Table 11): gene-only embedding -> cell image.

An MLP maps a cell's gene-only SPATIA embedding (`spatia embed --modality gene`, obsm
`X_spatia_gene`; the cells the MIST build skipped are left out) to its standardised latent under a trained flow's frozen autoencoder; the decoded
latent is the generated crop. Trained on the MIST train split, scored on val + test cells with
PSNR / SSIM against the real crop. Baseline: the mean train crop of the cell's label.

OUT_DIR: crossmodal.json, grid.png (real | generated | label-mean baseline), spatia_run.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spatia.errors import InputDataError
from spatia.flow.autoencoder import decode_all, encode_all
from spatia.flow.data import HELDOUT_SPLITS
from spatia.flow.generate import write_grid
from spatia.flow.quality import psnr, ssim
from spatia.flow.train import load_autoencoder
from spatia.keys import EMBEDDED_FLAG, UNS_KEY, X_SPATIA, X_SPATIA_GENE
from spatia.outputs import atomic_output, refuse_existing, write_run_record


@dataclass(frozen=True)
class CrossModalConfig:
    """Gene embedding -> latent regression."""

    label_key: str = "auto"      # obs column of the baseline's labels ("auto": truth_cell_type, else a clustering)
    hidden: int = 256
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    grid_rows: int = 12


@dataclass
class CrossModalResult:
    out_dir: Path
    scores: dict[str, Any]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), **self.scores, "seconds": round(self.seconds, 1)}


def _label_column(adata, key: str) -> str:
    """`key`, or for "auto" the simulator's truth_cell_type, else the bundle's first clustering
    (`uns["spatia"]["label_columns"]` of `spatia embed`; `label_*` in files of older versions)."""
    obs = adata.obs
    if key != "auto":
        if key not in obs:
            raise InputDataError(f"the embeddings have no obs column {key!r}", fix="pass an existing label column")
        return key
    clusterings = [str(c) for c in adata.uns.get(UNS_KEY, {}).get("label_columns", [])]
    for name in ["truth_cell_type", *clusterings, *[c for c in obs.columns if str(c).startswith("label_")]]:
        if name in obs:
            return name
    raise InputDataError("the embeddings have no label column for the baseline", fix="pass label_key")


def flow_crossmodal(dataset: str | Path, gene_embeddings: str | Path, flow_dir: str | Path, out_dir: str | Path,
                    config: CrossModalConfig = CrossModalConfig(), seed: int = 0) -> CrossModalResult:
    """Train the gene-embedding -> latent MLP and score the decoded crops (see the module doc)."""
    import anndata as ad

    from spatia.evaluate import align_crops, crops_from_mist

    started = time.perf_counter()
    refuse_existing(Path(out_dir))
    for path, what, fix in ((Path(gene_embeddings), "gene-only embeddings", "run `spatia embed --modality gene`"),
                            (Path(flow_dir) / "autoencoder.pt", "flow autoencoder", "run `spatia flow train` first"),
                            (Path(dataset), "MIST dataset", "run `spatia build` first")):
        if not path.exists():
            raise InputDataError(f"the {what} file or folder does not exist", path=path, fix=fix)
    torch.manual_seed(seed)
    adata = ad.read_h5ad(gene_embeddings)
    if X_SPATIA_GENE not in adata.obsm:
        older = X_SPATIA in adata.obsm and str(adata.uns.get(UNS_KEY, {}).get("modality", "")) == "gene"
        raise InputDataError(f"the embeddings lack obsm[{X_SPATIA_GENE!r}]"
                             + (" (an older `spatia embed --modality gene` kept it under 'X_spatia')" if older else ""),
                             path=gene_embeddings, fix=f"re-run `spatia embed --modality gene` to write {X_SPATIA_GENE}")
    if EMBEDDED_FLAG in adata.obs:  # cells the MIST build skipped: NaN embeddings, no crop
        adata = adata[adata.obs[EMBEDDED_FLAG].to_numpy(dtype=bool, na_value=False)].copy()
    names = np.asarray(adata.obs_names).astype(str)
    images, masks = align_crops(crops_from_mist(dataset, list(names)), names)
    split = adata.obs["split"].astype(str).to_numpy()
    train, test = split == "train", np.isin(split, HELDOUT_SPLITS)
    if train.sum() < 10 or test.sum() < 2:
        raise InputDataError(f"{int(train.sum())} train and {int(test.sum())} val/test cells", path=gene_embeddings,
                             fix="embed every split of the dataset")
    labels = adata.obs[_label_column(adata, config.label_key)].astype(str).to_numpy()
    ae, stats, _ = load_autoencoder(Path(flow_dir) / "autoencoder.pt")
    lat = stats.standardise(encode_all(ae, images, masks))
    z = torch.from_numpy(np.asarray(adata.obsm[X_SPATIA_GENE], dtype=np.float32))
    mu, sd = z[train].mean(0), z[train].std(0).clamp_min(1e-6)
    z = (z - mu) / sd
    shape = lat.shape[1:]
    mlp = nn.Sequential(nn.Linear(z.shape[1], config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden),
                        nn.SiLU(), nn.Linear(config.hidden, int(np.prod(shape))))
    opt = torch.optim.AdamW(mlp.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(np.flatnonzero(train))
    for _ in range(config.steps):
        idx = rows[torch.randint(0, len(rows), (min(config.batch_size, len(rows)),), generator=gen)]
        loss = (mlp(z[idx]).view(-1, *shape) - lat[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test_rows = np.flatnonzero(test)
    with torch.no_grad():
        pred = mlp(z[test_rows]).view(-1, *shape)
    generated, _ = decode_all(ae, stats.unstandardise(pred))
    real = images[test_rows]
    means = {lab: images[train & (labels == lab)].astype(np.float64).mean(0) for lab in np.unique(labels[train])}
    overall = images[train].astype(np.float64).mean(0)
    baseline = np.stack([np.rint(means.get(lab, overall)).astype(np.uint8) for lab in labels[test_rows]])
    scores = {
        "n_train_cells": int(train.sum()), "n_test_cells": int(len(test_rows)),
        "generated": {"psnr": float(np.mean(psnr(generated, real))), "ssim": float(np.mean(ssim(generated, real)))},
        "label_mean_crop": {"psnr": float(np.mean(psnr(baseline, real))), "ssim": float(np.mean(ssim(baseline, real)))},
        "final_train_mse": float(loss.detach()),
    }
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "crossmodal.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_grid(tmp / "grid.png", real[: config.grid_rows], generated[: config.grid_rows], baseline[: config.grid_rows])
        write_run_record(tmp, "flow crossmodal", {"crossmodal": config, "inputs": {
            "dataset": str(dataset), "gene_embeddings": str(gene_embeddings), "flow_dir": str(flow_dir)}}, seed)
    return CrossModalResult(out_dir, scores, time.perf_counter() - started)
