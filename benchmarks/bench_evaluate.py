"""Benchmark `spatia evaluate`: wall time of each task, and the headline metrics.

Two inputs:

    # synthetic AnnData with 6 SPATIA embeddings, 2 level concatenations and the baselines
    # (PCA, count autoencoder, scVI when installed, morphology, PCA + morphology)
    .venv/bin/python benchmarks/bench_evaluate.py --cells 5000 --seeds 3

    # the real Xenium section (10x graph clusters as labels; baselines only, since no SPATIA
    # model has embedded it): reads the bundle, builds a MIST dataset in a temporary folder for
    # the cell crops, evaluates, and writes the report where --report says
    .venv/bin/python benchmarks/bench_evaluate.py --real ../shared/data/xenium_bone_marrow_region1 \
        --report /tmp/bm_report

Prints one JSON line: {"input", "cells", "representations", "seeds", "timings_s": {...},
"figures": {"annotation": {label: {representation: {...}}}, "clustering": ..., "expression": ...,
"imputation": ...}} (`spatia.evaluate.report.summary_figures`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layout", default="umap", choices=["umap", "pca", "none"])
    parser.add_argument("--real", type=Path, default=None, help="a Xenium bundle (uses its graph clusters as labels)")
    parser.add_argument("--max-cells", type=int, default=None)
    parser.add_argument("--report", type=Path, default=None, help="write the report here (must not exist)")
    args = parser.parse_args()

    from spatia.console import configure
    from spatia.evaluate import EvaluateConfig, crops_from_mist, evaluate, write_report
    from spatia.evaluate.report import summary_figures

    configure(quiet=True)
    started = time.perf_counter()
    if args.real is not None:
        from spatia.io.xenium import read_xenium
        from spatia.mist import build_dataset

        adata = read_xenium(args.real).to_anndata()
        labels = "gene_expression_graphclust"
        with tempfile.TemporaryDirectory() as tmp:
            build_dataset([args.real], Path(tmp) / "mist")
            crops = crops_from_mist(Path(tmp) / "mist", adata.obs_names.to_numpy().astype(str))
        adata = adata[adata.obs_names.isin(crops.cell_ids)].copy()  # MIST skips cells without counts
        source = str(args.real)
    else:
        from spatia.evaluate.synthetic import synthetic_evaluation_data

        adata, crops = synthetic_evaluation_data(args.cells, n_genes=300, n_types=8, signal=0.6)
        labels = "cell_type"
        source = "synthetic"
    prepared = time.perf_counter() - started
    config = EvaluateConfig(labels=labels, n_seeds=args.seeds, layout=args.layout, max_cells=args.max_cells)
    results = evaluate(adata, config, crops=crops)
    if args.report is not None:
        write_report(results, args.report)
    line = {
        "input": source,
        "cells": results["dataset"]["n_cells"],
        "labels": results["dataset"]["n_labels"],
        "representations": list(results["embeddings"]),
        "seeds": results["seeds"],
        "split": {k: results["split"][k] for k in ("n_train", "n_test", "n_buffer", "min_train_test_distance_um")},
        "prepare_s": round(prepared, 2),
        "timings_s": results["timings_s"],
        "figures": summary_figures(results),
    }
    json.dump(line, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
