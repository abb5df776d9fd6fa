"""`spatia demo`: the whole pipeline on a simulated Xenium bundle, in one output folder.

Each step calls the same library function as its own command and writes what that command
writes, so the demo folder shows what every stage produces:

    bundle/        `spatia simulate`   Xenium-like bundle + ground_truth.parquet/json
    cells.h5ad     `read_xenium(...).to_anndata()` with the ground-truth annotations joined
    dataset/       `spatia build`      MIST dataset (cells, niches, tissue regions)
    pretrain/      `spatia pretrain`   tiny SPATIA model, joint stage, a bounded number of steps
    embeddings.h5ad, embeddings_image.h5ad   `spatia embed` (both modalities; image only)
    report/        `spatia evaluate`   annotation, clustering, expression from morphology,
                                       imputation vs baselines (labels: ground-truth cell type)
    pairs/         `spatia pair`       OT control -> target pairs of the designed transitions

A summary of every step (sizes, timings, headline figures) goes to `demo_summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from spatia.console import console
from spatia.outputs import atomic_output, refuse_existing, write_json, write_run_record

log = logging.getLogger(__name__)

GROUND_TRUTH_OBS_COLUMNS = ("cell_type", "lineage", "state", "domain")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (defaults keep it within a few minutes on 2 CPU cores)."""

    n_cells: int = 5000
    n_genes: int = 300
    build_workers: int = 0
    pretrain_steps: int = 60
    evaluate_seeds: int = 2


