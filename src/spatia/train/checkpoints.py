"""Writing and reading SPATIA training checkpoints.

Writing: `AtomicCheckpointIO` (the trainer's checkpoint IO plugin) writes each checkpoint as
the rest of spatia writes files: to a temporary name in the checkpoint's own directory, fsync,
rename; the previous `last.ckpt` stays whole until the new one is complete, whatever the
filesystem (Lightning's own IO goes through the system temp folder and copies across).

A checkpoint is a Lightning `.ckpt` file (model, optimiser, scheduler, loop and callback state,
for exact resume) with a `"spatia"` entry written by `SpatiaPretrainModule.on_save_checkpoint`:
`format`, `config` (the resolved config as a dict), `gene_symbols` (the vocabulary, in column
order), `stage`, `levels`, `seed` and `data_position` ([epoch, batch index] of the last trained
batch). `load_model` rebuilds the `SpatiaModel` from it with no Lightning machinery.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spatia.errors import ConfigError, DatasetError, InputDataError
from spatia.model import SpatiaConfig, SpatiaModel, config_from_dict
from spatia.outputs import save_torch_atomic
from spatia.train.module import CHECKPOINT_FORMAT, CHECKPOINT_KEY

# config sections that do not change the network's parameters or what it computes
NON_ARCHITECTURE_SECTIONS = ("train", "loss")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a partial checkpoint under its final name.

    The bytes go to ``.<name>.tmp-<pid>`` in the target directory, are fsynced, then renamed over
    the target (atomic on one filesystem); on any failure (a full disk, a kill) the temporary
    file is removed where possible and the previous checkpoint of that name is untouched."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        save_torch_atomic(checkpoint, path)


@dataclass
class CheckpointInfo:
    """What a checkpoint holds besides the weights."""

    path: Path
    config: SpatiaConfig
    gene_symbols: list[str]
    stage: str
    levels: tuple[str, ...]
    seed: int
    global_step: int
    epoch: int


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file and check that `spatia pretrain` wrote it."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError("the checkpoint file does not exist", path=path,
                             fix="give a .ckpt written by `spatia pretrain` (e.g. RUN_DIR/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise InputDataError(f"cannot read the checkpoint ({type(error).__name__}: {error})", path=path,
                             fix="give a complete .ckpt written by `spatia pretrain`") from None
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "config" not in meta or "state_dict" not in checkpoint:
        raise InputDataError("not a SPATIA training checkpoint (no 'spatia' entry with the config)", path=path,
                             fix="give a .ckpt written by `spatia pretrain`")
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise InputDataError(f"checkpoint format {meta.get('format')} is newer than this spatia reads "
                             f"({CHECKPOINT_FORMAT})", path=path, fix="upgrade spatia")
    if meta.get("format", 0) < CHECKPOINT_FORMAT:
        raise InputDataError(f"checkpoint format {meta.get('format', 0)} was written before the model's cell "
                             f"level changed (format {CHECKPOINT_FORMAT}: 23 morphometry measures of each crop; "
                             "format 3: the gene residual of z_cell reads the profile embedding before "
                             "attention; format 2 added the morphometry input)",
                             path=path, fix="pretrain again with this spatia (`spatia pretrain`), or read the "
                             "checkpoint with the spatia version that wrote it")
    return checkpoint


def checkpoint_info(checkpoint: dict[str, Any], path: str | Path) -> CheckpointInfo:
    meta = checkpoint[CHECKPOINT_KEY]
    config = config_from_dict(meta["config"], source=str(path))
    if config.fusion.morphometry_weight is None:
        # written before the weight was measured per dataset: the measures entered at full weight
        config = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, morphometry_weight=1.0))
    if "image_query_weight" not in meta["config"].get("fusion", {}):
        # written before the image-free gene query existed: the pool was the image queries' alone
        config = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, image_query_weight=1.0))
    if "context_ratio" not in meta["config"].get("fusion", {}):
        # written before the final fusion's context was bounded: it trained, and embeds, unclipped
        config = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, context_ratio=None))
    return CheckpointInfo(
        path=Path(path),
        config=config,
        gene_symbols=[str(s) for s in meta["gene_symbols"]],
        stage=str(meta.get("stage", "joint")),
        levels=tuple(meta.get("levels", ("cell", "niche", "tissue"))),
        seed=int(meta.get("seed", 0)),
        global_step=int(checkpoint.get("global_step", 0)),
        epoch=int(checkpoint.get("epoch", 0)),
    )


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `SpatiaModel` state dict inside a Lightning checkpoint (keys without `model.`)."""
    prefix = "model."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SpatiaModel, CheckpointInfo]:
    """Rebuild the trained `SpatiaModel` of a checkpoint (in eval mode) and its `CheckpointInfo`."""
    checkpoint = read_checkpoint(path, map_location)
    info = checkpoint_info(checkpoint, path)
    model = SpatiaModel(info.config, info.gene_symbols)
    missing, unexpected = model.load_state_dict(model_state_dict(checkpoint), strict=False)
    if missing or unexpected:
        raise InputDataError(f"the checkpoint's weights do not fit its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})", path=path,
                             fix="give a checkpoint written by this version of `spatia pretrain`")
    model.eval()
    return model, info


def config_differences(a: SpatiaConfig, b: SpatiaConfig, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted config keys whose values differ between `a` and `b` (sections in `skip` ignored)."""

    def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    fa = flat({k: v for k, v in dataclasses.asdict(a).items() if k not in (*skip, "name")})
    fb = flat({k: v for k, v in dataclasses.asdict(b).items() if k not in (*skip, "name")})
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def architecture_differences(a: SpatiaConfig, b: SpatiaConfig) -> list[str]:
    """Dotted config keys (outside `train` and `loss`) whose values differ between `a` and `b`."""
    return config_differences(a, b, skip=NON_ARCHITECTURE_SECTIONS)


def check_vocabulary(checkpoint_genes: list[str], dataset_genes: list[str], *, checkpoint: Path,
                     dataset: Path) -> None:
    """The checkpoint's model reads count columns in its vocabulary order: the dataset must match."""
    if list(checkpoint_genes) == list(dataset_genes):
        return
    only_ckpt = sorted(set(checkpoint_genes) - set(dataset_genes))
    only_data = sorted(set(dataset_genes) - set(checkpoint_genes))
    detail = (f"{len(checkpoint_genes)} genes in the checkpoint, {len(dataset_genes)} in the dataset; "
              f"only in the checkpoint: {only_ckpt[:5]}, only in the dataset: {only_data[:5]}")
    if not only_ckpt and not only_data:
        detail = "the same genes in a different order"
    raise DatasetError(f"the dataset's gene vocabulary differs from the checkpoint's ({detail})", path=dataset,
                       fix=f"use the dataset the checkpoint {checkpoint} was trained on, or build one from "
                       "bundles with the same gene panel")


def check_architecture(config: SpatiaConfig, reference: SpatiaConfig, *, checkpoint: Path) -> None:
    """Raise `ConfigError` if `config` sizes a different network than the checkpoint's config."""
    differences = architecture_differences(config, reference)
    if differences:
        raise ConfigError(f"the config ({config.name}) sizes a different model than the checkpoint: "
                          f"{', '.join(differences[:8])}", path=checkpoint,
                          fix="leave out --config to use the checkpoint's own config, or change only "
                          "'train' and 'loss' keys")
