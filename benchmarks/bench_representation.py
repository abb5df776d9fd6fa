"""Benchmark the representation end to end: simulate (or read a bundle), build, pretrain with the
defaults, embed (both modalities, image-only, gene-only), evaluate every representation against
the baselines (PCA, count autoencoder, scVI when installed, morphology) in one run.

    # simulated section (ground truth: cell type, state, domain)
    .venv/bin/python benchmarks/bench_representation.py --cells 20000 --seed 0

    # a real Xenium bundle, its 10x clusters as labels
    .venv/bin/python benchmarks/bench_representation.py --bundle ../shared/data/xenium_bone_marrow_region1 \
        --labels gene_expression_graphclust --steps 300

Options: --steps and --lr override the training steps and learning rate (default: the model
config's); --n-seeds seeds of the stochastic evaluation models; --work keeps the intermediate
files there (default: a temporary folder, removed); --reuse-work embeds and evaluates the
dataset and checkpoint an earlier run left in --work (no simulate, build or training); --report
writes the evaluation report there.

Prints one JSON line: {"input", "cells", "steps", "seed", "seconds": {simulate, build, train,
embed, evaluate}, "train_cells_per_second", "representations", "figures": summary_figures(...),
"margins": X_spatia minus the best baseline per label column}. Labels derived from expression
(10x clusters) favour expression-only methods. Of the simulator's labels, the domain and the
niche-dependent state (`niche_state`: a target state split by the share of its niche domain
around the cell) need context; its states are written into each cell's own expression.

Calls the library's stage functions: spatia.sim.simulate_bundle, spatia.mist.build_dataset,
spatia.train.pretrain / embed_dataset, spatia.evaluate.evaluate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIMULATED_LABELS = ("truth_cell_type", "truth_state", "truth_domain", "truth_niche_state")
BUNDLE_LABELS = ("gene_expression_graphclust",)  # the embeddings name clusterings as the reader does
BASELINE_KEYS = ("pca", "autoencoder", "scvi")


def _margins(figures: dict) -> dict:
    """Per label column: X_spatia's and X_spatia_cell's MLP macro-F1 minus each baseline's."""
    out = {}
    for column, per_rep in figures.get("annotation", {}).items():
        row = {}
        for key in ("X_spatia", "X_spatia_cell", "X_spatia_cell+niche+tissue"):
            if key not in per_rep:
                continue
            for base in BASELINE_KEYS:
                if base in per_rep and per_rep[key]["mlp_macro_f1"] is not None:
                    row[f"{key} - {base}"] = round(per_rep[key]["mlp_macro_f1"] - per_rep[base]["mlp_macro_f1"], 4)
        out[column] = row
    return out


