"""Per-image PSNR and SSIM of uint8 crops (data range 255).

SSIM is Wang et al. (2004) with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
over the valid region of the window (no padding), as scikit-image's
`structural_similarity(..., gaussian_weights=True, use_sample_covariance=False, data_range=255)`;
the per-image value is the mean of the SSIM map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR_DB = 100.0  # identical images (mse 0) are given this


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB of each pair of uint8 images (N, S, S); capped at MAX_PSNR_DB."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(out, MAX_PSNR_DB)


def _window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the valid region (the 2-D window is the outer product)."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim(a: np.ndarray, b: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Mean SSIM of each pair of uint8 images (N, S, S)."""
    c1, c2 = 0.01**2, 0.03**2
    w = _window()
    out = []
    for start in range(0, len(a), batch_size):
        # float32 on values scaled to [0, 1] (the constants scale alike): fast, and the variance
        # terms keep ~1e-7 relative precision
        x = torch.from_numpy(np.asarray(a[start:start + batch_size], dtype=np.float32) / 255.0)[:, None]
        y = torch.from_numpy(np.asarray(b[start:start + batch_size], dtype=np.float32) / 255.0)[:, None]
        mx, my = _blur(x, w), _blur(y, w)
        sxx = _blur(x * x, w) - mx * mx
        syy = _blur(y * y, w) - my * my
        sxy = _blur(x * y, w) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out.append(s.double().mean(dim=(1, 2, 3)).numpy())
    return np.concatenate(out) if out else np.zeros(0)
