"""SPATIA pretraining (Lightning) and embedding.

    from spatia.train import pretrain, embed_dataset
    run = pretrain("mist/", "runs/joint", config="tiny", stage="joint")
    adata = embed_dataset("mist/", run.last_checkpoint, "cells.h5ad")

Stages (cell -> niche -> tissue -> joint), checkpoints, exact resume, DDP and the embedding
AnnData are described in docs/training.md.
"""

from spatia.train.checkpoints import CheckpointInfo, architecture_differences, load_model, read_checkpoint
from spatia.train.data import BatchPosition, MistDataModule, ResumableBatchSampler, embedding_batches
from spatia.train.embed import EmbedResult, embed_dataset, embed_model
from spatia.train.module import STAGES, SpatiaPretrainModule, Stage, check_train_config, lr_scheduler
from spatia.train.pretrain import PretrainResult, pretrain

__all__ = [
    "STAGES",
    "BatchPosition",
    "CheckpointInfo",
    "EmbedResult",
    "MistDataModule",
    "PretrainResult",
    "ResumableBatchSampler",
    "SpatiaPretrainModule",
    "Stage",
    "architecture_differences",
    "check_train_config",
    "embed_dataset",
    "embed_model",
    "embedding_batches",
    "load_model",
    "lr_scheduler",
    "pretrain",
    "read_checkpoint",
]
