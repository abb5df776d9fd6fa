"""Morphometry: hand-made shape, intensity and texture measures of a cell crop, in torch.

The measures serve the cell level twice (neither is in the paper; docs/model.md gives the
measurements behind both):

- **an input** (`fusion.morphometry_residual`): `MorphometryInput` standardises them with fixed
  statistics of the training cells and adds `Linear(measures)` to z_cell, as the gene residual
  adds the gene summary. A small ViT trained for a few thousand steps does not discover the
  nuclear measures a CellProfiler-style feature vector holds (size, boundary intensity,
  chromatin texture); given them, the image-only and unified embeddings carry them. The term
  is scaled by `fusion.morphometry_weight`, which `spatia pretrain` measures from how much of
  the train cells' expression the measures explain (`spatia.train.data`): near 0 where the
  DAPI cannot tell the cells apart, so the measures do not drown their expression there.
- **an auxiliary target** for the cell image encoder (`loss.cell.morphometry`): a linear head
  on the mean of the encoder's tokens predicts the measures of the *whole* crop from the
  visible patches, as MaskFeat (Wei et al., CVPR 2022) predicts hand-made HOG features of
  masked regions, so the encoder itself learns them too. The targets are standardised over the
  batch before the loss.

The measures are computed on the fly from the batch (`cell_image` in [0, 1] and `cell_mask`),
per channel where they concern intensity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHAPE_NAMES = ("area_fraction", "sqrt_area", "major_axis", "minor_axis", "elongation", "boundary_fraction", "extent")
INTENSITY_NAMES = ("mean", "std", "min", "q10", "q25", "q50", "q75", "q90", "max", "integrated", "weighted_spread",
                   "mass_displacement", "gradient_mean", "laplacian_abs_mean", "dark_fraction", "edge_mean")


def n_morphometry_features(channels: int) -> int:
    """Width of `morphometry_measures`' output for crops with `channels` channels."""
    return len(SHAPE_NAMES) + channels * len(INTENSITY_NAMES)


