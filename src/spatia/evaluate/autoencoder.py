"""The count autoencoder baseline: a gene-only embedding trained with a negative-binomial likelihood.

A reference point any SPATIA embedding should beat on expression-derived labels (issue 12):

- input: log-normalised counts (`spatia.expression.log_normalise`, median library size), with
  `input_dropout` of the entries zeroed during training (the encoder must infer them);
- encoder: Linear(G, hidden) - ReLU - Linear(hidden, latent) -> z (the embedding);
- decoder: Linear(latent, hidden) - ReLU - Linear(hidden, G) -> softmax proportions, times the
  cell's library size = the NB mean; one learned dispersion per gene (as scVI's "gene" mode);
- loss: the negative-binomial negative log-likelihood of the raw counts, summed over genes and
  averaged over cells; Adam, seeded initialisation and shuffling, CPU.

The embedding is the encoder's output without dropout. The baseline is unsupervised; `spatia
evaluate` fits it, as the PCA baseline, on the split's train cells (`fit_rows`, the cells the
SPATIA model trained on) or on every cell (`EvaluateConfig.baseline_fit`), and embeds every cell.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from spatia.errors import InputDataError
from spatia.expression import library_sizes, log_normalise, median_library
from spatia.model.decoders import nb_log_prob  # the one NB likelihood (the model's gene decoder uses it too)


class CountAutoencoder(nn.Module):
    """MLP autoencoder of log-normalised counts with an NB decoder (see the module docstring)."""

    def __init__(self, n_genes: int, hidden: int = 256, latent: int = 64, input_dropout: float = 0.25):
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout)
        self.encoder = nn.Sequential(nn.Linear(n_genes, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, n_genes))
        self.log_dispersion = nn.Parameter(torch.zeros(n_genes))

    def forward(self, log_expr: torch.Tensor, library: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (B, latent), NB mean (B, G)) for log-normalised input and library sizes (B,)."""
        z = self.encoder(self.input_dropout(log_expr))
        mean = torch.softmax(self.decoder(z), dim=-1) * library[:, None]
        return z, mean

    def loss(self, counts: torch.Tensor, log_expr: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """Mean over cells of the NB negative log-likelihood summed over genes."""
        _, mean = self(log_expr, library)
        return -nb_log_prob(counts, mean, self.log_dispersion.exp()).sum(dim=1).mean()


@dataclass
class AutoencoderFit:
    """The embedding (N, latent) float32 of every cell, the mean loss of each epoch, and the time."""

    embedding: np.ndarray
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit_count_autoencoder(counts: sp.spmatrix | np.ndarray, *, epochs: int = 40, hidden: int = 256, latent: int = 64,
                          input_dropout: float = 0.25, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                          n_threads: int = 1, fit_rows: np.ndarray | None = None) -> AutoencoderFit:
    """Train the count autoencoder on raw `counts` (N, G) and embed every cell.

    `fit_rows` (bool (N,)): train on these cells only (None: every cell); all N are embedded.

    Deterministic for a given seed and thread count (seeded initialisation, dropout and order;
    the global torch RNG state is restored afterwards).
    """
    counts = sp.csr_matrix(counts, dtype=np.float32)
    fit = np.arange(counts.shape[0]) if fit_rows is None else np.flatnonzero(fit_rows)
    n_cells, n_genes = len(fit), counts.shape[1]
    if n_cells < 2 or n_genes < 2:
        raise InputDataError(f"cannot train the count autoencoder on a {n_cells} x {n_genes} matrix",
                             fix="give at least two cells with at least two genes")
    # the normalisation, too, comes from the fitted cells
    log_expr = sp.csr_matrix(log_normalise(counts, target_sum=median_library(counts[fit])))
    library = torch.from_numpy(library_sizes(counts).astype(np.float32))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, n_threads))
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CountAutoencoder(n_genes, hidden, latent, input_dropout)
            optimiser = torch.optim.Adam(model.parameters(), lr=lr)
            order_rng = torch.Generator().manual_seed(seed)
            losses = []
            model.train()
            for _ in range(epochs):
                order = fit[torch.randperm(n_cells, generator=order_rng).numpy()]
                total, seen = 0.0, 0
                for start in range(0, n_cells, batch_size):
                    rows = order[start:start + batch_size]
                    if rows.size < 2:
                        continue
                    x = torch.from_numpy(counts[rows].toarray())
                    xl = torch.from_numpy(log_expr[rows].toarray())
                    loss = model.loss(x, xl, library[rows])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * rows.size
                    seen += rows.size
                losses.append(total / max(seen, 1))
            model.eval()
            parts = []
            with torch.no_grad():
                for start in range(0, counts.shape[0], 4096):
                    xl = torch.from_numpy(log_expr[start:start + 4096].toarray())
                    parts.append(model.encoder(xl).numpy())
    finally:
        torch.set_num_threads(previous_threads)
    embedding = np.concatenate(parts).astype(np.float32)
    if not np.isfinite(embedding).all():
        raise InputDataError("the count autoencoder diverged (non-finite embedding)",
                             fix="lower autoencoder_lr, or check the counts for extreme values")
    return AutoencoderFit(embedding, losses, time.perf_counter() - t0)
