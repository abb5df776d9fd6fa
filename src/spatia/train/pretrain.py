"""`pretrain`: one SPATIA pretraining stage on a MIST dataset, with Lightning.

    from spatia.train import pretrain
    result = pretrain("mist/", "runs/cell", config="tiny", stage="cell")
    result = pretrain("mist/", "runs/niche", stage="niche", init_from=result.last_checkpoint)
    ...                                               # tissue, then joint
    pretrain("mist/", "runs/joint", resume="runs/joint/checkpoints/last.ckpt")  # after an interruption

The run directory holds:

    checkpoints/last.ckpt   every `train.checkpoint_every_n_steps` steps and at the end (resume from it)
    checkpoints/best.ckpt   lowest val/total (when the dataset has a val split)
    config.yaml             the resolved config (load_config reads it back)
    genes.txt               the gene vocabulary, one symbol a line, in the model's column order
    logs/metrics.csv        every logged value: train/<level>/<image|gene>, train/total, train/lr,
                            train/grad_norm, val/... (Lightning CSVLogger)
    logs/loss_curve.png     train and val losses against the step, rewritten at every checkpoint
                            and at the end (`spatia.train.curves`)
    logs/lightning.log      Lightning's own info lines (devices, restored checkpoints), kept off the
                            terminal
    spatia_run.json         run record: options, resolved config, seed, versions

Precision: `train.precision: auto` picks bf16-mixed on CUDA and 32-true on CPU (bf16 matmuls are
unusably slow on CPUs). Several devices or nodes train with DDP (`devices`, `num_nodes`); each
rank draws its own share of the localised batches.

What it prints: one progress display over the run (`spatia.train.progress.TrainingProgress`:
step k of the run's steps, losses, learning rate, ETA; plain lines every few steps when the
output is not a terminal) and nothing from Lightning (no model summary, no bar per epoch, no
tips; its info lines go to logs/lightning.log).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from spatia.errors import ConfigError, OutputExistsError
from spatia.model import SpatiaConfig, load_config
from spatia.outputs import atomic_output, write_run_record
from spatia.train.checkpoints import (
    AtomicCheckpointIO,
    check_architecture,
    check_vocabulary,
    checkpoint_info,
    config_differences,
    model_state_dict,
    read_checkpoint,
)
from spatia.train.curves import LOSS_CURVE_FILE, LossHistory
from spatia.train.module import SpatiaPretrainModule, check_train_config, get_stage
from spatia.train.progress import (
    LIGHTNING_LOG_FILE,
    TrainingProgress,
    lightning_logs_to,
    plain_line_interval,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
CONFIG_FILE = "config.yaml"
GENES_FILE = "genes.txt"
LOG_DIR = "logs"

# train keys a resumed run may change (the rest would break exact resume)
RESUME_OVERRIDABLE = frozenset({"max_steps", "max_epochs", "val_every_n_steps", "val_batches",
                                "checkpoint_every_n_steps", "log_every_n_steps", "num_workers", "precision"})


@dataclass
class PretrainResult:
    """Where a pretraining run wrote its outputs and how far it got."""

    out_dir: Path
    stage: str
    last_checkpoint: Path
    best_checkpoint: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_curve: Path | None = None  # logs/loss_curve.png (rank zero writes it)


# ---------------------------------------------------------------------------------------------
# devices and precision
# ---------------------------------------------------------------------------------------------


def resolve_accelerator(accelerator: str) -> str:
    """"auto" -> "gpu" when CUDA is available, else "cpu"; other values pass through."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator} was asked for, but no CUDA GPU is available",
                          fix="use --accelerator cpu (or auto), or run on a machine with a GPU")
    return accelerator


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16-mixed on GPUs that support it (16-mixed on older ones), 32-true on CPU."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def env_rank_is_zero() -> bool:
    """Whether this process is global rank 0 of a (possibly) launched distributed job, judged
    from the launcher's environment (Lightning's subprocess launcher, torchrun, SLURM)."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if int(os.environ.get(key, "0") or 0) != 0:
            return False
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return int(os.environ.get("SLURM_PROCID", "0") or 0) == 0
    return True


def quiet_lightning(quiet: bool) -> None:
    """Lightning's own INFO lines (devices found, tips) only when not quiet (for commands that
    do not train; `pretrain` sends them to the run's logs/lightning.log while it trains)."""
    level = logging.WARNING if quiet else logging.INFO
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)


