"""The probability path and losses of conditional contrastive flow matching (paper Eq. 7).

Bridge between a control latent l0 and its paired target latent l1:

    l_t = (1 - t) l0 + t l1,      target velocity u = d l_t / dt = l1 - l0.

Per pair i (weight w_i = its OT match score), with v_i = v_theta(l_t, t | z_ctrl, e_pert):

    L = sum_i w_i [ ||v_i - u_i||^2  -  lambda ||v_i - u_j||^2 ] / sum_i w_i

where j is another pair of the batch with a different transition or niche (the negative) and
||.||^2 is the mean over latent entries. lambda in [0, 1): for lambda >= 1 the loss is unbounded
below (v -> infinity along u_i - u_j). The sign: the paper's Eq. 7 as printed *adds*
rho ||v - (l1' - l0')||^2, which pulls the flow towards the negative's velocity and contradicts
its own text ("penalize alignment of the positive flow to the negative target direction",
"push-apart across conditions"); we follow the text and contrastive flow matching (Stoica et al.
2025), which subtract it. For fixed u_i, u_j the minimiser is v = (u_i - lambda u_j) / (1 - lambda).
"""

from __future__ import annotations

import torch

from spatia.errors import ConfigError


def check_contrastive_weight(weight: float) -> float:
    """Refuse lambda outside [0, 1) (lambda >= 1 makes the loss unbounded below)."""
    if not 0.0 <= float(weight) < 1.0:
        raise ConfigError(f"contrastive weight lambda = {weight} is outside [0, 1)",
                          fix="use 0 <= lambda < 1 (default 0.05); lambda >= 1 makes the loss unbounded below")
    return float(weight)


def bridge(l0: torch.Tensor, l1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """l_t = (1 - t) l0 + t l1 with t of shape (B,)."""
    t = t.view(-1, *([1] * (l0.dim() - 1)))
    return (1.0 - t) * l0 + t * l1


def target_velocity(l0: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """u = l1 - l0 (the bridge's time derivative)."""
    return l1 - l0


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).flatten(1).mean(dim=1)


def contrastive_fm_loss(v: torch.Tensor, u: torch.Tensor, weights: torch.Tensor, *, u_neg: torch.Tensor | None = None,
                        has_neg: torch.Tensor | None = None, contrastive_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The weighted loss above. `u_neg` (B, ...) holds each pair's negative target velocity and
    `has_neg` (B,) bool whether it has one (pairs without a negative get the plain FM term).
    Returns the loss and its parts (weighted means of the FM and contrastive terms)."""
    lam = check_contrastive_weight(contrastive_weight)
    w = weights / weights.sum().clamp_min(1e-12)
    fm = _sq(v - u)
    total = fm
    neg_term = torch.zeros_like(fm)
    if lam > 0 and u_neg is not None:
        mask = has_neg.to(v.dtype) if has_neg is not None else torch.ones_like(fm)
        neg_term = _sq(v - u_neg) * mask
        total = fm - lam * neg_term
    loss = (w * total).sum()
    return loss, {"fm": float((w * fm).sum().detach()), "contrastive": float((w * neg_term).sum().detach())}


def draw_negatives(transition: torch.Tensor, niche: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair i of a batch, a random j with a different transition or niche code.
    Returns (j (B,) int64, has_neg (B,) bool); j = i where no such pair exists."""
    b = transition.shape[0]
    differs = (transition[:, None] != transition[None, :]) | (niche[:, None] != niche[None, :])
    scores = torch.rand(b, b, generator=generator).masked_fill(~differs, -1.0)
    j = scores.argmax(dim=1)
    has = differs.any(dim=1)
    j = torch.where(has, j, torch.arange(b))
    return j, has