def annotated_anndata(bundle: Path):
    """Read a simulated bundle as a real one and join its ground-truth annotations into `obs`."""
    from spatia.io import read_xenium
    from spatia.io.simulate import GROUND_TRUTH_TABLE

    slide = read_xenium(bundle)
    adata = slide.to_anndata()
    truth = pd.read_parquet(bundle / GROUND_TRUTH_TABLE).set_index("cell_id")
    for column in GROUND_TRUTH_OBS_COLUMNS:
        adata.obs[column] = pd.Categorical(truth.loc[adata.obs_names, column].astype(str))
    return slide, adata


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), *, seed: int = 0) -> dict[str, Any]:
    """Run every stage on a simulated bundle under `out_dir` (which must not exist)."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, what="demo output folder")
    out_dir.mkdir(parents=True)
    write_run_record(out_dir, "demo", config, seed)
    summary: dict[str, Any] = {"seed": seed, "steps": {}}

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        figures = fn()
        figures["seconds"] = round(time.perf_counter() - started, 2)
        summary["steps"][name] = figures
        console.print(json.dumps(figures, default=str), highlight=False)

    bundle = out_dir / "bundle"
    step("simulate", lambda: _simulate(bundle, config, seed))
    step("read", lambda: _read(bundle, out_dir / "cells.h5ad"))
    dataset = out_dir / "dataset"
    step("build", lambda: _build(bundle, dataset, config, seed))
    run = out_dir / "pretrain"
    step("pretrain", lambda: _pretrain(dataset, run, config, seed))
    checkpoint = run / "checkpoints" / "last.ckpt"
    step("embed", lambda: _embed(dataset, checkpoint, out_dir))
    step("evaluate", lambda: _evaluate(out_dir, dataset, checkpoint, config, seed))
    step("pair", lambda: _pair(out_dir / "cells.h5ad", out_dir / "pairs", seed))

    write_json(out_dir / "demo_summary.json", summary, overwrite=True)
    console.rule("[bold]done")
    console.print(f"demo outputs in {out_dir}; step figures in {out_dir / 'demo_summary.json'}", highlight=False)
    return summary


def _simulate(bundle: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    from spatia.io.simulate import SimulationConfig, simulate_bundle

    result = simulate_bundle(bundle, SimulationConfig(n_cells=config.n_cells, n_genes=config.n_genes), seed=seed)
    return {"cells": result.n_cells, "genes": result.n_genes, "image_px": [result.width_px, result.height_px]}


def _read(bundle: Path, h5ad_path: Path) -> dict[str, Any]:
    slide, adata = annotated_anndata(bundle)
    summary = slide.summary()
    with atomic_output(h5ad_path) as tmp:
        adata.write_h5ad(tmp)
    return {
        "cells": summary["n_cells"],
        "genes": summary["n_genes"],
        "controls": summary["n_controls"],
        "pixel_size_um": summary["pixel_size_um"],
        "problems": summary["problems"],
        "h5ad": str(h5ad_path),
    }


def _build(bundle: Path, dataset: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    from spatia.mist import BuildConfig, build_dataset

    result = build_dataset([bundle], dataset, BuildConfig.cpu(), seed=seed, workers=config.build_workers)
    return {
        "cells": result.n_cells,
        "niches": result.n_niches,
        "tissues": result.n_tissues,
        "skipped": result.skipped,
        "cells_per_second": round(result.cells_per_second, 1),
    }


def _pretrain(dataset: Path, run: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    from spatia.train import pretrain

    result = pretrain(
        dataset, run, config="tiny", stage="joint", seed=seed,
        # lr 1e-4: the paper's 1e-3 is too high for a few thousand cells from scratch (docs/training.md)
        train_overrides={"lr": 1e-4, "max_steps": config.pretrain_steps, "val_every_n_steps": config.pretrain_steps,
                         "checkpoint_every_n_steps": config.pretrain_steps},
    )
    return {"steps": result.global_step, "checkpoint": str(result.last_checkpoint),
            "final_losses": {k: round(float(v), 4) for k, v in result.metrics.items()}}


def _embed(dataset: Path, checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    from spatia.train import embed_dataset

    both = embed_dataset(dataset, checkpoint, out_dir / "embeddings.h5ad", modality="both")
    image = embed_dataset(dataset, checkpoint, out_dir / "embeddings_image.h5ad", modality="image")
    return {"cells": both.n_cells, "obsm": both.obsm_keys, "cells_per_second": round(both.cells_per_second, 1),
            "image_only_cells_per_second": round(image.cells_per_second, 1)}


def _evaluate(out_dir: Path, dataset: Path, checkpoint: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    import anndata as ad

    from spatia.evaluate import EvaluateConfig, add_modality_embedding, crops_from_mist, evaluate, write_report
    from spatia.train.impute import GeneDecoderImputer

    adata = ad.read_h5ad(out_dir / "embeddings.h5ad")
    add_modality_embedding(adata, ad.read_h5ad(out_dir / "embeddings_image.h5ad"), "X_spatia_image")
    crops = crops_from_mist(dataset, list(adata.obs_names))
    imputer = GeneDecoderImputer.from_checkpoint(checkpoint, dataset, adata.var_names)
    eval_config = EvaluateConfig(labels="truth_cell_type", seed=seed, n_seeds=config.evaluate_seeds, layout="pca")
    results = evaluate(adata, eval_config, crops=crops, imputer=imputer)
    report = write_report(results, out_dir / "report")
    inputs = {"cells": str(out_dir / "embeddings.h5ad"), "mist": str(dataset), "checkpoint": str(checkpoint),
              "image_embeddings": str(out_dir / "embeddings_image.h5ad")}
    write_run_record(out_dir / "report", "evaluate", {"evaluate": eval_config, "inputs": inputs}, seed)
    return {"report": str(report), "annotation_macro_f1": _headline(results),
            "imputation_pearson": _imputation_headline(results)}


def _headline(results: dict[str, Any]) -> dict[str, float]:
    """Mean MLP macro-F1 of the cell annotation per representation (the report has every metric)."""
    per_representation = results["tasks"]["annotation"].get("results", {})
    return {name: round(scores["mlp"]["macro_f1"]["mean"], 3)
            for name, scores in per_representation.items() if "mlp" in scores}


def _imputation_headline(results: dict[str, Any]) -> dict[str, float]:
    """Mean pooled Pearson on held-out genes per imputer (the gene decoder is "model")."""
    per_imputer = results["tasks"]["imputation"].get("results", {})
    return {name: round(scores["pearson"]["mean"], 3) for name, scores in per_imputer.items() if scores.get("status") == "ok"}


def _pair(cells_h5ad: Path, pairs_dir: Path, seed: int) -> dict[str, Any]:
    import anndata as ad

    from spatia.perturb import PairingConfig, example_transitions_path, load_transitions, pair_cells, write_pairing

    spec = load_transitions(example_transitions_path("simulated"))
    pairing_config = PairingConfig(seed=seed, **spec.columns)
    result = pair_cells(ad.read_h5ad(cells_h5ad), spec, pairing_config)
    write_pairing(result, pairs_dir)
    write_run_record(pairs_dir, "pair", {"transitions": str(example_transitions_path("simulated")),
                                         "pairing": pairing_config}, seed)
    return {name: {"pairs": row["n_pairs"]} for name, row in result.summary().items()}