LIGHTNING_NOISE = (
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",  # Lightning 2.6 with torch 2.13
)


def make_strategy(devices: int | str, num_nodes: int, accelerator: str, start_method: str) -> Any:
    """"auto" for one process; DDP otherwise (gloo on CPU), tolerant of parameters a stage
    does not use (frozen or data-dependent ones)."""
    many = num_nodes > 1 or (isinstance(devices, int) and (devices > 1 or devices == -1)) or devices == "auto"
    if not many:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=True, start_method=start_method,
                       process_group_backend="gloo" if accelerator == "cpu" else None)


# ---------------------------------------------------------------------------------------------
# config resolution
# ---------------------------------------------------------------------------------------------


def apply_train_overrides(config: SpatiaConfig, overrides: dict[str, Any] | None) -> SpatiaConfig:
    """The config with `train.<key>` values replaced (None values are ignored), validated."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not overrides:
        return config
    from spatia.config import CLI_SOURCE, merge_config
    from spatia.model.config import validate_config

    # named as what they are (command-line options), not as the packaged config they modify
    updated = merge_config(config, {"train": overrides}, source=CLI_SOURCE)
    validate_config(updated, source=CLI_SOURCE)
    return updated


def _require_train_cells(root: Path) -> None:
    """Refuse a dataset whose split leaves no train cell to draw, before anything is measured or
    written: on a section of a few tissue regions the spatial split's train blocks can lie wholly
    within `split_buffer_um` of the held-out blocks (docs/mist.md, splits)."""
    from spatia.mist.store import read_manifest
    from spatia.train.data import split_has_cells

    if split_has_cells(root, "train"):
        return
    manifest = read_manifest(root)
    splits = manifest.get("splits", {})
    builder = manifest.get("builder_config", {})
    raise ConfigError(
        f"the dataset has no train cell to pretrain on (cells by split: {splits.get('cell', {})}; tissue regions: "
        f"{splits.get('tissue', {})}); its spatial split (seed {manifest.get('seed')}) put every train cell within "
        f"split_buffer_um = {builder.get('split_buffer_um')} um of a val or test block, or gave train no block",
        path=root,
        fix="rebuild the dataset with another --seed (another draw of blocks) or a smaller --split-buffer-um; "
            "a dataset without train cells can still be embedded with a pretrained model (spatia embed)",
    )


def _dataset_checks(root: Path, config: SpatiaConfig) -> list[str]:
    """The dataset's genes, after checking its image sizes against the config."""
    from spatia.mist.store import read_manifest

    manifest = read_manifest(root)
    levels = manifest["levels"]
    expected = {"cell": config.image.cell_size_px, "niche": config.image.niche_size_px,
                "tissue": config.image.tissue_size_px}
    for level, size in expected.items():
        stored = int(levels[level]["image_px"])
        if stored != size:
            raise ConfigError(
                f"the dataset stores {stored} px {level} images but the config expects {size} px "
                f"(image.{level}_size_px)",
                path=root,
                fix=f"use a config with image.{level}_size_px: {stored} (e.g. `extends: tiny` for --preset cpu "
                "datasets, `extends: base` for --preset paper), or rebuild the dataset",
            )
    grid = int(levels["tissue"]["grid"])
    if grid != config.tissue.grid_size:
        raise ConfigError(f"the dataset's tissue regions hold {grid} x {grid} niches but tissue.grid_size is "
                          f"{config.tissue.grid_size}", path=root, fix=f"set tissue.grid_size: {grid}")
    return [str(g) for g in manifest["genes"]]


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text)


METRICS_FILE = "metrics.csv"


