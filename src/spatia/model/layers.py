"""Transformer building blocks shared by every SPATIA module.

All attention goes through `torch.nn.functional.scaled_dot_product_attention` with one fused
input projection per block (one large matmul instead of three small ones). Tensors are
batch-first: tokens are `(N, L, dim)` float32. Key masks are bool `(N, L)` with True = a real
token that may be attended to (the opposite of `nn.MultiheadAttention`'s padding masks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _attention_mask(key_valid: torch.Tensor | None) -> torch.Tensor | None:
    """(N, Lk) bool key mask -> (N, 1, 1, Lk) mask broadcast over heads and queries."""
    if key_valid is None:
        return None
    return key_valid[:, None, None, :]


class MLP(nn.Module):
    """Two-layer GELU MLP: dim -> hidden -> dim."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (the ViT / ViTMAE layout).

    x = x + proj(attn(LN(x))); x = x + MLP(LN(x)). Input and output `(N, L, dim)`.
    """

    def __init__(self, dim: int, heads: int, mlp_size: int, dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_size, dropout)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_attention_mask(key_valid),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(n, length, dim)))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LayerNorm cross-attention block: queries attend to a separate key/value sequence.

    q = q + proj(attn(Q=LN(q), K=V=LN(kv))); q = q + MLP(LN(q)).
    `q` is `(N, Lq, dim)`; `kv` is `(N, Lk, kv_dim)`; the output is `(N, Lq, dim)`.
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, mlp_size: int, dropout: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_size, dropout)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        n, lq, dim = q.shape
        lk = kv.shape[1]
        hd = dim // self.heads
        qh = self.q(self.norm_q(q)).view(n, lq, self.heads, hd).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv)).view(n, lk, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=_attention_mask(key_valid),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        q = q + self.dropout(self.proj(a.transpose(1, 2).reshape(n, lq, dim)))
        return q + self.mlp(self.norm2(q))


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table, `(grid_size**2, dim)` float32, row-major patches.

    The layout is the one pretrained ViT-MAE weights were trained with: the first half of each
    vector encodes the column (x), the second half the row (y); each half is
    [sin(pos * w), cos(pos * w)] with w = 1 / 10000**(arange(dim/4) / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"position embedding size {dim} is not divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )
    ang_x = cols.reshape(-1, 1) * omega
    ang_y = rows.reshape(-1, 1) * omega
    table = torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)
    return table.float()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, S, S) -> (N, (S/p)**2, C*p*p); patches row-major, pixels in (C, p, p) order.

    The pixel order matches a `Conv2d(C, hidden, kernel=p, stride=p)` weight flattened to
    `(hidden, C*p*p)`, so a patch embedding is one matmul on the gathered rows.
    """
    n, c, h, w = images.shape
    g = h // patch_size
    x = images.reshape(n, c, g, patch_size, g, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, g * g, c * patch_size * patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (N, g*g, C*p*p) -> (N, C, g*p, g*p)."""
    n, count, _ = patches.shape
    g = math.isqrt(count)
    x = patches.reshape(n, g, g, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, g * patch_size, g * patch_size)


def init_weights(module: nn.Module) -> None:
    """MAE-style initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
