"""Tissue representation (Eq. 6).

Per tissue region k, the sequence X_t is the grid of its niche embeddings (grid_size x grid_size
slots, row-major, each plus a fixed 2-D sine-cosine position of its slot; empty slots are masked
out) followed by the tissue image tokens (CLS + visible patches of the tissue image, projected
to D), each group with a learned type embedding. A transformer encoder runs over it. Then every
niche queries its own tissue: z_tissue = CrossAttn(Q = z_niche, K = V = X_t).

The tissue summary used by the tissue-level decoders is the mean z_tissue over the tissue's
niches (the mean of its X_t tokens when no niche of the tissue is in the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from spatia.model.config import TissueConfig
from spatia.model.layers import CrossAttentionBlock, SelfAttentionBlock, sincos_2d
from spatia.model.niche import mean_by_index


class TissueTransformer(nn.Module):
    """forward(z_niche (Bn, D), tissue_niche_index (Bt, g*g), niche_tissue_index (Bn,),
    tissue_tokens (Bt, Lt, image_dim)) -> z_tissue per niche (Bn, D), tissue summary (Bt, D)."""

    def __init__(self, cfg: TissueConfig, dim: int, image_dim: int):
        super().__init__()
        self.grid_size = cfg.grid_size
        self.register_buffer("slot_positions", sincos_2d(cfg.grid_size, dim), persistent=False)
        self.type_embedding = nn.Parameter(torch.zeros(2, dim))  # 0: niche slot, 1: image token
        self.image_proj = nn.Linear(image_dim, dim)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(dim, cfg.heads, cfg.mlp_size, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.cross = CrossAttentionBlock(dim, dim, cfg.heads, cfg.mlp_size, cfg.dropout)
        self.out_norm = nn.LayerNorm(dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.type_embedding, std=0.02)

    def forward(self, z_niche: torch.Tensor, tissue_niche_index: torch.Tensor,
                niche_tissue_index: torch.Tensor, tissue_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_tissues = tissue_tokens.shape[0]
        present = tissue_niche_index >= 0                                    # (Bt, S)
        slots = z_niche[tissue_niche_index.clamp(min=0)] * present[..., None]  # (Bt, S, D)
        slots = slots + self.slot_positions + self.type_embedding[0]
        image = self.image_proj(tissue_tokens) + self.type_embedding[1]
        x = torch.cat([slots, image], dim=1)
        valid = torch.cat([present, torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
        for block in self.blocks:
            x = block(x, valid)
        x = self.norm(x)                                                     # X_t (Bt, L, D)
        # Eq. 6: each niche attends to its own tissue's X_t
        z_tissue = self.cross(z_niche[:, None, :], x[niche_tissue_index], valid[niche_tissue_index])
        z_tissue = self.out_norm(z_tissue[:, 0])
        niche_mean, counts = mean_by_index(z_tissue, niche_tissue_index, n_tissues)
        token_mean = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        summary = torch.where((counts > 0)[:, None], niche_mean, token_mean)
        return z_tissue, summary