@dataclass
class _ReusedRun:
    """The parts of a `PretrainResult` the benchmark reads, for a run left in --work."""

    last_checkpoint: Path
    global_step: int
    metrics: dict

    @classmethod
    def from_work(cls, work: Path) -> _ReusedRun:
        from spatia.train import read_checkpoint  # checks that `spatia pretrain` wrote it

        checkpoint = work / "run" / "checkpoints" / "last.ckpt"
        return cls(checkpoint, int(read_checkpoint(checkpoint)["global_step"]), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="a Xenium bundle (default: simulate one)")
    parser.add_argument("--labels", action="append", default=None, help="obs label column (repeatable)")
    parser.add_argument("--cells", type=int, default=20_000, help="cells to simulate")
    parser.add_argument("--genes", type=int, default=300, help="genes to simulate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    parser.add_argument("--n-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for pretraining")
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate files here (must not exist)")
    parser.add_argument("--report", type=Path, default=None, help="write the evaluation report here")
    parser.add_argument("--cell-orientations", type=int, choices=(0, 1), default=None,
                        help="train.cell_orientations: turn the training crops at random (default: the config's)")
    parser.add_argument("--embed-orientations", type=int, default=None,
                        help="image.embed_orientations used to embed (default: the checkpoint's)")
    parser.add_argument("--reuse-work", action="store_true",
                        help="re-embed and re-evaluate the dataset and checkpoint an earlier run left in --work")
    args = parser.parse_args()

    from spatia.console import configure
    from spatia.evaluate import (
        EvaluateConfig,
        add_image_only_embeddings,
        add_modality_embedding,
        crops_from_mist,
        evaluate,
        niche_crops_from_mist,
        write_report,
    )
    from spatia.evaluate.report import summary_figures
    from spatia.mist import build_dataset
    from spatia.train import embed_dataset, pretrain

    configure(quiet=True)
    seconds: dict[str, float] = {}
    work = args.work if args.work is not None else Path(tempfile.mkdtemp(prefix="bench_representation_"))
    reuse = args.reuse_work and (work / "run" / "checkpoints" / "last.ckpt").is_file()
    if args.reuse_work and not reuse:
        parser.error(f"--reuse-work: {work}/run/checkpoints/last.ckpt does not exist (run once with --work {work})")
    work.mkdir(parents=True, exist_ok=args.work is None or reuse)
    try:
        if args.bundle is None:
            bundle = work / "bundle"
            labels = tuple(args.labels or SIMULATED_LABELS)
            source = f"simulated {args.cells} cells, {args.genes} genes, seed {args.seed}"
            if not reuse:
                from spatia.sim import SimulationConfig, simulate_bundle

                t0 = time.perf_counter()
                simulate_bundle(bundle, SimulationConfig(n_cells=args.cells, n_genes=args.genes), seed=args.seed)
                seconds["simulate"] = time.perf_counter() - t0
        else:
            bundle = args.bundle
            labels = tuple(args.labels or BUNDLE_LABELS)
            source = str(args.bundle)

        mist = work / "mist"
        if reuse:  # the dataset and checkpoint of an earlier run with the same --work
            run = _ReusedRun.from_work(work)
            (work / "cells.h5ad").unlink(missing_ok=True)
        else:
            t0 = time.perf_counter()
            build_dataset([bundle], mist, seed=args.seed)
            seconds["build"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            overrides = {k: v for k, v in (("max_steps", args.steps), ("lr", args.lr)) if v is not None}
            if args.cell_orientations is not None:
                overrides["cell_orientations"] = bool(args.cell_orientations)
            overrides = overrides or None
            run = pretrain(mist, work / "run", train_overrides=overrides, seed=args.seed, threads=args.threads,
                           progress_bar=False)
            seconds["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        both, image, gene = (embed_dataset(mist, run.last_checkpoint, out, modality=modality, progress_bar=False,
                                           orientations=args.embed_orientations)
                             for out, modality in ((work / "cells.h5ad", "both"), (None, "image"), (None, "gene")))
        adata = both.adata
        add_image_only_embeddings(adata, image.adata)  # X_spatia_image and its cell and niche levels
        add_modality_embedding(adata, gene.adata, "X_spatia_gene")
        seconds["embed"] = time.perf_counter() - t0

        config = EvaluateConfig(labels=labels, split="split", seed=args.seed, n_seeds=args.n_seeds, layout="none")
        imputer, imputer_note = None, f"gene decoder of the checkpoint (decoder_weight {config.impute_decoder_weight})"
        try:
            from spatia.train.impute import GeneDecoderImputer

            imputer = GeneDecoderImputer.from_checkpoint(run.last_checkpoint, mist, adata.var_names,
                                                         decoder_weight=config.impute_decoder_weight)
        except Exception as error:  # noqa: BLE001 - report why, score the rest
            imputer_note = f"unavailable: {type(error).__name__}: {error}"

        t0 = time.perf_counter()
        crops = crops_from_mist(mist, adata.obs_names.to_numpy().astype(str))
        niche_crops = niche_crops_from_mist(mist)
        results = evaluate(adata, config, crops=crops, imputer=imputer, niche_crops=niche_crops)
        seconds["evaluate"] = time.perf_counter() - t0
        if args.report is not None:
            write_report(results, args.report)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    figures = summary_figures(results)
    line = {
        "input": source,
        "cells": results["dataset"]["n_cells"],
        "labels": {c: v["n_labels"] for c, v in results["labels"].items()},
        "split": {k: results["split"][k] for k in ("source", "n_train", "n_test", "n_buffer")},
        "steps": run.global_step,
        "embed_orientations": args.embed_orientations,
        "cell_orientations": args.cell_orientations,
        "seed": args.seed,
        "eval_seeds": results["seeds"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "evaluate_timings_s": results["timings_s"],
        "final_losses": {k: round(float(v), 4) for k, v in run.metrics.items()},
        "imputer": imputer_note,
        "representations": {k: v["source"] if v["dim"] == 0 else v["dim"] for k, v in results["embeddings"].items()},
        "figures": figures,
        "margins": _margins(figures),
    }
    json.dump(line, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
