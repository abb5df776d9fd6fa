"""The distributed path: DDP with 2 CPU processes (gloo, spawned) trains a few steps and embeds,
and terminates cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np

from spatia.train import embed_dataset, pretrain, read_checkpoint


class RecordTissues(L.Callback):
    """Writes, per rank, the tissue regions of every training batch and the world size."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = self.directory / f"rank{trainer.global_rank}.jsonl"
        with open(path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "world": trainer.world_size,
                                     "tissues": list(batch["tissue_id"])}) + "\n")


def test_ddp_two_cpu_processes(simulated_mist, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    run = pretrain(simulated_mist, tmp_path / "run", train_overrides=dict(max_steps=3, cells_per_tissue=8, val_batches=1,
                                                                   val_every_n_steps=2, log_every_n_steps=1),
                   devices=2, accelerator="cpu", start_method="spawn", threads=1, progress_bar=False,
                   callbacks=[RecordTissues(records)])
    assert run.global_step == 3
    checkpoint = read_checkpoint(run.last_checkpoint)
    assert checkpoint["global_step"] == 3
    ranks = [[json.loads(line) for line in (records / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    assert all(entry["world"] == 2 for r in ranks for entry in r)
    for a, b in zip(*ranks):  # each rank draws its own share of the localised batches
        assert a["step"] == b["step"] and not set(a["tissues"]) & set(b["tissues"])

    single = embed_dataset(simulated_mist, run.last_checkpoint, splits=["test", "val"], threads=1, progress_bar=False)
    double = embed_dataset(simulated_mist, run.last_checkpoint, splits=["test", "val"], devices=2, accelerator="cpu",
                           start_method="spawn", threads=1, progress_bar=False)
    assert list(double.adata.obs_names) == list(single.adata.obs_names)
    for key in ("X_spatia", "X_spatia_niche"):
        np.testing.assert_allclose(double.adata.obsm[key], single.adata.obsm[key], atol=1e-5)
