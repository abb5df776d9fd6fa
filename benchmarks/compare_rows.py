"""Paired bootstrap of any two rows of the annotation task, on a `bench_representation.py --work`
folder: is the gene-only embedding above the count autoencoder? above `X_spatia`?

    .venv/bin/python benchmarks/compare_rows.py WORK --seed S --n-seeds 2 \
        --pair X_spatia_gene:autoencoder --pair X_spatia_gene:X_spatia

`spatia evaluate` bootstraps only the verdicts' pairs (`X_spatia` against the best baseline, the
image-only row against the hand-made features). This script scores the rows named by --pair with
the benchmark's settings (the dataset's split, evaluation seeds S, S+1, ...; the baselines fit on
the train cells) and prints one JSON line: each row's MLP macro-F1 (mean over the seeds) and, per
pair, the difference with its 95 % interval over the test cells (`spatia.evaluate.bootstrap`).
With the same --seed and --n-seeds as the benchmark run, the rows it shares with the benchmark
come out identical to its figures.

WORK holds `cells.h5ad`, `mist/` and `run/checkpoints/last.ckpt`; the image-only and gene-only
views (`X_spatia_image*`, `X_spatia_gene`) are embedded from the checkpoint when a pair needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="a bench_representation.py --work folder")
    parser.add_argument("--label", default="gene_expression_graphclust", help="obs label column")
    parser.add_argument("--pair", action="append", required=True,
                        help="ROW_A:ROW_B, scored as A minus B (repeatable); rows: obsm keys X_spatia*, and the "
                             "learned baselines pca, autoencoder, scvi")
    parser.add_argument("--seed", type=int, default=0, help="the benchmark run's --seed")
    parser.add_argument("--n-seeds", type=int, default=3, help="the benchmark run's --n-seeds")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args()
    pairs = [tuple(p.split(":")) for p in args.pair]
    if any(len(p) != 2 for p in pairs):
        parser.error("--pair takes ROW_A:ROW_B, e.g. X_spatia_gene:autoencoder")

    import anndata as ad
    from threadpoolctl import threadpool_limits

    from spatia.console import configure
    from spatia.evaluate import (
        EvaluateConfig,
        add_image_only_embeddings,
        add_modality_embedding,
    )
    from spatia.evaluate.bootstrap import paired_difference
    from spatia.evaluate.config import BASELINES
    from spatia.evaluate.inputs import (
        build_representations,
        embedded_cells,
        make_split,
        read_labels,
    )
    from spatia.evaluate.tasks.annotation import annotation_task
    from spatia.expression import counts_from_anndata, log_normalise
    from spatia.train import embed_dataset

    configure(quiet=True)
    rows = sorted({row for pair in pairs for row in pair})
    adata = ad.read_h5ad(args.work / "cells.h5ad")
    checkpoint, mist = args.work / "run" / "checkpoints" / "last.ckpt", args.work / "mist"
    if any(r.startswith("X_spatia_image") for r in rows) and "X_spatia_image" not in adata.obsm:
        add_image_only_embeddings(adata, embed_dataset(mist, checkpoint, None, modality="image",
                                                       progress_bar=False).adata)
    if "X_spatia_gene" in rows and "X_spatia_gene" not in adata.obsm:
        add_modality_embedding(adata, embed_dataset(mist, checkpoint, None, modality="gene", progress_bar=False).adata,
                               "X_spatia_gene")
    config = EvaluateConfig(labels=args.label, split="split", seed=args.seed, n_seeds=args.n_seeds, layout="none",
                            embeddings=tuple(r for r in rows if r not in BASELINES), level_concatenations=(),
                            baselines=tuple(r for r in rows if r in BASELINES), tasks=("annotation",))
    config.validate()
    with threadpool_limits(limits=config.n_jobs):
        adata = embedded_cells(adata)
        labels = read_labels(adata, args.label)
        counts = counts_from_anndata(adata)
        split, _ = make_split(adata, config)
        reps, _ = build_representations(adata, config, counts, log_normalise(counts), None, split)
        kept: dict = {}
        entry = annotation_task(reps, labels, split, config, keep=kept)
    if entry.get("status") != "ok":
        sys.exit(f"annotation did not run: {entry.get('status')}")
    line = {
        "work": str(args.work), "label": args.label, "seeds": config.seeds,
        "n_train": entry["n_train"], "n_test": entry["n_test"],
        "mlp_macro_f1": {k: round(v["mlp"]["macro_f1"]["mean"], 4) for k, v in entry["results"].items()},
        "pairs": [{"a": a, "b": b, **paired_difference(kept[a]["mlp"], kept[b]["mlp"], args.resamples, args.seed)}
                  for a, b in pairs],
    }
    json.dump(line, sys.stdout, default=float)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
