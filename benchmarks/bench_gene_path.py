"""The gene path of SPATIA alone, against the count autoencoder: how the expression normalisation,
the read of the gene encoder and the gene mask ratio decide what the embedding knows.

Trains the model's own gene encoder (`spatia.model.gene.GeneEncoder`) and negative-binomial gene
decoder (`spatia.model.decoders`), without images, on the train cells of a `spatia embed` output
(obs `split`), embeds every cell, and scores each variant as `spatia evaluate` does (MLP and
logistic macro-F1 on the test cells, Leiden ARI), beside the count autoencoder fit on the same
train cells. The measurements behind `gene.target_sum`, the gene residual's input and
`gene.mask_ratio` (docs/model.md, "library target, profile residual, gene mask ratio"):

    .venv/bin/python benchmarks/bench_gene_path.py WORK/cells.h5ad --label gene_expression_graphclust

Variants (--variants, comma-separated; each a '+'-joined list of switches):
    linear     the profile embedding before the attention (the gene residual's input; default)
    token      the profile token after the attention (the residual's input before 2026-11-30)
    t1e4       library target 10,000 instead of the median library of the train cells
    m0 / m25   gene mask ratio 0 / 0.25 instead of 0.5
    ae         the count autoencoder baseline (spatia.evaluate.autoencoder)

Prints one JSON line per variant: {"variant", "target_sum", "mask_ratio", "read", "steps",
"train_seconds", "mlp_macro_f1", "logreg_macro_f1", "leiden_best_ari"}. Training uses one
thread, AdamW at 1e-3 with weight decay 0.05, 50 warm-up steps and a cosine decay to 0.1 over
--steps, batches of 128 cells, gradient clipping at 1 (the tiny config's recipe).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from spatia.evaluate.autoencoder import fit_count_autoencoder
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.tasks.annotation import annotation_task
from spatia.evaluate.tasks.clustering import clustering_task
from spatia.expression import median_library
from spatia.keys import TRAIN
from spatia.model.config import GeneConfig, GeneDecoderConfig
from spatia.model.decoders import GeneDecoder, gene_loss
from spatia.model.gene import GeneEncoder, normalize_counts, select_genes, split_masked
from spatia.train.data import TOKEN_CAP_PERCENTILE


class GenePath(nn.Module):
    """Gene encoder -> a linear map of its profile read -> the NB decoder (the model's gene path)."""

    def __init__(self, n_genes: int, *, target_sum: float, mask_ratio: float, read: str, token_cap: int | None):
        super().__init__()
        self.config = GeneConfig(max_tokens=token_cap, target_sum=target_sum, mask_ratio=mask_ratio)
        self.read = read
        self.encoder = GeneEncoder(self.config, n_genes)
        self.encoder.reset_parameters()
        self.summary = nn.Linear(self.config.dim, self.config.dim)
        self.decoder = GeneDecoder(GeneDecoderConfig(), self.config.dim, n_genes)
        self.decoder.reset_parameters()

    def embed(self, counts: torch.Tensor, *, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        measured = torch.ones_like(counts, dtype=torch.bool)
        values = normalize_counts(counts, measured, self.config.library_target())
        selection = select_genes(values, measured, self.config.max_tokens, randomize=training,
                                 zero_priority=self.encoder.zero_priority, generator=generator)
        kept, _ = split_masked(selection, self.config.mask_ratio if training else 0.0, generator=generator)
        encoding = self.encoder(kept.index, kept.take(values), kept.valid)
        read = encoding.profile if self.read == "linear" else encoding.tokens[:, 0]
        return self.summary(read)

    def loss(self, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = self.embed(counts, training=True, generator=generator)
        measured = torch.ones_like(counts, dtype=torch.bool)
        return gene_loss(self.decoder(z, "cell"), self.decoder.dispersion("cell"), counts, measured)[0]


def train_gene_path(model: GenePath, counts: sp.csr_matrix, train_rows: np.ndarray, *, steps: int, seed: int,
                    batch_cells: int = 128) -> np.ndarray:
    """Train on `train_rows`; return the (N, dim) embedding of every cell (deterministic read)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / 50)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        rows = rng.choice(train_rows, size=min(batch_cells, train_rows.size), replace=False)
        loss = model.loss(torch.from_numpy(counts[rows].toarray()), generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        parts = [model.embed(torch.from_numpy(counts[i:i + 2048].toarray()), training=False).numpy()
                 for i in range(0, counts.shape[0], 2048)]
    return np.concatenate(parts)


def main() -> None:
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("h5ad", type=Path, help="a `spatia embed` output (raw counts in .X, obs 'split')")
    parser.add_argument("--label", required=True, help="obs column to score (e.g. gene_expression_graphclust)")
    parser.add_argument("--variants", default="ae,linear,token,linear+t1e4,linear+m25")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-seeds", type=int, default=2, help="seeds of the evaluation's classifiers")
    args = parser.parse_args()
    torch.set_num_threads(1)

    adata = ad.read_h5ad(args.h5ad)
    if "spatia_embedded" in adata.obs:
        adata = adata[adata.obs["spatia_embedded"].to_numpy(bool)].copy()
    for column in ("split", args.label):
        if column not in adata.obs:
            raise SystemExit(f"{args.h5ad}: no obs column '{column}'; give a `spatia embed` output and a label "
                             "column it holds")
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    split = adata.obs["split"].astype(str).to_numpy()
    labels = adata.obs[args.label].astype(object).where(adata.obs[args.label].notna(), None).to_numpy()
    train_rows = np.flatnonzero(split == TRAIN)
    library = median_library(counts[train_rows])
    nonzero = np.diff(counts[train_rows].indptr)
    token_cap = int(np.ceil(np.percentile(nonzero, TOKEN_CAP_PERCENTILE)))
    config = EvaluateConfig(labels=(args.label,), n_seeds=args.n_seeds, seed=args.seed)

    for variant in args.variants.split(","):
        switches = set(variant.split("+"))
        t0 = time.perf_counter()
        if switches == {"ae"}:
            embedding = fit_count_autoencoder(counts, fit_rows=split == TRAIN, seed=args.seed).embedding
            target, mask, read = library, None, "autoencoder"
        else:
            unknown = switches - {"linear", "token", "t1e4", "m0", "m25"}
            if unknown:
                raise SystemExit(f"unknown variant switch(es) {sorted(unknown)} in '{variant}'")
            target = 1e4 if "t1e4" in switches else library
            mask = 0.0 if "m0" in switches else 0.25 if "m25" in switches else 0.5
            read = "token" if "token" in switches else "linear"
            model = GenePath(counts.shape[1], target_sum=target, mask_ratio=mask, read=read, token_cap=token_cap)
            embedding = train_gene_path(model, counts, train_rows, steps=args.steps, seed=args.seed)
        seconds = time.perf_counter() - t0
        annotation = annotation_task({variant: embedding}, labels, split, config)["results"][variant]
        clustering = clustering_task({variant: embedding}, {args.label: labels}, config)[0][args.label]
        print(json.dumps({
            "variant": variant, "target_sum": round(target, 3), "mask_ratio": mask, "read": read,
            "steps": None if read == "autoencoder" else args.steps, "train_seconds": round(seconds, 1),
            "mlp_macro_f1": round(annotation["mlp"]["macro_f1"]["mean"], 4),
            "logreg_macro_f1": round(annotation["logreg"]["macro_f1"]["mean"], 4),
            "leiden_best_ari": round(clustering["results"][variant]["leiden_best"]["ari"]["mean"], 4),
        }), flush=True)


if __name__ == "__main__":
    main()
