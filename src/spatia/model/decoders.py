"""The dual decoder (appendix B): MAE pixel reconstruction and masked gene modelling.

ImageDecoder (one per level): the ViT-MAE decoder whose first token is the level's embedding
(projected) instead of the encoder's CLS token. Visible tokens are placed at their patch
positions, mask tokens fill the hidden patches, fixed sine-cosine positions are added, and a
small transformer predicts every patch's pixels. Loss: mean squared error over the masked
patches only (over all patches when nothing was masked).

GeneDecoder (shared by the levels): learnable gene queries `q_g` attend to memory tokens made
from the embedding (`Linear(D, m * dim)` of embedding + level embedding), then a linear head
predicts the gene's normalised expression. The embedding is the only path from encoder to
prediction, so it has to carry the expression information. Loss: mean squared error over the
target genes (masked tokens at the cell level; sampled measured genes at niche and tissue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spatia.model.config import GeneDecoderConfig, ImageDecoderConfig
from spatia.model.layers import CrossAttentionBlock, SelfAttentionBlock, patchify, sincos_2d

LEVELS = ("cell", "niche", "tissue")


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
               norm_pix: bool = False) -> torch.Tensor:
    """MAE loss: per-patch mean squared error, averaged over masked patches.

    pred `(N, P, C*p*p)`; images `(N, C, S, S)` in [0, 1]; masked bool `(N, P)`. When no patch
    is masked, the average is over all patches (plain reconstruction).
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weight = masked.to(per_patch.dtype) if bool(masked.any()) else torch.ones_like(per_patch)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


class GeneDecoder(nn.Module):
    """forward(z (N, D), level str, gene_index (N, T)) -> predicted normalised expression (N, T)."""

    def __init__(self, cfg: GeneDecoderConfig, dim: int, n_genes: int):
        super().__init__()
        self.memory_tokens = cfg.memory_tokens
        self.dim = cfg.dim
        self.level_embedding = nn.Parameter(torch.zeros(len(LEVELS), dim))
        self.memory = nn.Linear(dim, cfg.memory_tokens * cfg.dim)
        self.queries = nn.Embedding(n_genes, cfg.dim)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.dim, cfg.dim, cfg.heads, cfg.mlp_size, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 1)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.level_embedding, std=0.02)
        nn.init.normal_(self.queries.weight, std=0.02)

    def forward(self, z: torch.Tensor, level: str, gene_index: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        memory = self.memory(z + self.level_embedding[LEVELS.index(level)]).view(n, self.memory_tokens, self.dim)
        q = self.queries(gene_index)
        for block in self.blocks:
            q = block(q, memory)
        return self.head(self.norm(q))[..., 0]


def gene_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid target genes; 0 (with gradient) when there are none."""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[valid], target[valid])
