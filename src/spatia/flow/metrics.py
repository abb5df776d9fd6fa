"""Scores of generated crops against real target crops.

- FID / KID through torchmetrics, on features from a pluggable extractor
  (`spatia.flow.features`); features are computed once per image set and handed to torchmetrics
  through a pass-through module, so the real set is featurised once for every variant. KID's
  subset draws are seeded.
- CellProfiler-style statistics: the project's morphology features
  (`spatia.evaluate.morphology_features`) on nucleus masks made by one rule for real and
  generated crops (`nucleus_masks`), z-scored with the real crops' mean and std; per feature
  the two-sample KS statistic and the 1-D Wasserstein distance, averaged over features; and
  the Spearman correlation between the generated and real per-feature means.
- PSNR / SSIM of each generated crop against its paired real target (`spatia.flow.quality`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi
from scipy import stats
from torch import nn


class _Precomputed(nn.Module):
    """Pass-through 'extractor' for torchmetrics: the inputs are already features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int, kid_subset_size: int, seed: int) -> dict:
    """FID and KID (mean, std) between two feature sets (N, F), via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real), len(fake)
    if n_real < 2 or n_fake < 2:
        return {"fid": None, "kid": None, "kid_std": None, "n_real": n_real, "n_generated": n_fake}
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    size = int(min(kid_subset_size, n_real, n_fake))
    with warnings.catch_warnings():  # "KID will save all extracted features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=size,
                                      reset_real_features=False)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "n_real": n_real,
            "n_generated": n_fake, "kid_subset_size": size}


def nucleus_masks(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """One rule for real and generated crops: pixels brighter than `threshold` x the crop's 99th
    percentile of non-zero pixels, largest 8-connected component. uint8 (N, S, S) -> bool."""
    images = np.asarray(images)
    out = np.zeros(images.shape, dtype=bool)
    structure = np.ones((3, 3), dtype=bool)
    for i, img in enumerate(images):
        nz = img[img > 0]
        if nz.size == 0:
            continue
        m = img > threshold * np.percentile(nz, 99)
        labels, n = ndi.label(m, structure=structure)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            m = labels == (1 + int(np.argmax(sizes)))
        out[i] = m
    return out


def morphology_table(images: np.ndarray, threshold: float) -> pd.DataFrame:
    """Morphology features of crops on their `nucleus_masks` (rows with empty masks are NaN)."""
    from spatia.evaluate import morphology_features

    return morphology_features(np.asarray(images, dtype=np.uint8), nucleus_masks(images, threshold))


def zscore_on_real(real: pd.DataFrame, *others: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """z-score every table with the real table's per-feature mean and std; features that are not
    finite or constant on the real crops are dropped."""
    mean, std = real.mean(), real.std()
    keep = np.isfinite(mean) & np.isfinite(std) & (std > 1e-12)
    cols = real.columns[keep.to_numpy()]
    return tuple(((t[cols] - mean[cols]) / std[cols]).to_numpy() for t in (real, *others))


def distribution_scores(real_z: np.ndarray, fake_z: np.ndarray) -> dict:
    """Mean KS statistic and mean 1-D Wasserstein over features, Spearman of feature means.

    Rows with any NaN (empty nucleus mask) are dropped from each feature separately."""
    ks, w1 = [], []
    for f in range(real_z.shape[1]):
        a, b = real_z[:, f], fake_z[:, f]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) < 2 or len(b) < 2:
            continue
        ks.append(stats.ks_2samp(a, b).statistic)
        w1.append(stats.wasserstein_distance(a, b))
    mean_real, mean_fake = np.nanmean(real_z, axis=0), np.nanmean(fake_z, axis=0)
    ok = np.isfinite(mean_real) & np.isfinite(mean_fake)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(mean_real[ok], mean_fake[ok]).statistic if ok.sum() > 2 else np.nan
    return {"ks": float(np.mean(ks)) if ks else None, "wasserstein": float(np.mean(w1)) if w1 else None,
            "feature_spearman": None if not np.isfinite(rho) else float(rho), "n_features": len(ks)}