def _centroid(weight: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centroid (y (B,), x (B,)) of pixel positions, for weights (B, S, S)."""
    total = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    return (weight * ys).sum(dim=(1, 2)) / total, (weight * xs).sum(dim=(1, 2)) / total


def _second_moments(weight: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (B, 2), largest first, of the weighted covariance of pixel positions."""
    total = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    my, mx = _centroid(weight, ys, xs)
    dy, dx = ys - my[:, None, None], xs - mx[:, None, None]
    cyy = (weight * dy * dy).sum(dim=(1, 2)) / total
    cxx = (weight * dx * dx).sum(dim=(1, 2)) / total
    cxy = (weight * dx * dy).sum(dim=(1, 2)) / total
    half_trace = (cxx + cyy) / 2
    root = torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    return torch.stack([half_trace + root, (half_trace - root).clamp(min=0.0)], dim=1)


def _span(hit: torch.Tensor) -> torch.Tensor:
    """Length in pixels (B,) of the run from the first to the last True of each row of hit (B, S)."""
    s = hit.shape[1]
    index = torch.arange(s, device=hit.device)
    first = torch.where(hit, index, s).min(dim=1).values
    last = torch.where(hit, index, -1).max(dim=1).values
    return (last - first + 1).clamp(min=1).float()


@torch.no_grad()
def morphometry_measures(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Measures of each crop: float32 (B, n_morphometry_features(C)).

    image float (B, C, S, S) in [0, 1]; mask bool (B, 1 or C, S, S), the cell's polygon (the
    first channel is used). Shape (from the mask): area as a fraction of the crop and its square
    root, the major and minor axis (4 x sqrt of the second-moment eigenvalues: the full axes of the
    ellipse with the same moments, in crop widths),
    their ratio, the share of mask pixels on its boundary, the extent (area over the area of the
    mask's bounding box). Per channel, inside the mask: mean, standard deviation, minimum,
    10/25/50/75/90th percentiles, maximum, integrated intensity (sum / S^2), intensity-weighted
    spread (sqrt of the summed second-moment eigenvalues), mass displacement (distance between
    the intensity-weighted and the plain centroid, in crop widths), mean Sobel gradient
    magnitude, mean |Laplacian|, share of pixels below half the cell's median, mean on the
    mask's boundary pixels (CellProfiler's MeanIntensityEdge: peripheral chromatin). A crop with
    an empty mask uses the whole crop.
    """
    image = image.float()
    _, c, s, _ = image.shape
    m = mask[:, :1].bool()
    empty = ~m.flatten(1).any(dim=1)
    m = m | empty[:, None, None, None]
    mf = m.float()
    area = mf.sum(dim=(1, 2, 3))
    coords = (torch.arange(s, device=image.device, dtype=torch.float32) + 0.5) / s
    ys, xs = coords[None, :, None], coords[None, None, :]
    eig = _second_moments(mf[:, 0], ys, xs)
    major, minor = 4 * eig[:, 0].sqrt(), 4 * eig[:, 1].sqrt()
    eroded = -F.max_pool2d(-mf, kernel_size=3, stride=1, padding=1)
    edge = (mf - eroded).clamp(min=0)                                            # (B, 1, S, S)
    n_edge = edge.sum(dim=(1, 2, 3)).clamp(min=1)
    boundary = edge.sum(dim=(1, 2, 3)) / area.clamp(min=1)
    rows_hit, cols_hit = m[:, 0].any(dim=2), m[:, 0].any(dim=1)                  # (B, S) each
    extent = area / (_span(rows_hit) * _span(cols_hit))
    columns = [area / (s * s), (area / (s * s)).sqrt(), major, minor, major / minor.clamp(min=1e-3), boundary, extent]
    centroid_y, centroid_x = _centroid(mf[:, 0], ys, xs)

    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device) / 8
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]                        # (2, 1, 3, 3)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=image.device)[None, None]
    inside = m[:, 0].flatten(1)                                                  # (B, S*S)
    for channel in range(c):
        x = image[:, channel: channel + 1]                                       # (B, 1, S, S)
        values = x.flatten(1)
        n = inside.sum(dim=1).clamp(min=1)
        mean = (values * inside).sum(dim=1) / n
        std = (((values - mean[:, None]) ** 2) * inside).sum(dim=1).div(n).sqrt()
        probabilities = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], device=image.device)
        quantiles = torch.nanquantile(values.masked_fill(~inside, float("nan")), probabilities, dim=1).T  # (B, 7)
        integrated = (values * inside).sum(dim=1) / (s * s)
        weighted = (x * mf)[:, 0]
        spread = _second_moments(weighted, ys, xs).sum(dim=1).sqrt()
        mass_y, mass_x = _centroid(weighted, ys, xs)
        displacement = torch.hypot(mass_y - centroid_y, mass_x - centroid_x)
        grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
        grad_mean = (grad.pow(2).sum(dim=1).sqrt() * mf[:, 0]).flatten(1).sum(dim=1) / n
        lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), laplace).abs()
        lap_mean = (lap * mf).flatten(1).sum(dim=1) / n
        median = quantiles[:, 3]
        dark = ((values < 0.5 * median[:, None]) & inside).sum(dim=1) / n
        edge_mean = (x * edge).sum(dim=(1, 2, 3)) / n_edge
        columns += [mean, std, *quantiles.unbind(dim=1), integrated, spread, displacement,
                    grad_mean, lap_mean, dark, edge_mean]
    return torch.nan_to_num(torch.stack(columns, dim=1), nan=0.0, posinf=0.0, neginf=0.0)


def standardise_over_batch(targets: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each column minus its batch mean, over its batch standard deviation (constant columns -> 0)."""
    mean = targets.mean(dim=0, keepdim=True)
    std = targets.std(dim=0, unbiased=False, keepdim=True)
    return (targets - mean) / (std + eps)


class MorphometryInput(nn.Module):
    """forward(measures (B, F)) -> (B, D): `Linear` of the measures standardised with fixed
    dataset statistics, times `weight` (`fusion.morphometry_weight`; 1 when not set).

    The statistics are buffers (saved with the weights): `spatia pretrain` sets them from the
    training cells (`set_statistics`, measured by `spatia.train.data.dataset_statistics`), so
    embedding uses the training data's; until set they are 0 and 1. Batch statistics are never
    used: the localised training batches are cells of one or two regions, and centring on their
    own mean would remove the regional differences in morphology that the embedding should keep.
    """

    def __init__(self, n_features: int, dim: int, weight: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.weight = float(weight)  # from the config, which the checkpoint holds
        self.proj = nn.Linear(n_features, dim)

    @torch.no_grad()
    def set_statistics(self, mean, std) -> None:
        """Set the standardisation: per-measure mean and standard deviation (F,) (array-likes);
        a standard deviation under 1e-6 (a constant measure) is taken as 1."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"morphometry statistics must have {self.mean.numel()} values, "
                             f"got {mean.numel()} and {std.numel()}")
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std < 1e-6, torch.ones_like(std), std))

    def forward(self, measures: torch.Tensor) -> torch.Tensor:
        return self.proj((measures.float() - self.mean) / self.std) * self.weight