def _read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics CSV, values kept as the exact strings written."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _write_metrics(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _set_aside_metrics(out_dir: Path, step: int) -> Path | None:
    """On resume: keep the rows of `logs/metrics.csv` logged before `step` (work lost with the
    interruption is logged again) in a file beside the logs, and remove the original, so that
    Lightning's CSVLogger starts a fresh one. `_merge_metrics` puts them back together."""
    csv_path = out_dir / LOG_DIR / METRICS_FILE
    if not csv_path.is_file():
        return None
    header, rows = _read_metrics(csv_path)
    if "step" in header:
        rows = [row for row in rows if row["step"] == "" or float(row["step"]) < step]
    aside = out_dir / f"metrics.before-step{step}.csv"
    _write_metrics(aside, header, rows)
    csv_path.unlink()
    return aside


def _merge_metrics(out_dir: Path, aside: Path) -> None:
    """Prepend the rows set aside at resume to the resumed run's `logs/metrics.csv` (values
    copied as written, columns the union of both files')."""
    csv_path = out_dir / LOG_DIR / METRICS_FILE
    header, rows = _read_metrics(aside)
    if csv_path.is_file():
        new_header, new_rows = _read_metrics(csv_path)
        header = sorted(set(header) | set(new_header))
        rows = rows + new_rows
    _write_metrics(csv_path, header, rows)
    aside.unlink()


