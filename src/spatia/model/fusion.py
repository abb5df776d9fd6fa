"""Cell-level image-gene fusion (section 4.1) and the final multi-scale fusion (Eq. 4).

Cell fusion: `z_cell = pool(CrossAttn(Q = X_c, K = V = X_g))` with the image tokens X_c as
queries and the gene tokens X_g as keys/values. A learned "no gene" key/value token is always
present, so attention is defined for cells without gene tokens (gene modality withheld, or a
cell with no measured genes): such cells attend only to that token. Two residuals beyond the
paper reach z_cell directly: the gene summary (`fusion.gene_residual`) and the crop's
morphometry measures (`fusion.morphometry_residual`).

Where the section's images explain little of its expression (the measured weight w =
`FusionConfig.image_query_share()` below 1), the pool is shared with one learned, image-free
query over the same gene tokens and blocks: pool = w mean(image queries) + (1 - w) gene query.
On bone-marrow region1 (w 0.001-0.02) the image-token queries carried the DAPI's noise into
z_cell and cost its expression clusters (docs/model.md); where w = 1 (the simulator, breast's
splits with over 200 train cells) the query does not exist and the cell fusion is the paper's.

Final fusion (Eq. 4): each cell's z_cell attends to [z_cell, z_niche, z_tissue] of its own
niche and tissue (whichever levels ran); the result, through a zero-initialised projection, is
added to z_cell: z = z_cell + W LN(CrossAttn(...)). The unified embedding thus starts as the
cell level and only adds context that the losses reward. `fusion.context_ratio` bounds that
context per cell: its norm is clipped to at most ratio * |z_cell|, so the cell's own embedding
stays the larger part of z and keeps what z_cell knows (docs/model.md: unbounded, the context
grew as large as z_cell on the breast section and cost its cell-level labels).
"""

from __future__ import annotations

import torch
from torch import nn

from spatia.model.config import FusionConfig
from spatia.model.layers import CrossAttentionBlock
from spatia.model.morphometry import MorphometryInput, n_morphometry_features


class CellFusion(nn.Module):
    """forward(image_tokens (B, Lq, image_dim), gene_tokens (B, Lg, gene_dim), gene_valid (B, Lg))
    -> fused tokens (B, Lq, D), z_cell (B, D).

    `gene_query` (1, 1, D): the image-free query, present when `image_query_share` < 1; the fused
    tokens returned are the image queries' alone (the image decoder reads them).
    """

    def __init__(self, cfg: FusionConfig, image_dim: int, gene_dim: int, image_channels: int = 1):
        super().__init__()
        self.query_proj = nn.Linear(image_dim, cfg.dim)
        self.null_kv = nn.Parameter(torch.zeros(1, 1, gene_dim))
        self.image_query_share = cfg.image_query_share()
        self.gene_query = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if self.image_query_share < 1.0 else None
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.dim, gene_dim, cfg.heads, cfg.mlp_size, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.gene_summary = nn.Linear(gene_dim, cfg.dim) if cfg.gene_residual else None
        weight = 1.0 if cfg.morphometry_weight is None else cfg.morphometry_weight
        self.morphometry = (MorphometryInput(n_morphometry_features(image_channels), cfg.dim, weight)
                            if cfg.morphometry_residual else None)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.null_kv, std=0.02)
        if self.gene_query is not None:
            nn.init.normal_(self.gene_query, std=0.02)

    def forward(self, image_tokens: torch.Tensor, gene_tokens: torch.Tensor, gene_valid: torch.Tensor,
                gene_summary: torch.Tensor | None = None, morphometry: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """gene_summary (B, gene_dim): the gene encoder's profile token, 0 for cells without genes;
        added to z_cell through `gene_summary` when `fusion.gene_residual`. morphometry (B, F):
        the crop's measures (`morphometry_measures`), None when images are withheld; added to
        z_cell through `MorphometryInput` when `fusion.morphometry_residual`."""
        b = image_tokens.shape[0]
        kv = torch.cat([self.null_kv.expand(b, -1, -1), gene_tokens], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=kv.device), gene_valid], dim=1)
        q = self.query_proj(image_tokens)
        n_image = q.shape[1]
        if self.gene_query is not None:
            # one more query; the blocks have no attention between queries, so it never sees the image
            q = torch.cat([q, self.gene_query.expand(b, -1, -1)], dim=1)
        for block in self.blocks:
            q = block(q, kv, valid)
        normed = self.norm(q)
        fused = normed[:, :n_image]
        z_cell = fused.mean(dim=1)
        if self.gene_query is not None:
            z_cell = self.image_query_share * z_cell + (1.0 - self.image_query_share) * normed[:, n_image]
        if self.gene_summary is not None and gene_summary is not None:
            z_cell = z_cell + self.gene_summary(gene_summary)
        if self.morphometry is not None and morphometry is not None:
            z_cell = z_cell + self.morphometry(morphometry)
        return fused, z_cell


class FinalFusion(nn.Module):
    """Eq. 4. forward(z_cell (B, D), z_niche (B, D) | None, z_tissue (B, D) | None) -> z (B, D).

    Keys carry a learned level embedding (cell / niche / tissue) so the attention can tell the
    scales apart. z = z_cell + clip(out(LN(attention output))), `out` zero at initialisation,
    clip: the context's norm scaled down to at most `cfg.context_ratio` * |z_cell| per cell
    (none when `context_ratio` is None).
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.context_ratio = cfg.context_ratio
        self.level_embedding = nn.Parameter(torch.zeros(3, cfg.dim))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.dim, cfg.dim, cfg.heads, cfg.mlp_size, cfg.dropout)
            for _ in range(cfg.final_layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.level_embedding, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z_cell: torch.Tensor, z_niche: torch.Tensor | None = None,
                z_tissue: torch.Tensor | None = None) -> torch.Tensor:
        levels = [z for z in (z_cell, z_niche, z_tissue) if z is not None]
        kv = torch.stack(levels, dim=1) + self.level_embedding[: len(levels)]
        q = z_cell[:, None, :]
        for block in self.blocks:
            q = block(q, kv)
        context = self.out(self.norm(q[:, 0]))
        if self.context_ratio is not None:
            limit = self.context_ratio * z_cell.norm(dim=-1, keepdim=True)
            # limit / max(norm, limit): 1 where the context is within the limit; no 1 / 0 anywhere
            bound = torch.maximum(context.norm(dim=-1, keepdim=True), limit).clamp_min(1e-12)
            context = context * (limit / bound)
        return z_cell + context
