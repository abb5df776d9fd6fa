"""Differential expression signatures of transitions (paper appendix D.3, Eq. 11).

For a transition tau with pairs P_tau = {(i, pi(i))}:

    Delta g_tau = 1 / |P_tau| * sum_{(i, j) in P_tau} (g_j - g_i)

computed on log-normalised expression (`spatia.expression.log_normalise`: log1p of
counts scaled to the median library size), so Delta g is a natural-log fold change of
normalised expression, averaged over pairs. A target matched by several controls counts once
per pair, as in Eq. 11.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class Signatures:
    """Per-transition signatures over the gene panel.

    transitions, tasks: (T,) names; genes: (G,) names.
    delta: (T, G) float64, Delta g (Eq. 11) = mean_tgt - mean_ctrl.
    mean_ctrl, mean_tgt: (T, G) float64 mean log-normalised expression over the pairs' controls
      and targets (targets with multiplicity). n_pairs: (T,) int64.
    """

    transitions: list[str]
    tasks: list[str]
    genes: list[str]
    delta: np.ndarray
    mean_ctrl: np.ndarray
    mean_tgt: np.ndarray
    n_pairs: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (transition, gene), sorted by transition then decreasing delta_g."""
        n_t, n_g = self.delta.shape
        frame = pd.DataFrame({
            "transition_tag": np.repeat(np.asarray(self.transitions, dtype=object), n_g),
            "task_name": np.repeat(np.asarray(self.tasks, dtype=object), n_g),
            "gene": np.tile(np.asarray(self.genes, dtype=object), n_t),
            "delta_g": self.delta.ravel(),
            "mean_ctrl": self.mean_ctrl.ravel(),
            "mean_tgt": self.mean_tgt.ravel(),
            "n_pairs": np.repeat(self.n_pairs, n_g),
        })
        order = {name: k for k, name in enumerate(self.transitions)}
        frame["_t"] = frame["transition_tag"].map(order)
        frame = frame.sort_values(["_t", "delta_g"], ascending=[True, False], kind="stable")
        return frame.drop(columns="_t").reset_index(drop=True)

    def top_genes(self, transition: str, k: int = 10, direction: str = "up") -> list[str]:
        """The k genes with the largest (direction "up") or smallest ("down") Delta g."""
        row = self.delta[self.transitions.index(transition)]
        order = np.argsort(-row if direction == "up" else row, kind="stable")
        return [self.genes[i] for i in order[:k]]

    def write(self, directory: str | Path) -> list[Path]:
        """Write signatures.parquet (long table) and signatures.npz (arrays + names) into `directory`."""
        directory = Path(directory)
        table = directory / "signatures.parquet"
        arrays = directory / "signatures.npz"
        self.to_frame().to_parquet(table, index=False)
        np.savez_compressed(
            arrays,
            delta=self.delta,
            mean_ctrl=self.mean_ctrl,
            mean_tgt=self.mean_tgt,
            n_pairs=self.n_pairs,
            transitions=np.asarray(self.transitions, dtype=str),
            tasks=np.asarray(self.tasks, dtype=str),
            genes=np.asarray(self.genes, dtype=str),
        )
        return [table, arrays]

    @classmethod
    def read_npz(cls, path: str | Path) -> Signatures:
        """Read a signatures.npz written by `write`."""
        with np.load(path) as data:
            return cls(
                transitions=data["transitions"].tolist(),
                tasks=data["tasks"].tolist(),
                genes=data["genes"].tolist(),
                delta=data["delta"],
                mean_ctrl=data["mean_ctrl"],
                mean_tgt=data["mean_tgt"],
                n_pairs=data["n_pairs"],
            )


def compute_signatures(
    expression: np.ndarray | sp.spmatrix,
    genes: list[str],
    ctrl_rows: np.ndarray,
    tgt_rows: np.ndarray,
    pair_transition: np.ndarray,
    transitions: list[str],
    tasks: list[str],
) -> Signatures:
    """Eq. 11 for every transition at once.

    expression: (cells, G) log-normalised expression (dense or sparse).
    ctrl_rows, tgt_rows: (P,) row indices into `expression` of each pair's control and target.
    pair_transition: (P,) int, index into `transitions` of each pair.
    The means are two sparse (T x cells) @ (cells x G) products with weights 1 / |P_tau|.
    """
    n_t, n_cells = len(transitions), expression.shape[0]
    pair_transition = np.asarray(pair_transition, dtype=np.int64)
    n_pairs = np.bincount(pair_transition, minlength=n_t).astype(np.int64)
    weight = 1.0 / np.maximum(n_pairs, 1)

    def means(rows: np.ndarray) -> np.ndarray:
        w = sp.csr_matrix((weight[pair_transition], (pair_transition, np.asarray(rows, dtype=np.int64))),
                          shape=(n_t, n_cells))  # duplicates are summed: a reused target counts per pair
        product = w @ expression
        return np.asarray(product.toarray() if sp.issparse(product) else product, dtype=np.float64)

    mean_ctrl, mean_tgt = means(ctrl_rows), means(tgt_rows)
    return Signatures(
        transitions=list(transitions),
        tasks=list(tasks),
        genes=list(genes),
        delta=mean_tgt - mean_ctrl,
        mean_ctrl=mean_ctrl,
        mean_tgt=mean_tgt,
        n_pairs=n_pairs,
    )
