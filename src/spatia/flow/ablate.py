"""`flow_ablate`: every variant (Tables 5, 6 and 12) on one split and seed.

OUT_DIR/
    flows/<variant>/     FLOW_DIR of each variant (the first trains the autoencoder; the others
                         reuse it, so every variant works in the same latent space)
    generated/<variant>/ GEN_DIR of each variant
    report/              `flow_evaluate` of all variants + identity
    ablate.json          per-variant training and generation summaries, the metrics summary
    spatia_run.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spatia.flow.config import FlowAblateConfig, variant_train_config
from spatia.flow.data import load_flow_data
from spatia.flow.evaluate import FlowEvaluateResult, flow_evaluate
from spatia.flow.generate import flow_generate
from spatia.flow.train import flow_train
from spatia.outputs import refuse_existing, write_json, write_run_record


@dataclass
class FlowAblateResult:
    out_dir: Path
    train: dict[str, dict[str, Any]]
    generate: dict[str, dict[str, Any]]
    evaluation: FlowEvaluateResult
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "train": self.train, "generate": self.generate,
                "metrics": self.evaluation.summary(), "seconds": round(self.seconds, 1)}


def flow_ablate(dataset: str | Path, pairs_dir: str | Path, embeddings: str | Path, out_dir: str | Path,
                config: FlowAblateConfig = FlowAblateConfig(), seed: int = 0) -> FlowAblateResult:
    """Train, generate and evaluate every variant of `config.variants` (same held-out pairs,
    same seed), then score them together with the identity baseline."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    refuse_existing(out_dir, what="ablation output folder")
    # unknown variants and unreadable inputs are refused before OUT_DIR is made
    base = config.train
    train_configs = {variant: variant_train_config(base, variant) for variant in config.variants}
    data = load_flow_data(dataset, pairs_dir, embeddings, signature_pcs=base.model.signature_pcs,
                          holdout=base.holdout, holdout_fraction=base.holdout_fraction, seed=seed)
    (out_dir / "flows").mkdir(parents=True)
    (out_dir / "generated").mkdir()
    write_run_record(out_dir, "flow ablate", {"flow_ablate": config, "inputs": {
        "dataset": str(dataset), "pairs": str(pairs_dir), "embeddings": str(embeddings)}}, seed)
    trained, generated, gen_dirs = {}, {}, {}
    autoencoder = None
    for variant, train_config in train_configs.items():
        flow_dir = out_dir / "flows" / variant
        result = flow_train(dataset, pairs_dir, embeddings, flow_dir, train_config, seed,
                            autoencoder=autoencoder, data=data)
        autoencoder = autoencoder or flow_dir / "autoencoder.pt"
        trained[variant] = result.summary()
        gen_dirs[variant] = out_dir / "generated" / variant
        generated[variant] = flow_generate(flow_dir, gen_dirs[variant], config.generate, seed).summary()
    evaluation = flow_evaluate(gen_dirs, out_dir / "report", config.evaluate, seed)
    result = FlowAblateResult(out_dir, trained, generated, evaluation, time.perf_counter() - started)
    write_json(out_dir / "ablate.json", result.summary())
    return result

