"""The dual decoder (appendix B): MAE pixel reconstruction and masked gene modelling.

ImageDecoder (one per level): the ViT-MAE decoder whose first token is the level's embedding
(projected) instead of the encoder's CLS token. Visible tokens are placed at their patch
positions, mask tokens fill the hidden patches, fixed sine-cosine positions are added, and a
small transformer predicts every patch's pixels. Loss: mean squared error over the masked
patches only (over all patches when nothing was masked).

GeneDecoder (shared by the levels; scVI's decoder): an MLP of the level's embedding (plus a
level embedding) gives one logit per vocabulary gene; the softmax over the row's measured genes
times its library size (total measured counts) is the mean of a negative binomial with a learned
per-gene, per-level dispersion. Loss: the negative-binomial negative log-likelihood of the raw
counts of the WHOLE measured panel (mean per measured entry); unmeasured genes are never targets.
The embedding is the only path from encoder to prediction, so it has to carry the expression.
"""

from __future__ import annotations

import torch
from torch import nn

from spatia.model.config import GeneDecoderConfig, ImageDecoderConfig
from spatia.keys import LEVELS
from spatia.model.layers import SelfAttentionBlock, patchify, sincos_2d


class ImageDecoder(nn.Module):
    """forward(z (N, D), visible (N, K, visible_dim), keep (N, K), n_patches) -> pixels
    (N, n_patches, C*p*p): a prediction for every patch, row-major."""

    def __init__(self, cfg: ImageDecoderConfig, dim: int, visible_dim: int, patch_size: int, channels: int):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.z_proj = nn.Linear(dim, cfg.hidden_size)
        self.visible_proj = nn.Linear(visible_dim, cfg.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.hidden_size, cfg.heads, cfg.mlp_size, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, channels * patch_size**2)
        self._positions: dict[tuple[int, str], torch.Tensor] = {}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)

    def _pos(self, n_patches: int, device: torch.device) -> torch.Tensor:
        key = (n_patches, str(device))
        if key not in self._positions:
            grid = int(round(n_patches**0.5))
            self._positions[key] = sincos_2d(grid, self.hidden_size).to(device)
        return self._positions[key]

    def forward(self, z: torch.Tensor, visible: torch.Tensor, keep: torch.Tensor, n_patches: int
                ) -> torch.Tensor:
        n = z.shape[0]
        x = self.mask_token.expand(n, n_patches, -1)
        if keep.shape[1]:
            index = keep[..., None].expand(-1, -1, self.hidden_size)
            # under autocast the projection comes out in bf16/fp16 while the mask token is fp32
            x = x.scatter(1, index, self.visible_proj(visible).to(x.dtype))
        x = torch.cat([self.z_proj(z)[:, None, :], x + self._pos(n_patches, z.device)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))


def image_loss(pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch_size: int,
               norm_pix: bool = False, pixel_mean: float = 0.0, pixel_std: float = 1.0) -> torch.Tensor:
    """MAE loss: per-patch mean squared error, averaged over masked patches.

    pred `(N, P, C*p*p)`; images `(N, C, S, S)` in [0, 1]; masked bool `(N, P)`. The targets are
    the pixels standardised like the encoder's input, `(pixels - pixel_mean) / pixel_std`, so the
    loss is in units of the dataset's pixel variance (dark, mostly empty crops still give a loss
    worth learning from); with `norm_pix` each patch is standardised on its own instead (MAE
    option). When no patch is masked, the average is over all patches (plain reconstruction).
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    else:
        target = (target - pixel_mean) / pixel_std
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weight = masked.to(per_patch.dtype) if bool(masked.any()) else torch.ones_like(per_patch)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


class GeneDecoder(nn.Module):
    """Whole-panel count decoder, shared by the levels (scVI's decoder).

    forward(z (N, D), level) -> logits (N, G) over the gene vocabulary. With a row's measured
    genes and library size (its total measured counts) the negative-binomial mean is
    `softmax(logits over measured genes) * library` (`nb_mean`); the dispersion is one learned
    value per gene and level (`dispersion(level)`, theta > 0).
    """

    def __init__(self, cfg: GeneDecoderConfig, dim: int, n_genes: int):
        super().__init__()
        self.level_embedding = nn.Parameter(torch.zeros(len(LEVELS), dim))
        layers: list[nn.Module] = []
        width = dim
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.dim), nn.LayerNorm(cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.dim
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_genes)
        self.log_dispersion = nn.Parameter(torch.zeros(len(LEVELS), n_genes))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.level_embedding, std=0.02)
        nn.init.zeros_(self.log_dispersion)

    def forward(self, z: torch.Tensor, level: str) -> torch.Tensor:
        return self.head(self.hidden(z + self.level_embedding[LEVELS.index(level)]))

    def dispersion(self, level: str) -> torch.Tensor:
        """theta `(G,)` of the level's negative binomial (larger = closer to Poisson)."""
        return self.log_dispersion[LEVELS.index(level)].float().clamp(-10.0, 10.0).exp()


def gene_proportions(logits: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Softmax of `logits` (N, G) over each row's measured genes (bool (N, G)); 0 elsewhere.

    A row with no measured gene gets all zeros.
    """
    logits = logits.float().masked_fill(~measured, float("-inf"))
    any_measured = measured.any(dim=1, keepdim=True)
    logits = torch.where(any_measured, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=1) * any_measured


def nb_mean(logits: torch.Tensor, measured: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """Negative-binomial means `(N, G)`: measured-gene proportions times the library `(N,)`."""
    return gene_proportions(logits, measured) * library.float()[:, None]


def nb_log_prob(counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative-binomial log-likelihood of `counts` with mean `mean` and inverse dispersion
    `theta` (broadcast), elementwise (scVI's `log_nb_positive`; equal to
    `torch.distributions.NegativeBinomial(total_count=theta, logits=log(mean) - log(theta))`).
    A zero mean gives log-probability 0 at a zero count."""
    counts, mean, theta = counts.float(), mean.float(), theta.float()
    log_theta_mean = torch.log(theta + mean + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mean)
            + counts * (torch.log(mean + eps) - log_theta_mean)
            + torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1.0))


def gene_loss(logits: torch.Tensor, theta: torch.Tensor, counts: torch.Tensor, measured: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative-binomial loss over each row's whole measured panel: the mean negative
    log-likelihood per measured entry (unmeasured genes are never targets), and the means.

    logits `(N, G)`; theta `(G,)`; counts float `(N, G)` raw counts; measured bool `(N, G)`.
    The library size is the row's total measured counts. Returns (loss, mean `(N, G)`).
    """
    measured = measured.bool()
    counts = torch.where(measured, counts.float(), torch.zeros((), device=counts.device))
    mean = nb_mean(logits, measured, counts.sum(dim=1))
    log_prob = nb_log_prob(counts, mean, theta)
    n = measured.sum()
    if int(n) == 0:
        return logits.sum() * 0.0, mean
    return -(log_prob * measured).sum() / n, mean
