"""The SPATIA pretraining LightningModule: stages, AdamW, schedule, clipping, per-level logging.

Stages follow the paper's schedule (section 4.2, appendix C): the cell encoder first, then the
niche and tissue levels, then joint fine-tuning over localised batches.

| stage  | levels run             | trained parameter groups (`SpatiaModel.parameter_groups`) |
|--------|------------------------|-----------------------------------------------------------|
| cell   | cell                   | cell, shared                                              |
| niche  | cell, niche            | niche, shared (cell frozen)                               |
| tissue | cell, niche, tissue    | tissue, shared (cell and niche frozen)                    |
| joint  | cell, niche, tissue    | all                                                       |

"shared" is the final fusion (Eq. 4) and the gene decoder, which every level uses. The loss is
the weighted sum of the image and gene losses of the levels that run (`loss.*` in the config).
Frozen modules get no gradient and stay in eval mode (no dropout).

With `train.cell_orientations` every training step shows each cell crop and its mask in a
random one of the square's eight orientations (`spatia.model.dihedral`).

Randomness is a pure function of (seed, global step, rank): every training step reseeds the
masking and orientation generators and torch's global RNG (dropout), so a resumed run draws
exactly what the uninterrupted run would have drawn. Validation uses fixed draws (seed, batch index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from spatia.errors import ConfigError
from spatia.model import LEVELS, SpatiaConfig, SpatiaModel
from spatia.model.dihedral import random_orientations
from spatia.train.data import BatchPosition

CHECKPOINT_KEY = "spatia"
CHECKPOINT_FORMAT = 4
"""2: the morphometry input of z_cell (fusion.morphometry_residual), 17 measures; 3: the gene
residual of z_cell reads the profile embedding before the gene encoder's attention; 4: 23
measures (extent, minimum, quartiles, maximum and mass displacement added)."""
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Stage:
    """A pretraining stage: the levels its forward runs and the parameter groups it trains."""

    name: str
    levels: tuple[str, ...]
    trained_groups: tuple[str, ...]


STAGES: dict[str, Stage] = {
    "cell": Stage("cell", ("cell",), ("cell", "shared")),
    "niche": Stage("niche", ("cell", "niche"), ("niche", "shared")),
    "tissue": Stage("tissue", LEVELS, ("tissue", "shared")),
    "joint": Stage("joint", LEVELS, ("cell", "niche", "tissue", "shared")),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}", fix=f"use one of {', '.join(STAGES)} (the schedule is "
                          "cell -> niche -> tissue -> joint, each stage started --from the previous checkpoint)")
    return STAGES[name]


def check_train_config(config: SpatiaConfig) -> None:
    """Check the training-loop keys of `config.train`; raise `ConfigError` naming the key."""
    train = config.train

    def fail(key: str, problem: str, fix: str) -> None:
        raise ConfigError(f"'train.{key}' {problem}", path=config.name, fix=fix)

    for key in ("max_steps", "val_every_n_steps", "checkpoint_every_n_steps", "log_every_n_steps"):
        if getattr(train, key) < 1:
            fail(key, f"must be at least 1, not {getattr(train, key)}", f"set 'train.{key}' to 1 or more")
    if train.max_epochs is not None and train.max_epochs < 1:
        fail("max_epochs", f"must be at least 1 or null, not {train.max_epochs}", "set it to null (no cap) or >= 1")
    for key in ("warmup_steps", "val_batches", "num_workers"):
        if getattr(train, key) < 0:
            fail(key, f"must be 0 or more, not {getattr(train, key)}", f"set 'train.{key}' to 0 or more")
    if train.lr_schedule not in LR_SCHEDULES:
        fail("lr_schedule", f"must be one of {LR_SCHEDULES}, not {train.lr_schedule!r}", "use cosine or constant")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        fail("min_lr_ratio", f"must lie in [0, 1], not {train.min_lr_ratio}", "use e.g. 0.1")
    if train.grad_clip_norm < 0:
        fail("grad_clip_norm", f"must be 0 (off) or positive, not {train.grad_clip_norm}", "use e.g. 1.0")


def lr_scheduler(optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_steps: int, schedule: str,
                 min_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers, stepped once per optimiser step: `LinearLR` warm-up from
    1/warmup_steps of the base rate over `warmup_steps`, then `CosineAnnealingLR` down to
    `min_ratio` x the base rate at `max_steps` (or `ConstantLR` at the base rate), joined by
    `SequentialLR`."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    if schedule == "constant":
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        base = optimizer.param_groups[0]["lr"]
        main = CosineAnnealingLR(optimizer, T_max=max(max_steps - warmup_steps, 1), eta_min=base * min_ratio)
    if warmup_steps <= 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and integers (step, rank, ...)."""
    words = [int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SpatiaPretrainModule(L.LightningModule):
    """Trains a `SpatiaModel` (attribute `model`) for one stage.

    Args:
        config: the resolved config (model sizes, losses and the `train` section).
        gene_symbols: the gene vocabulary (the dataset manifest's genes, in column order).
        stage: "cell", "niche", "tissue" or "joint" (see the module docstring).
        seed: seeds every random draw together with the step and rank.
        threads: torch intra-op threads for each training process (None: leave as is).
    """

    def __init__(self, config: SpatiaConfig, gene_symbols: Sequence[str], *, stage: str = "joint", seed: int = 0,
                 threads: int | None = None):
        super().__init__()
        self.config = config
        self.stage = get_stage(stage)
        self.seed = int(seed)
        self.threads = threads
        self.model = SpatiaModel(config, gene_symbols)
        self.resume_position: BatchPosition | None = None
        self.last_position: BatchPosition | None = None
        self.checkpoint_extra: dict[str, Any] = {}
        self._frozen_modules: list[nn.Module] = []
        self.apply_stage()

    # ----------------------------------------------------------------------------------------
    # stage
    # ----------------------------------------------------------------------------------------

    def apply_stage(self) -> None:
        """Freeze the parameter groups the stage does not train (and keep their modules in eval)."""
        groups = self.model.parameter_groups()
        trained = {id(p) for name in self.stage.trained_groups for p in groups[name]}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained)
        # the largest submodules whose parameters are all frozen (eval() covers their children,
        # dropout layers included)
        frozen = {id(m) for m in self.model.modules() if m is not self.model
                  and any(True for _ in m.parameters()) and all(not p.requires_grad for p in m.parameters())}
        self._frozen_modules = [m for name, m in self.model.named_modules() if id(m) in frozen
                                and not any(id(parent) in frozen for parent in self._parents(name))]
        self.train(self.training)

    def _parents(self, name: str) -> list[nn.Module]:
        parts = name.split(".")
        return [self.model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]

    def train(self, mode: bool = True) -> SpatiaPretrainModule:
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        position = batch.pop("batch_position", None)
        seed = step_seed(self.seed, self.global_step, self.global_rank)
        torch.manual_seed(seed ^ 0x5EED)
        if self.config.train.cell_orientations:
            batch = random_orientations(batch, self._generator(seed ^ 0xD4))
        out = self.model(batch, levels=self.stage.levels, generator=self._generator(seed))
        n_cells = len(batch["cell_id"])
        for key, value in out.losses.items():
            self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=False, batch_size=n_cells,
                     prog_bar=key == "total")
        self.log("train/cells", float(n_cells), on_step=True, on_epoch=False, batch_size=1)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            self.log("train/lr", schedulers.get_last_lr()[0], on_step=True, on_epoch=False, batch_size=1)
        if position is not None:
            self.last_position = BatchPosition(int(position[0]), int(position[1]))
        return out.losses["total"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        seed = step_seed(self.seed, 1 << 30, batch_idx, self.global_rank)
        out = self.model(batch, levels=self.stage.levels, generator=self._generator(seed))
        n_cells = len(batch["cell_id"])
        for key, value in out.losses.items():
            self.log(f"val/{key}", value, on_step=False, on_epoch=True, batch_size=n_cells, sync_dist=True,
                     prog_bar=key == "total")

    def configure_optimizers(self) -> dict[str, Any]:
        train = self.config.train
        no_decay = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim >= 2 and name.endswith(".weight") and id(p) not in no_decay:
                decay.append(p)
            else:
                plain.append(p)
        groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        # fused: one CUDA kernel for the whole update instead of several per parameter tensor
        on_cuda = any(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, fused=on_cuda or None)
        trainer = self._trainer
        max_steps = int(trainer.max_steps) if trainer is not None and trainer.max_steps > 0 else train.max_steps
        scheduler = lr_scheduler(optimizer, max_steps=max_steps, warmup_steps=train.warmup_steps,
                                 schedule=train.lr_schedule, min_ratio=train.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        max_norm = self.config.train.grad_clip_norm
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "gene_symbols": list(self.model.gene_symbols),
            "stage": self.stage.name,
            "levels": list(self.stage.levels),
            "seed": self.seed,
            "data_position": list(self.last_position) if self.last_position is not None else None,
            **self.checkpoint_extra,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        position = meta.get("data_position")
        self.resume_position = BatchPosition(*position) if position is not None else None
        self.last_position = self.resume_position
