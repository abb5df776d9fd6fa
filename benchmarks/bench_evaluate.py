"""Benchmark `spatia evaluate`: wall time of each task, and the headline metrics.

Two inputs:

    # synthetic AnnData with 6 SPATIA embeddings + 3 baselines (9 representations)
    .venv/bin/python benchmarks/bench_evaluate.py --cells 5000 --seeds 3

    # the real Xenium section (10x graph clusters as labels; baselines only, since no SPATIA
    # model has embedded it): reads the bundle, builds a MIST dataset in a temporary folder for
    # the cell crops, evaluates, and writes the report where --report says
    .venv/bin/python benchmarks/bench_evaluate.py --real ../shared/data/xenium_bone_marrow_region1 \
        --report /tmp/bm_report

Prints one JSON line: {"input", "cells", "representations", "seeds", "timings_s": {...},
"annotation_mlp_macro_f1": {...}, "clustering_leiden_label_free_ari": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _headline(results: dict) -> dict:
    tasks = results["tasks"]
    out: dict = {}
    if tasks["annotation"]["status"] == "ok":
        res = tasks["annotation"]["results"]
        out["annotation_mlp_macro_f1"] = {k: round(v["mlp"]["macro_f1"]["mean"], 3) for k, v in res.items()}
        out["annotation_logreg_macro_f1"] = {k: round(v["logreg"]["macro_f1"]["mean"], 3) for k, v in res.items()}
        out["annotation_mlp_accuracy"] = {k: round(v["mlp"]["accuracy"]["mean"], 3) for k, v in res.items()}
    if tasks["clustering"]["status"] == "ok":
        res = tasks["clustering"]["results"]
        out["clustering_leiden_best_ari"] = {k: round(v["leiden_best"]["ari"]["mean"], 3) for k, v in res.items()}
        out["clustering_leiden_label_free_ari"] = {k: round(v["leiden_label_free"]["ari"]["mean"], 3) for k, v in res.items()}
        out["clustering_leiden_label_free_nmi"] = {k: round(v["leiden_label_free"]["nmi"]["mean"], 3) for k, v in res.items()}
        out["clustering_kmeans_ari"] = {k: round(v["kmeans"]["ari"]["mean"], 3) for k, v in res.items()}
    if tasks["expression"]["status"] == "ok":
        res = tasks["expression"]["results"]
        out["expression_pearson"] = {f"{k}/{m}": round(v[m]["pearson"]["mean"], 3) for k, v in res.items()
                                     for m in ("xgboost", "ridge") if v[m].get("status") == "ok"}
        out["expression_spearman"] = {f"{k}/{m}": round(v[m]["spearman"]["mean"], 3) for k, v in res.items()
                                      for m in ("xgboost", "ridge") if v[m].get("status") == "ok"}
    if tasks["imputation"]["status"] == "ok":
        res = tasks["imputation"]["results"]
        out["imputation_pearson"] = {k: round(v["pearson"]["mean"], 3) for k, v in res.items() if v["status"] == "ok"}
        out["imputation_pearson_per_gene"] = {k: round(v["pearson_per_gene"]["mean"], 3) for k, v in res.items()
                                              if v["status"] == "ok"}
    return out


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
        **_headline(results),
    }
    json.dump(line, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
