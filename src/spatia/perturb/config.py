"""`PairingConfig`: every setting that decides the pairs; saved (resolved) next to them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spatia.errors import ConfigError


@dataclass(frozen=True)
class PairingConfig:
    """Everything that decides the pairs; saved (resolved) next to them.

    epsilon: entropic regularisation relative to the RMS control-target expression distance
      (the cost is divided by it), so 0.05 means the same on any data (paper: 0.05).
    tol: Sinkhorn stops when the L1 error of the column marginal is below it (a fraction of
      the total mass 1). max_iter: iteration limit (a warning if reached).
    omega: Sinkhorn over-relaxation, "auto" (adaptive, safeguarded) or a factor in [1, 2).
    n_pcs: principal components of the expression space (paper d = 50).
    theta_min: minimum cells of each state within the transition's lineage (paper 50).
    state_key, lineage_key: obs columns of the cell state and lineage (required).
    niche_key: obs column of the niche type (e.g. domain); written as niche_ctrl/niche_tgt and
      used by `same_niche`. slide_key, patient_key: obs columns; without slide_key all cells
      are one slide (its id from uns["spatia"]["slide_id"] when present).
    counts_layer: layer with raw counts; None = layers["counts"] if present, else .X.
    spatial_weight, spatial_scale_um: the spatial cost term spatial_weight * d / scale; with
      the defaults 100 um of distance cost 0.1 RMS expression distances. 0 turns it off.
    max_distance_um: hard radius; control-target pairs farther apart are never made (None: off).
    same_niche: solve each niche type of a slide separately (needs niche_key).
    pair_noise: fraction of pairs whose targets are swapped among themselves within each
      transition and slide (paper Table 5: 0.1, 0.2); 0 = off.
    seed: seeds the pair noise and the ARPACK start of the PCA (for panels over 2,000 genes).
    dtype: "float32" (default) or "float64" for the Sinkhorn arithmetic.
    memory_mb: budget of each solve's cached cost blocks and buffers; block_mb: block size.
    """

    epsilon: float = 0.05
    tol: float = 1e-5
    max_iter: int = 5000
    omega: float | str = "auto"
    n_pcs: int = 50
    theta_min: int = 50
    state_key: str = "state"
    lineage_key: str = "lineage"
    niche_key: str | None = None
    slide_key: str | None = None
    patient_key: str | None = None
    counts_layer: str | None = None
    spatial_weight: float = 0.1
    spatial_scale_um: float = 100.0
    max_distance_um: float | None = None
    same_niche: bool = False
    pair_noise: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    memory_mb: float = 1600.0  # caches every block of a 20,000 x 20,000 problem (peak 1,992 MiB; docs/pairing.md)
    block_mb: float = 16.0

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"pairing setting {name} = {getattr(self, name)!r} is invalid: {rule}",
                               fix=f"set {name} so that {rule}")

        for name in ("epsilon", "tol", "spatial_scale_um", "memory_mb", "block_mb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(name, "it is a positive number")
        for name in ("max_iter", "n_pcs", "theta_min"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise bad(name, "it is a whole number >= 1")
        if not (isinstance(self.spatial_weight, (int, float)) and math.isfinite(self.spatial_weight)
                and self.spatial_weight >= 0):
            raise bad("spatial_weight", "it is a number >= 0")
        if self.max_distance_um is not None and not (math.isfinite(self.max_distance_um) and self.max_distance_um > 0):
            raise bad("max_distance_um", "it is a positive number of micrometres (or unset)")
        if not 0 <= self.pair_noise <= 1:
            raise bad("pair_noise", "it is a fraction between 0 and 1")
        if self.omega != "auto":
            try:
                ok = 1.0 <= float(self.omega) < 2.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise bad("omega", "it is 'auto' or a number in [1, 2)")
        if self.dtype not in ("float32", "float64"):
            raise bad("dtype", "it is 'float32' or 'float64'")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise bad("seed", "it is a whole number >= 0")
        if self.same_niche and not self.niche_key:
            raise ConfigError("same_niche needs a niche column", fix="name it with niche_key (--niche-key)")
        for name in ("state_key", "lineage_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "it names an obs column")