class _SaveLastAtEnd(Callback):
    """Writes `last.ckpt` when training ends (the step-interval checkpoints may miss the end)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, for --resume


# ---------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------


def pretrain(
    dataset: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | SpatiaConfig | None = None,
    stage: str | None = None,
    init_from: str | Path | None = None,
    resume: str | Path | None = None,
    image_weights: str | Path | None = None,
    gene_embeddings: str | Path | None = None,
    train_overrides: dict[str, Any] | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    start_method: str = "popen",
    threads: int | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    callbacks: list | None = None,
    command: str = "pretrain",
) -> PretrainResult:
    """Train one stage of SPATIA on the `train` split of a MIST dataset (validation on `val`).

    Args:
        dataset: a MIST dataset directory (`spatia build`).
        out_dir: the run directory; must be new or empty, except with `resume`.
        config: "tiny", "base", a YAML path or a `SpatiaConfig`. Default: "tiny", or the
            checkpoint's config with `init_from` / `resume` (a config given with `init_from` must
            size the same network: only `train` and `loss` may differ).
        stage: "cell", "niche", "tissue" or "joint" (default "joint"; with `resume`, the
            checkpoint's stage).
        init_from: start from the weights of a checkpoint (the previous stage); the optimiser,
            schedule and step start afresh.
        resume: continue an interrupted run exactly (weights, optimiser, schedule, step, data
            position, random draws) from its checkpoint; `out_dir` is that run's directory.
        image_weights, gene_embeddings: pretrained inputs from local paths (fresh runs only):
            a ViTMAE directory and a gene-vector table (see docs/model.md).
        train_overrides: `train.<key>` values replacing the config's (None values ignored).
        devices, num_nodes, accelerator: Lightning's; more than one process trains with DDP.
        start_method: DDP process launch: "popen" (re-runs the command: the CLI) or "spawn"
            (from Python, notebooks and tests).
        threads: torch intra-op threads per process (None: torch's default).
        seed: seeds the model initialisation, the data order and every random draw.
        progress_bar: show the run's progress (one live bar on a terminal or in Jupyter, else a
            plain line every few steps; `spatia.train.progress`). False prints nothing.
        callbacks: extra Lightning callbacks.
        command: the command name for the run record.

    Returns:
        `PretrainResult` with the checkpoints, the final global step and the last logged metrics.
    """
    from spatia.train.data import MistDataModule, dataset_statistics, resolve_data_config, split_has_cells

    dataset = Path(dataset)
    out_dir = Path(out_dir)
    rank_zero = env_rank_is_zero()
    if threads:
        torch.set_num_threads(int(threads))
    if resume is not None and init_from is not None:
        raise ConfigError("both --resume and --from were given",
                          fix="--resume continues an interrupted run; --from starts a new stage from a checkpoint")
    if (image_weights is not None or gene_embeddings is not None) and (resume is not None or init_from is not None):
        raise ConfigError("--image-weights / --gene-embeddings apply to a fresh run only",
                          fix="load pretrained inputs in the first stage; later stages inherit them through --from")

    # ---- the run directory
    if resume is None:
        if rank_zero and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            last = out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            raise OutputExistsError("the run directory already exists and is not empty", path=out_dir,
                                    fix=f"choose a new directory, or continue that run with --resume {last}"
                                    if last.is_file() else "choose a new directory (it holds no checkpoint to resume)")
    elif not out_dir.is_dir():
        raise ConfigError("the run directory to resume does not exist", path=out_dir,
                          fix="give the -o directory of the interrupted run")

    _require_train_cells(dataset)

    # ---- config, stage and starting weights
    initial_state = None
    measured = None  # a new model's train-cell statistics: measured once, for the config and the model
    resume_step = 0
    if resume is not None:
        checkpoint = read_checkpoint(resume)
        info = checkpoint_info(checkpoint, resume)
        del checkpoint
        if stage is not None and stage != info.stage:
            raise ConfigError(f"--stage {stage} differs from the resumed run's stage {info.stage}", path=resume,
                              fix="leave out --stage when resuming, or start a new stage with --from")
        given = info.config if config is None else config if isinstance(config, SpatiaConfig) else load_config(config)
        resolved = resolve_data_config(apply_train_overrides(given, train_overrides), dataset)
        changed = [k for k in config_differences(resolved, info.config)
                   if not (k.startswith("train.") and k[len("train."):] in RESUME_OVERRIDABLE)]
        if changed:
            raise ConfigError(f"these settings cannot change when resuming: {', '.join(changed[:8])}", path=resume,
                              fix="resume with the original settings (only step limits, intervals, workers and "
                              "precision may change), or start a new run with --from")
        stage_name, gene_source, resume_step = info.stage, info, info.global_step
        seed = info.seed
    elif init_from is not None:
        checkpoint = read_checkpoint(init_from)
        info = checkpoint_info(checkpoint, init_from)
        initial_state = model_state_dict(checkpoint)
        del checkpoint
        if config is not None:
            base = config if isinstance(config, SpatiaConfig) else load_config(config)
            base = resolve_data_config(base, dataset)
            check_architecture(base, info.config, checkpoint=Path(init_from))
        else:
            base = info.config
        resolved = apply_train_overrides(base, train_overrides)
        stage_name, gene_source = stage or "joint", info
    else:
        base = config if isinstance(config, SpatiaConfig) else load_config(config or "tiny")
        measured = dataset_statistics(dataset)
        resolved = resolve_data_config(apply_train_overrides(base, train_overrides), dataset, stats=measured)
        stage_name, gene_source = stage or "joint", None
    stage_info = get_stage(stage_name)
    check_train_config(resolved)
    train = resolved.train
    genes = _dataset_checks(dataset, resolved)
    if gene_source is not None:
        check_vocabulary(gene_source.gene_symbols, genes, checkpoint=gene_source.path, dataset=dataset)
    has_val = train.val_batches > 0 and split_has_cells(dataset, "val")
    if train.val_batches > 0 and not has_val:
        log.warning("the dataset has no val cells: training without validation (no best.ckpt)")
    accel = resolve_accelerator(accelerator)
    precision = resolve_precision(train.precision, accel)

    # ---- model
    torch.manual_seed(seed)
    module = SpatiaPretrainModule(resolved, genes, stage=stage_name, seed=seed, threads=threads)
    module.checkpoint_extra = {"dataset": str(dataset.resolve())}
    if initial_state is not None:
        module.model.load_state_dict(initial_state)
    elif measured is not None and module.model.cell_fusion.morphometry is not None:
        # a new model: its morphometry input is standardised with this dataset's train cells
        module.model.cell_fusion.morphometry.set_statistics(measured.morphometry_mean, measured.morphometry_std)
    report = module.model.load_pretrained(image_weights=image_weights, gene_embeddings=gene_embeddings) \
        if (image_weights is not None or gene_embeddings is not None) else {}
    datamodule = MistDataModule(dataset, tissues_per_batch=train.tissues_per_batch,
                                cells_per_tissue=train.cells_per_tissue, seed=seed, num_workers=train.num_workers,
                                val_batches=train.val_batches if has_val else 0)

    # ---- outputs (rank zero only)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    metrics_aside: Path | None = None
    if rank_zero:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out_dir / CONFIG_FILE, resolved.to_yaml())
        _write_text_atomic(out_dir / GENES_FILE, "".join(f"{g}\n" for g in genes))
        if resume is not None:
            metrics_aside = _set_aside_metrics(out_dir, resume_step)
        record_name = "spatia_run.json" if resume is None else f"spatia_run.resume-step{resume_step}.json"
        write_run_record(out_dir, command, {
            "dataset": str(dataset), "stage": stage_name, "levels": list(stage_info.levels),
            "trained_groups": list(stage_info.trained_groups), "init_from": str(init_from) if init_from else None,
            "resume": str(resume) if resume else None, "resumed_at_step": resume_step if resume else None,
            "image_weights": str(image_weights) if image_weights else None,
            "gene_embeddings": str(gene_embeddings) if gene_embeddings else None, "pretrained_report": report,
            "devices": devices, "num_nodes": num_nodes, "accelerator": accel, "precision": precision,
            "threads": threads, "config": resolved.to_dict(),
        }, seed, name=record_name)

    # ---- trainer
    callbacks = [
        *(callbacks or []),
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", every_n_train_steps=train.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        _SaveLastAtEnd(ckpt_dir / LAST_CHECKPOINT),
    ]
    if has_val:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/total", mode="min",
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    callbacks.append(LossHistory(out_dir / LOG_DIR / LOSS_CURVE_FILE,
                                 title=f"SPATIA pretraining, stage {stage_name}: {out_dir.name}"))
    if progress_bar:
        callbacks.append(TrainingProgress(plain_line_interval(train.max_steps, train.log_every_n_steps),
                                          description=f"pretrain {stage_name}"))
    log.info("pretraining stage %s (levels %s) on %s: %d steps, precision %s, %s x %s device(s)", stage_name,
             "+".join(stage_info.levels), dataset, train.max_steps, precision, num_nodes, devices)
    # Lightning's info lines (devices, tips, restored states) go to logs/lightning.log, from the
    # trainer's construction (where most are printed) to the end of fit
    with warnings.catch_warnings(), lightning_logs_to(out_dir / LOG_DIR / LIGHTNING_LOG_FILE if rank_zero else None):
        for message in LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=message)
        # the data position is restored through the module's checkpoint entry, not the loader
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen groups
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
        logger = CSVLogger(save_dir=str(out_dir), name="", version=LOG_DIR,
                           flush_logs_every_n_steps=train.log_every_n_steps)
        trainer = L.Trainer(
            accelerator=accel,
            devices=devices,
            num_nodes=num_nodes,
            strategy=make_strategy(devices, num_nodes, accel, start_method),
            precision=precision,
            max_steps=train.max_steps,
            max_epochs=train.max_epochs if train.max_epochs is not None else -1,
            val_check_interval=train.val_every_n_steps if has_val else None,
            check_val_every_n_epoch=None if has_val else 1,
            limit_val_batches=train.val_batches if has_val else 0,
            num_sanity_val_steps=0,
            log_every_n_steps=train.log_every_n_steps,
            logger=logger,
            callbacks=callbacks,
            enable_progress_bar=False,  # TrainingProgress instead: one bar over the run, not one per epoch
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=str(out_dir),
            benchmark=False,
            plugins=[AtomicCheckpointIO()],
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None,
                    weights_only=False)  # spatia's own checkpoint, already read by read_checkpoint
    if rank_zero and metrics_aside is not None:
        _merge_metrics(out_dir, metrics_aside)

    last = ckpt_dir / LAST_CHECKPOINT
    best = ckpt_dir / BEST_CHECKPOINT
    step = int(trainer.global_step)
    if last.is_file():  # also right when DDP ran in spawned processes (this trainer did not step)
        step = int(torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", step))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    curve = out_dir / LOG_DIR / LOSS_CURVE_FILE
    return PretrainResult(out_dir=out_dir, stage=stage_name, last_checkpoint=last,
                          best_checkpoint=best if best.is_file() else None, global_step=step, metrics=metrics,
                          loss_curve=curve if curve.is_file() else None)
