"""Niche representation (Eq. 5): z_niche = CrossAttn(Q = mean member z_cell, K = V = X_niche).

X_niche are the niche image tokens from the niche image encoder (CLS + visible patches). The
query of niche j is the mean z_cell of its cells *in this batch*. A niche with no sampled cell in
the batch uses a learned "empty niche" query instead, so its embedding depends on its image
alone (documented in docs/model.md). Vectorised over niches: no Python loop.
"""

from __future__ import annotations

import torch
from torch import nn

from spatia.model.config import NicheConfig
from spatia.model.layers import CrossAttentionBlock


def mean_by_index(values: torch.Tensor, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group means: values `(N, D)` grouped by index int64 `(N,)` in [0, size).

    Returns means `(size, D)` (0 for empty groups) and counts int64 `(size,)`.
    """
    sums = torch.zeros(size, values.shape[1], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, values)
    counts = torch.bincount(index, minlength=size)
    return sums / counts.clamp(min=1).to(values.dtype)[:, None], counts


class NicheAttention(nn.Module):
    """forward(z_cell (B, D), cell_niche_index (B,), niche_tokens (Bn, Ln, image_dim))
    -> z_niche (Bn, D), member counts int64 (Bn,)."""

    def __init__(self, cfg: NicheConfig, dim: int, image_dim: int):
        super().__init__()
        self.empty_query = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim, image_dim, cfg.heads, cfg.mlp_size, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.empty_query, std=0.02)

    def forward(self, z_cell: torch.Tensor, cell_niche_index: torch.Tensor, niche_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_niches = niche_tokens.shape[0]
        mean, counts = mean_by_index(z_cell, cell_niche_index, n_niches)
        q = torch.where((counts > 0)[:, None], mean, self.empty_query.expand_as(mean))[:, None, :]
        for block in self.blocks:
            q = block(q, niche_tokens)
        return self.norm(q[:, 0]), counts
