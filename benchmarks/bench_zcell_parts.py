"""What each term of z_cell knows: the image<-gene cross-attention output, the gene residual and
the morphometry input, scored apart and summed, on a trained model.

z_cell = mean(CrossAttn(image queries, gene tokens)) + W_g profile + w W_m measures
(docs/model.md). This script embeds every cell of a MIST dataset with a checkpoint, as `spatia
embed` does, takes the three terms apart at the cell fusion, and scores each term and sums of
them by Leiden ARI (best resolution, as `spatia evaluate`) against a label column:

    .venv/bin/python benchmarks/bench_zcell_parts.py WORK --label gene_expression_graphclust

With `--modality image` the cells are embedded with their genes withheld (the image-only cell
level, `X_spatia_image_cell`): the gene residual is then its bias alone, and the rows scored are
z_cell, the cross-attention output, the morphometry term, the standardised measures that feed
it, attention and morphometry side by side, and the hand-made morphology features of the crops
(`spatia.evaluate.morphology`), each also by annotation (MLP and logistic regression macro-F1)
and expression from morphology (XGBoost and ridge Pearson over the top 50 genes) on the
dataset's split, with `spatia evaluate`'s task functions and defaults:

    .venv/bin/python benchmarks/bench_zcell_parts.py WORK --label gene_expression_graphclust --modality image

WORK is a `bench_representation.py --work` folder (WORK/mist, WORK/run/checkpoints/last.ckpt,
WORK/cells.h5ad with the labels). Prints one JSON line: {"work", "label", "modality",
"variance": {term: summed per-dimension variance}, "leiden_best_ari": {representation: ARI}},
with --modality image also "mlp_macro_f1", "logreg_macro_f1", "xgboost_pearson" and
"ridge_pearson" per representation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def z_cell_terms(model, dataset, levels, modality: str = "both") -> dict[str, np.ndarray]:
    """{"z_cell", "attention", "gene_residual", "morphometry", "measures"}: (N, D) float32 in the
    dataset's cell order (measures (N, F): the standardised input of the morphometry term);
    "attention" is z_cell minus the two residual terms."""
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
    rows, terms = [], {"z_cell": [], "attention": [], "gene_residual": [], "morphometry": [], "measures": []}
    try:
        with torch.no_grad():
            for i in range(len(batches)):
                batch = batches[i]
                batch.pop("keep")
                rows.append(batch.pop("cell_row").numpy())
                model.embed(batch, modality=modality, levels=levels)
                _, _, _, profile, measures = captured["args"]
                z_cell = captured["output"][1]
                gene = fusion.gene_summary(profile)
                morph = fusion.morphometry(measures)
                standardised = (measures.float() - fusion.morphometry.mean) / fusion.morphometry.std
                for key, value in (("z_cell", z_cell), ("gene_residual", gene), ("morphometry", morph),
                                   ("attention", z_cell - gene - morph), ("measures", standardised)):
                    terms[key].append(value.numpy())
    finally:
        handle.remove()
    order = np.argsort(np.concatenate(rows))
    return {key: np.concatenate(parts)[order] for key, parts in terms.items()}


def image_only_scores(reps: dict[str, np.ndarray], cells, names: np.ndarray, labels: np.ndarray,
                      config) -> dict[str, dict[str, float]]:
    """MLP / logistic-regression macro-F1 and XGBoost / ridge Pearson of expression from each
    representation, on the dataset's split (obs "split" of the cells)."""
    from spatia.evaluate.tasks.annotation import annotation_task
    from spatia.evaluate.tasks.expression import expression_task
    from spatia.expression import counts_from_anndata, log_normalise

    subset = cells[names].to_memory()
    split = subset.obs["split"].astype(str).to_numpy()
    log_expr = log_normalise(counts_from_anndata(subset))
    ann = annotation_task(reps, labels, split, config)["results"]
    expr = expression_task(reps, log_expr, subset.var_names.to_numpy().astype(str), split, config)["results"]
    return {
        "mlp_macro_f1": {k: round(v["mlp"]["macro_f1"]["mean"], 4) for k, v in ann.items()},
        "logreg_macro_f1": {k: round(v["logreg"]["macro_f1"]["mean"], 4) for k, v in ann.items()},
        "xgboost_pearson": {k: round(v["xgboost"]["pearson"]["mean"], 4) for k, v in expr.items()},
        "ridge_pearson": {k: round(v["ridge"]["pearson"]["mean"], 4) for k, v in expr.items()},
    }


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
    parser.add_argument("--n-seeds", type=int, default=2, help="Leiden (and MLP) seeds")
    parser.add_argument("--seed", type=int, default=0,
                        help="first evaluation seed (bench_representation.py uses its run's --seed)")
    parser.add_argument("--modality", choices=("both", "image"), default="both",
                        help="embed with both modalities, or with the genes withheld (image-only)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, info = load_model(args.work / "run" / "checkpoints" / "last.ckpt")
    model.eval()
    dataset = MultiScaleDataset(args.work / "mist", split=None)
    terms = z_cell_terms(model, dataset, info.levels, modality=args.modality)
    cells = ad.read_h5ad(args.work / "cells.h5ad", backed="r")
    if args.label not in cells.obs:
        raise SystemExit(f"{args.work / 'cells.h5ad'}: no obs column '{args.label}'")
    names = np.asarray(cell_names(dataset.cell_index))
    labels = cells.obs[args.label].reindex(names)
    labels = labels.astype(object).where(labels.notna(), None).to_numpy()
    config = EvaluateConfig(labels=(args.label,), n_seeds=args.n_seeds, seed=args.seed)
    variance = {k: round(float(v.var(axis=0).sum()), 3) for k, v in terms.items()}
    if args.modality == "both":
        reps = {k: v for k, v in terms.items() if k != "measures"}
        reps["attention+gene_residual"] = terms["attention"] + terms["gene_residual"]
        reps["gene_residual+morphometry"] = terms["gene_residual"] + terms["morphometry"]
    else:
        from spatia.evaluate.baselines import standardise_features
        from spatia.evaluate.crops import align_crops, crops_from_mist
        from spatia.evaluate.morphology import morphology_features

        crops = crops_from_mist(args.work / "mist")
        images, masks = align_crops(crops, names)
        hand_made = morphology_features(images, masks, channel_names=crops.channel_names).to_numpy()
        reps = {k: terms[k] for k in ("z_cell", "attention", "morphometry", "measures")}
        reps["attention|morphometry"] = np.hstack([terms["attention"], terms["morphometry"]])
        reps["hand_made"] = standardise_features(hand_made)
        config = EvaluateConfig(labels=(args.label,), n_seeds=args.n_seeds, seed=args.seed,
                                expression_inputs=tuple(reps))
    result = clustering_task(reps, {args.label: labels}, config)
    scores = result[0][args.label]["results"]
    out = {"work": str(args.work), "label": args.label, "modality": args.modality, "variance": variance,
           "leiden_best_ari": {k: round(v["leiden_best"]["ari"]["mean"], 4) for k, v in scores.items()}}
    if args.modality == "image":
        out.update(image_only_scores(reps, cells, names, labels, config))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
