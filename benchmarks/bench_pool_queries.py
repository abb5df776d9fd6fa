"""Which queries should pool z_cell's gene tokens? Scored after training, on a checkpoint whose
cell fusion pools through the image tokens alone (`fusion.image_query_weight` 1).

The cell fusion's pool is `w mean(image queries) + (1 - w) gene query` (docs/model.md). This
script gives a trained model the gene query it never had, fixed to the constant query of its
own gene-only view (the cell ViT's CLS token with every patch hidden, through the fusion's
query projection), embeds every cell with w = 1 (as trained), 0 (the constant query alone) and
the checkpoint's measured morphometry weight, and scores each cell level (`X_spatia_cell`) and
unified embedding by annotation (MLP and logistic regression macro-F1, `spatia evaluate`'s
task and defaults) on the dataset's split:

    .venv/bin/python benchmarks/bench_pool_queries.py WORK --label gene_expression_graphclust --seed 3

WORK is a `bench_representation.py --work` folder (WORK/mist, WORK/run/checkpoints/last.ckpt).
`--seed S` evaluates with seeds S and S + 1, as the benchmark run of seed S did. Prints one JSON
line: {"work", "label", "morphometry_weight", "mlp_macro_f1": {row: F1}, "logreg_macro_f1": ...}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def constant_query(model) -> torch.Tensor:
    """(1, 1, D): the cell fusion's query for a cell whose every image patch is hidden."""
    size, channels = model.config.image.cell_size_px, model.config.image.channels
    with torch.no_grad():
        tokens = model._encode_images("cell", torch.zeros(1, channels, size, size), 1.0, None)["tokens"]
        return model.cell_fusion.query_proj(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("--label", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spatia.evaluate.config import EvaluateConfig
    from spatia.evaluate.tasks.annotation import annotation_task
    from spatia.train.checkpoints import load_model
    from spatia.train.embed import embed_model

    model, info = load_model(f"{args.work}/run/checkpoints/last.ckpt")
    fusion = model.cell_fusion
    if fusion.gene_query is not None:
        raise SystemExit("this checkpoint already pools with a gene query; give one trained with image_query_weight 1")
    weight = float(model.config.fusion.morphometry_weight)
    fusion.gene_query = torch.nn.Parameter(constant_query(model))
    reps: dict[str, np.ndarray] = {}
    for name, share in (("image queries (as trained)", 1.0), ("constant query", 0.0),
                        (f"w image + (1 - w) constant, w = {weight}", weight)):
        fusion.image_query_share = share
        adata = embed_model(f"{args.work}/mist", model, None, levels=info.levels, progress_bar=False).adata
        reps[f"cell: {name}"] = adata.obsm["X_spatia_cell"]
        reps[f"unified: {name}"] = adata.obsm["X_spatia"]
    labels = adata.obs[args.label].to_numpy().astype(object)
    labels[adata.obs[args.label].isna().to_numpy()] = None
    config = EvaluateConfig(labels=(args.label,), split="split", seed=args.seed, n_seeds=2, layout="none")
    results = annotation_task(reps, labels, adata.obs["split"].to_numpy().astype(str), config)["results"]
    print(json.dumps({
        "work": args.work, "label": args.label, "morphometry_weight": weight,
        "mlp_macro_f1": {k: round(v["mlp"]["macro_f1"]["mean"], 4) for k, v in results.items()},
        "logreg_macro_f1": {k: round(v["logreg"]["macro_f1"]["mean"], 4) for k, v in results.items()},
    }))


if __name__ == "__main__":
    main()
