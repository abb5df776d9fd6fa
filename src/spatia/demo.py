"""`spatia demo`: the whole pipeline on a simulated Xenium bundle, in one output folder.

Each step calls the same stage function (`spatia.stages`) as its own command and writes what
that command writes, run record included, so the demo folder shows what every stage produces:

    bundle/        `spatia simulate`   Xenium-like bundle + ground_truth.parquet/json
    cells.h5ad     `read_xenium(...).to_anndata()` with the ground-truth annotations joined
    dataset/       `spatia build`      MIST dataset (cells, niches, tissue regions)
    pretrain/      `spatia pretrain`   tiny SPATIA model, joint stage, a bounded number of steps
    embeddings.h5ad, embeddings_image.h5ad   `spatia embed` (both modalities; image only)
    report/        `spatia evaluate`   annotation, clustering, expression from morphology,
                                       imputation vs baselines (labels: ground-truth cell type)
    pairs/         `spatia pair`       OT control -> target pairs of the designed transitions
    flow/          `spatia flow train/generate/evaluate` (demo preset): generated target crops
                                       of the held-out pairs, scored against the identity baseline

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
from spatia import stages
from spatia.outputs import atomic_output, refuse_existing, write_json, write_run_record

log = logging.getLogger(__name__)

GROUND_TRUTH_OBS_COLUMNS = ("cell_type", "lineage", "state", "domain")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (defaults keep it within a few minutes on 2 CPU cores)."""

    n_cells: int = 5000
    n_genes: int = 300
    build_workers: int = 0
    pretrain_steps: int = 400  # ~3 min of the demo's 10 on 2 cores (README: measured)
    evaluate_seeds: int = 2
    flow_preset: str = "demo"  # spatia.flow presets: demo (minutes), tiny (seconds, for tests)


def annotated_anndata(bundle: Path):
    """Read a simulated bundle as a real one and join its ground-truth annotations into `obs`."""
    from spatia.io import read_xenium
    from spatia.sim import GROUND_TRUTH_TABLE

    slide = read_xenium(bundle)
    adata = slide.to_anndata()
    truth = pd.read_parquet(bundle / GROUND_TRUTH_TABLE).set_index("cell_id")
    for column in GROUND_TRUTH_OBS_COLUMNS:  # truth_* as in the MIST index and `spatia embed`'s obs
        adata.obs[f"truth_{column}"] = pd.Categorical(truth.loc[adata.obs_names, column].astype(str))
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
    step("embed", lambda: _embed(dataset, checkpoint, out_dir, seed))
    step("evaluate", lambda: _evaluate(out_dir, dataset, checkpoint, config, seed))
    step("pair", lambda: _pair(out_dir / "cells.h5ad", out_dir / "pairs", seed))
    step("flow", lambda: _flow(dataset, out_dir / "pairs", out_dir / "embeddings.h5ad", out_dir / "flow", config, seed))

    write_json(out_dir / "demo_summary.json", summary, overwrite=True)
    console.rule("[bold]done")
    console.print(f"demo outputs in {out_dir}; step figures in {out_dir / 'demo_summary.json'}", highlight=False)
    return summary


def _simulate(bundle: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    from spatia.sim import SimulationConfig

    return stages.simulate(bundle, SimulationConfig(n_cells=config.n_cells, n_genes=config.n_genes), seed=seed).summary()


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
    from spatia.mist import BuildConfig

    return stages.build([bundle], dataset, BuildConfig.cpu(), seed=seed, workers=config.build_workers).summary()


def _pretrain(dataset: Path, run: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    # the tiny config's own learning rate and schedule (docs/model.md); only the length is the demo's
    steps = config.pretrain_steps
    run_config = stages.PretrainConfig(model="tiny", stage="joint", model_overrides={
        "train.max_steps": steps, "train.warmup_steps": max(1, steps // 5), "train.val_every_n_steps": steps,
        "train.checkpoint_every_n_steps": steps})
    return stages.pretrain(dataset, run, run_config, seed=seed).summary()


def _embed(dataset: Path, checkpoint: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    both = stages.embed(dataset, checkpoint, out_dir / "embeddings.h5ad", seed=seed)
    image = stages.embed(dataset, checkpoint, out_dir / "embeddings_image.h5ad", stages.EmbedConfig(modality="image"),
                         seed=seed)
    return {**both.summary(), "image_only": image.summary()}


def _evaluate(out_dir: Path, dataset: Path, checkpoint: Path, config: DemoConfig, seed: int) -> dict[str, Any]:
    from spatia.evaluate import EvaluateConfig

    eval_config = EvaluateConfig(labels="truth_cell_type", seed=seed, n_seeds=config.evaluate_seeds, layout="pca")
    inputs = stages.EvaluateInputs(mist=dataset, checkpoint=checkpoint,
                                   image_embeddings=out_dir / "embeddings_image.h5ad")
    return stages.evaluate(out_dir / "embeddings.h5ad", out_dir / "report", eval_config, inputs, seed=seed).summary()


def _pair(cells_h5ad: Path, pairs_dir: Path, seed: int) -> dict[str, Any]:
    from spatia.perturb import PairingConfig

    truth = {"state_key": "truth_state", "lineage_key": "truth_lineage", "niche_key": "truth_domain"}  # cells.h5ad's
    result = stages.pair(cells_h5ad, pairs_dir, PairingConfig(**truth, seed=seed), transitions="simulated", seed=seed)
    return {"n_pairs": result.figures["n_pairs"],
            "transitions": {name: {"pairs": row["n_pairs"]} for name, row in result.figures["transitions"].items()}}


def _flow(dataset: Path, pairs_dir: Path, embeddings: Path, flow_root: Path, demo: DemoConfig,
          seed: int) -> dict[str, Any]:
    from spatia.flow import preset

    config = preset(demo.flow_preset)
    flow_root.mkdir()
    train = stages.flow_train(dataset, pairs_dir, embeddings, flow_root / "model", config.train, seed=seed)
    generated = stages.flow_generate(flow_root / "model", flow_root / "generated", config.generate, seed=seed)
    report = stages.flow_evaluate(flow_root / "generated", flow_root / "report", config.evaluate, seed=seed)
    return {"train": train.summary(), "generate": generated.summary(), "evaluate": report.summary()}
