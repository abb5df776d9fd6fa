"""The velocity network v_theta(l_t, t | z_ctrl, e_pert) and the perturbation embedding.

- Perturbation embedding e_pert: a learned transition embedding plus a linear projection of the
  transition's signature PCA coordinates (`spatia.flow.data.signature_coordinates`), fused by an
  MLP (paper section 4.3, "Pseudo-Perturbation Embedding").
- Condition vector c = MLP(sinusoidal t) + P z_ctrl + e_pert, where z_ctrl is the frozen SPATIA
  embedding of the control cell (`X_spatia`, or `X_spatia_cell` for the cell-only ablation; left
  out when `condition == "none"`).
- Each residual block applies FiLM: h <- (1 + gamma(c)) * GroupNorm(h) + beta(c). The FiLM
  projections and the output convolution start at zero, so the initial field is exactly 0 and
  every block starts as the identity.
- Classifier-free guidance: during training each condition (z_ctrl, e_pert) is replaced by its
  own learned null vector with probability `condition_dropout`, independently; sampling with
  scale g uses v_null + g (v_cond - v_null), v_null having both conditions dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spatia.flow.config import FlowModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype) / max(1, half))
    args = (1000.0 * t)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class PerturbationEmbedding(nn.Module):
    """e_pert = MLP(transition embedding + W coords)."""

    def __init__(self, n_transitions: int, n_coords: int, dim: int):
        super().__init__()
        self.token = nn.Embedding(n_transitions, dim)
        self.project = nn.Linear(n_coords, dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, transition: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.token(transition) + self.project(coords))


class FiLMBlock(nn.Module):
    """GroupNorm -> FiLM -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus the input."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, width), width)
        self.film = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, width), width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(c)[:, :, None, None].chunk(2, dim=1)
        x = F.silu((1.0 + gamma) * self.norm1(h) + beta)
        x = self.conv2(F.silu(self.norm2(self.conv1(x))))
        return h + x


class VelocityNet(nn.Module):
    """v_theta on latent maps (B, C, h, w)."""

    def __init__(self, config: FlowModelConfig, latent_channels: int, z_dim: int | None, n_transitions: int,
                 n_coords: int):
        super().__init__()
        d = config.cond_dim
        self.config = config
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.z_proj = nn.Linear(z_dim, d) if z_dim else None
        self.null_z = nn.Parameter(torch.zeros(d))
        self.pert = PerturbationEmbedding(n_transitions, n_coords, d)
        self.null_pert = nn.Parameter(torch.zeros(d))
        self.cond_out = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
        # patch > 1: the blocks run on (h / patch, w / patch) cells of the latent map (a strided
        # stem and a transposed head, as a ViT's patches): 1/patch^2 of the cost per block
        p = config.patch
        self.inp = nn.Conv2d(latent_channels, config.width, 3, padding=1) if p == 1 else \
            nn.Conv2d(latent_channels, config.width, p, stride=p)
        self.blocks = nn.ModuleList(FiLMBlock(config.width, d) for _ in range(config.blocks))
        self.out_norm = nn.GroupNorm(min(8, config.width), config.width)
        self.out = nn.Conv2d(config.width, latent_channels, 3, padding=1) if p == 1 else \
            nn.ConvTranspose2d(config.width, latent_channels, p, stride=p)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition(self, t: torch.Tensor, z: torch.Tensor | None, transition: torch.Tensor, coords: torch.Tensor,
                  drop_z: torch.Tensor | None = None, drop_pert: torch.Tensor | None = None) -> torch.Tensor:
        """The FiLM input c (B, cond_dim); drop_* (B,) bool replace a condition by its null vector."""
        b = t.shape[0]
        c = self.time_mlp(timestep_embedding(t, self.config.cond_dim))
        if self.z_proj is not None:
            ez = self.z_proj(z)
            if drop_z is not None:
                ez = torch.where(drop_z[:, None], self.null_z.expand(b, -1), ez)
            c = c + ez
        ep = self.pert(transition, coords)
        if drop_pert is not None:
            ep = torch.where(drop_pert[:, None], self.null_pert.expand(b, -1), ep)
        return self.cond_out(c + ep)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None, transition: torch.Tensor,
                coords: torch.Tensor, drop_z: torch.Tensor | None = None, drop_pert: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(t, z, transition, coords, drop_z, drop_pert)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(F.silu(self.out_norm(h)))

    def guided(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None, transition: torch.Tensor,
               coords: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        """Classifier-free guided velocity v_null + g (v_cond - v_null); g = 1 is v_cond exactly."""
        v_cond = self(x, t, z, transition, coords)
        if guidance == 1.0:
            return v_cond
        ones = torch.ones(x.shape[0], dtype=torch.bool)
        v_null = self(x, t, z, transition, coords, drop_z=ones, drop_pert=ones)
        return v_null + guidance * (v_cond - v_null)
