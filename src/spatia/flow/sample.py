"""Fixed-step ODE integration of a velocity field from t = 0 to t = 1.

`integrate(field, x0, steps, method)` with `field(x, t) -> v` (t a (B,) tensor):

- "euler":    x <- x + h v(x, t)
- "midpoint": x <- x + h v(x + h/2 v(x, t), t + h/2)

with h = 1 / steps. Euler is exact for a constant field; midpoint for a field linear in t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spatia.errors import ConfigError

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def integrate(field: Field, x0: torch.Tensor, steps: int, method: str = "euler") -> torch.Tensor:
    """x(1) from x(0) = x0 with `steps` fixed steps of `method`."""
    if steps < 1:
        raise ConfigError(f"steps = {steps}", fix="use at least one integration step")
    if method not in ("euler", "midpoint"):
        raise ConfigError(f"unknown sampler {method!r}", fix="use 'euler' or 'midpoint'")
    h = 1.0 / steps
    x = x0
    b = x0.shape[0]
    for k in range(steps):
        t = torch.full((b,), k * h, dtype=x0.dtype)
        v = field(x, t)
        if method == "midpoint":
            v = field(x + 0.5 * h * v, t + 0.5 * h)
        x = x + h * v
    return x
