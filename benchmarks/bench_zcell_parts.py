"""What each term of z_cell knows: the image<-gene cross-attention output, the gene residual and
the morphometry input, scored apart and summed, on a trained model.

z_cell = mean(CrossAttn(image queries, gene tokens)) + W_g profile + w W_m measures
(docs/model.md). This script embeds every cell of a MIST dataset with a checkpoint, as `spatia
embed` does, takes the three terms apart at the cell fusion, and scores each term and sums of
them by Leiden ARI (best resolution, as `spatia evaluate`) against a label column:

    .venv/bin/python benchmarks/bench_zcell_parts.py WORK --label gene_expression_graphclust

WORK is a `bench_representation.py --work` folder (WORK/mist, WORK/run/checkpoints/last.ckpt,
WORK/cells.h5ad with the labels). Prints one JSON line: {"work", "label", "variance": {term:
summed per-dimension variance}, "leiden_best_ari": {representation: ARI}}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def z_cell_terms(model, dataset, levels) -> dict[str, np.ndarray]:
    """{"z_cell", "attention", "gene_residual", "morphometry"}: (N, D) float32 in the dataset's
    cell order; "attention" is z_cell minus the two residual terms."""
    from spatia.train.data import EmbeddingDataset, embedding_batches

    fusion = model.cell_fusion
    if fusion.gene_summary is None or fusion.morphometry is None:
        raise SystemExit("the checkpoint's model has no gene residual or no morphometry input to take apart")
    captured: dict = {}

    def hook(module, args, kwargs, output):
        captured["args"], captured["output"] = args, output

    handle = fusion.register_forward_hook(hook, with_kwargs=True)
    plans = embedding_batches(dataset, np.ones(len(dataset.cell_index), dtype=bool), 512)
    batches = EmbeddingDataset(dataset, plans)
    rows, terms = [], {"z_cell": [], "attention": [], "gene_residual": [], "morphometry": []}
    try:
        with torch.no_grad():
            for i in range(len(batches)):
                batch = batches[i]
                batch.pop("keep")
                rows.append(batch.pop("cell_row").numpy())
                model.embed(batch, levels=levels)
                _, _, _, profile, measures = captured["args"]
                z_cell = captured["output"][1]
                gene = fusion.gene_summary(profile)
                morph = fusion.morphometry(measures)
                for key, value in (("z_cell", z_cell), ("gene_residual", gene), ("morphometry", morph),
                                   ("attention", z_cell - gene - morph)):
                    terms[key].append(value.numpy())
    finally:
        handle.remove()
    order = np.argsort(np.concatenate(rows))
    return {key: np.concatenate(parts)[order] for key, parts in terms.items()}


def main() -> None:
    import anndata as ad

    from spatia.evaluate.config import EvaluateConfig
    from spatia.evaluate.tasks.clustering import clustering_task
    from spatia.mist.datasets import MultiScaleDataset
    from spatia.train.checkpoints import load_model
    from spatia.train.embed import cell_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="a bench_representation.py --work folder")
    parser.add_argument("--label", required=True, help="obs column of WORK/cells.h5ad to score")
    parser.add_argument("--n-seeds", type=int, default=2, help="Leiden seeds")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, info = load_model(args.work / "run" / "checkpoints" / "last.ckpt")
    model.eval()
    dataset = MultiScaleDataset(args.work / "mist", split=None)
    terms = z_cell_terms(model, dataset, info.levels)
    cells = ad.read_h5ad(args.work / "cells.h5ad", backed="r")
    if args.label not in cells.obs:
        raise SystemExit(f"{args.work / 'cells.h5ad'}: no obs column '{args.label}'")
    labels = cells.obs[args.label].reindex(np.asarray(cell_names(dataset.cell_index)))
    labels = labels.astype(object).where(labels.notna(), None).to_numpy()
    reps = dict(terms)
    reps["attention+gene_residual"] = terms["attention"] + terms["gene_residual"]
    reps["gene_residual+morphometry"] = terms["gene_residual"] + terms["morphometry"]
    result = clustering_task(reps, {args.label: labels}, EvaluateConfig(labels=(args.label,), n_seeds=args.n_seeds))
    scores = result[0][args.label]["results"]
    print(json.dumps({
        "work": str(args.work), "label": args.label,
        "variance": {k: round(float(v.var(axis=0).sum()), 3) for k, v in terms.items()},
        "leiden_best_ari": {k: round(v["leiden_best"]["ari"]["mean"], 4) for k, v in scores.items()},
    }))


if __name__ == "__main__":
    main()
