"""Checkpoints: exact resume (same next-step losses and weights as an uninterrupted run), stage
chaining with --from, run-directory rules and their errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import Interrupted, plumbing_config, stop_at_step
from spatia.errors import ConfigError, DatasetError, OutputExistsError, OutputWriteError
from spatia.mist import BuildConfig, build_dataset
from spatia.model import load_config
from spatia.train import load_model, pretrain, read_checkpoint

FAST = dict(cells_per_tissue=8, val_every_n_steps=3, val_batches=1, checkpoint_every_n_steps=1, log_every_n_steps=1)


@pytest.fixture(scope="module")
def dataset(simulated_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_resume") / "mist"
    build_dataset([simulated_bundle], root, BuildConfig.cpu(), seed=0)
    return root




def _run(dataset, out, **kw):
    kw.setdefault("threads", 1)
    kw.setdefault("progress_bar", False)
    return pretrain(dataset, out, **kw)


def _train_rows(run_dir):
    table = pd.read_csv(run_dir / "logs" / "metrics.csv")
    return table[table["train/total"].notna()].set_index("step")


def _state(path):
    return read_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result = _run(dataset, out, train_overrides=dict(FAST, max_steps=9))
    return out, result


@pytest.mark.parametrize("stop", [6, 4])  # mid-epoch (epoch 1, batch 2) and right after epoch 0's last batch
def test_resume_gives_identical_next_steps(dataset, tmp_path, uninterrupted, stop):
    full_dir, full = uninterrupted
    assert full.global_step == 9
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(dataset, out, train_overrides=dict(FAST, max_steps=9), callbacks=[stop_at_step(stop)])
    last = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == stop
    resumed = _run(dataset, out, resume=last)
    assert resumed.global_step == 9

    a, b = _train_rows(full_dir), _train_rows(out)
    assert list(b.index) == list(range(9))  # the interrupted steps were logged once, not twice
    for column in [c for c in a.columns if c.startswith("train/") and c != "train/grad_norm"]:
        assert a.loc[stop:, column].tolist() == b.loc[stop:, column].tolist(), column
    assert torch.equal(torch.tensor(a["train/grad_norm"].to_numpy()), torch.tensor(b["train/grad_norm"].to_numpy()))
    sa, sb = _state(full_dir / "checkpoints" / "last.ckpt"), _state(last)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_may_extend_max_steps_but_not_change_the_recipe(dataset, tmp_path):
    out = tmp_path / "run"
    _run(dataset, out, train_overrides=dict(FAST, max_steps=2))
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="train.lr"):
        _run(dataset, out, resume=last, train_overrides={"lr": 0.1})
    with pytest.raises(ConfigError, match="--stage"):
        _run(dataset, out, resume=last, stage="cell")
    with pytest.raises(ConfigError, match="loss.cell.image"):
        other = tmp_path / "other.yaml"
        other.write_text("extends: tiny\nloss:\n  cell: {image: 0.5, gene: 1.0}\n")
        _run(dataset, out, resume=last, config=other)
    # a value equal to the run's own is no change
    result = _run(dataset, out, resume=last, train_overrides={"max_steps": 3, "cells_per_tissue": 8})
    assert result.global_step == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert (out / "spatia_run.json").is_file() and (out / "spatia_run.resume-step2.json").is_file()


def test_run_directory_outputs_and_refusals(dataset, tmp_path, uninterrupted):
    full_dir, full = uninterrupted
    for name in ("config.yaml", "genes.txt", "spatia_run.json", "logs/metrics.csv", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt"):
        assert (full_dir / name).is_file(), name
    assert full.best_checkpoint == full_dir / "checkpoints" / "best.ckpt"
    assert load_config(full_dir / "config.yaml").train.max_steps == 9
    model, info = load_model(full.last_checkpoint)
    assert (full_dir / "genes.txt").read_text().split() == info.gene_symbols == model.gene_symbols
    assert info.stage == "joint" and info.global_step == 9
    columns = set(pd.read_csv(full_dir / "logs" / "metrics.csv").columns)
    assert {f"{split}/{level}/{kind}" for split in ("train", "val") for level in ("cell", "niche", "tissue")
            for kind in ("image", "gene")} <= columns

    with pytest.raises(OutputExistsError):
        _run(dataset, full_dir, train_overrides=dict(FAST, max_steps=1))
    with pytest.raises(ConfigError, match="does not exist"):
        _run(dataset, tmp_path / "nowhere", resume=full.last_checkpoint)
    with pytest.raises(ConfigError, match="--resume and --from"):
        _run(dataset, tmp_path / "x", resume=full.last_checkpoint, init_from=full.last_checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert _run(dataset, empty, config="tiny", stage="cell", train_overrides=dict(FAST, max_steps=1)).global_step == 1


def test_stage_chain_with_from_keeps_frozen_groups(dataset, tmp_path):
    cell = _run(dataset, tmp_path / "cell", stage="cell", train_overrides=dict(FAST, max_steps=2, val_batches=0))
    assert cell.best_checkpoint is None  # no validation, no best.ckpt
    niche = _run(dataset, tmp_path / "niche", stage="niche", init_from=cell.last_checkpoint,
                 train_overrides=dict(FAST, max_steps=2))
    assert niche.global_step == 2  # a new stage starts at step 0
    model_cell, _ = load_model(cell.last_checkpoint)
    model_niche, info = load_model(niche.last_checkpoint)
    assert info.stage == "niche" and info.levels == ("cell", "niche")
    groups_cell, groups_niche = model_cell.parameter_groups(), model_niche.parameter_groups()
    assert all(torch.equal(a, b) for a, b in zip(groups_cell["cell"], groups_niche["cell"]))  # frozen
    assert not all(torch.equal(a, b) for a, b in zip(groups_cell["niche"], groups_niche["niche"]))  # trained


def test_from_checks_architecture_and_vocabulary(dataset, tmp_path, simulated_bundle, uninterrupted):
    _, full = uninterrupted
    wider = tmp_path / "wider.yaml"
    wider.write_text("extends: tiny\nfusion:\n  dim: 64\n")
    with pytest.raises(ConfigError, match="fusion.dim"):
        _run(dataset, tmp_path / "a", init_from=full.last_checkpoint, config=wider)
    lower_lr = tmp_path / "lr.yaml"
    lower_lr.write_text("extends: tiny\ntrain:\n  lr: 1.0e-4\n  max_steps: 1\n  val_batches: 0\n")
    assert _run(dataset, tmp_path / "b", init_from=full.last_checkpoint, config=lower_lr).global_step == 1

    other = tmp_path / "other_mist"  # a dataset with another gene vocabulary
    build_dataset([simulated_bundle], other, BuildConfig.cpu(), seed=0)
    manifest = other / "manifest.json"
    import json

    data = json.loads(manifest.read_text())
    data["genes"] = [f"X{g}" for g in data["genes"]]
    manifest.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="vocabulary"):
        _run(other, tmp_path / "c", init_from=full.last_checkpoint)


def test_config_image_sizes_must_match_the_dataset(dataset, tmp_path):
    with pytest.raises(ConfigError, match="cell_size_px"):
        _run(dataset, tmp_path / "base", config="base", train_overrides={"max_steps": 1})


# -- writing checkpoints ---------------------------------------------------------------------------


def test_checkpoints_are_written_beside_their_target_and_never_half(dataset, tmp_path, monkeypatch):
    """No system temp folder (it may be another filesystem, or full): a run trains and
    checkpoints with the temp folder unusable. A failed write (disk full) leaves the previous
    checkpoint whole and no temporary file."""
    import tempfile

    from spatia.train import checkpoints

    blocked = tmp_path / "no_temp_here"
    blocked.write_text("a file, not a directory")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))  # any use of the temp folder fails
    result = _run(dataset, tmp_path / "run", train_overrides=dict(FAST, max_steps=2, val_batches=0))
    path = result.last_checkpoint
    assert read_checkpoint(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    monkeypatch.undo()

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OutputWriteError, match="no space left on the device"):  # a user-facing error, exit 2
        checkpoints.AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.mark.slow
def test_a_run_killed_right_after_a_checkpoint_loses_no_metric_row(dataset, tmp_path):
    """Metric rows are written to disk every 4 steps; the run dies (no clean-up, like SIGKILL)
    right after the checkpoint of step 6 and is resumed from it: it logged the same rows
    (training and validation) as an uninterrupted run, each once."""
    import subprocess
    import sys

    out = tmp_path / "run"
    overrides = dict(FAST, log_every_n_steps=4, max_steps=9)
    script = (
        "import os, sys\n"
        "import lightning as L\n"
        "from spatia.train import pretrain\n"
        "class Die(L.Callback):\n"
        "    def on_train_batch_start(self, trainer, *args):\n"
        "        if trainer.global_step == 6:\n"
        "            os._exit(137)\n"
        f"pretrain(sys.argv[1], sys.argv[2], train_overrides={overrides!r}, threads=1, progress_bar=False,\n"
        "         callbacks=[Die()])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(dataset), str(out)], capture_output=True, timeout=300)
    assert result.returncode == 137, result.stderr.decode()[-2000:]
    last = out / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    _run(dataset, out, resume=last, train_overrides=overrides)
    full = _run(dataset, tmp_path / "full", train_overrides=overrides).out_dir

    def rows(run_dir):  # (step, train row?, validation row?) of every logged row
        table = pd.read_csv(run_dir / "logs" / "metrics.csv")
        return sorted(zip(table["step"], table["train/total"].notna(), table["val/total"].notna()))

    assert rows(out) == rows(full) and any(val for _, _, val in rows(full))


def test_a_checkpoint_of_an_older_format_is_refused_with_the_fix(simulated_checkpoint, tmp_path):
    """Older formats predate today's cell level (format 1: no morphometry input; 3: 17 measures
    where there are now 23): their weights cannot fit."""
    from spatia.errors import InputDataError
    from spatia.train.module import CHECKPOINT_FORMAT, CHECKPOINT_KEY

    checkpoint = torch.load(simulated_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY]["format"] == CHECKPOINT_FORMAT == 4
    for older in (1, 3):
        checkpoint[CHECKPOINT_KEY]["format"] = older
        old = tmp_path / f"format{older}.ckpt"
        torch.save(checkpoint, old)
        with pytest.raises(InputDataError, match=f"format {older} was written before") as error:
            load_model(old)
        assert "pretrain again" in str(error.value) and "23 morphometry measures" in str(error.value)


def test_a_checkpoint_from_before_the_context_bound_embeds_unclipped(dataset, tmp_path):
    """Checkpoints written before `fusion.context_ratio` existed trained their final fusion
    without the clip: they load (and resume) with the context unbounded, not today's default."""
    from spatia.model.config import FusionConfig
    from spatia.train.module import CHECKPOINT_KEY

    assert FusionConfig().context_ratio is not None
    out = tmp_path / "run"
    _run(dataset, out, train_overrides=dict(FAST, max_steps=2))
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY]["config"]["fusion"].pop("context_ratio") == FusionConfig().context_ratio
    torch.save(checkpoint, last)
    model, info = load_model(last)
    assert info.config.fusion.context_ratio is None and model.final_fusion.context_ratio is None
    result = _run(dataset, out, resume=last, train_overrides={"max_steps": 3})  # no "cannot change" refusal
    assert result.global_step == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["fusion"]["context_ratio"] is None


def test_a_model_with_the_gene_query_trains_saves_and_embeds(dataset, tmp_path):
    """A section whose images explain little (here set: image_query_weight 0.4) trains with the
    gene query, saves it with the weights and embeds with it."""
    from spatia.train.embed import embed_model

    tiny = plumbing_config()
    config = dataclasses.replace(tiny, fusion=dataclasses.replace(tiny.fusion, image_query_weight=0.4))
    out = tmp_path / "run"
    _run(dataset, out, config=config, train_overrides=dict(FAST, max_steps=3))
    model, info = load_model(out / "checkpoints" / "last.ckpt")
    assert info.config.fusion.image_query_weight == 0.4 and model.cell_fusion.image_query_share == 0.4
    assert model.cell_fusion.gene_query is not None
    adata = embed_model(dataset, model, levels=info.levels, progress_bar=False).adata
    embedded = adata.obs["spatia_embedded"].to_numpy(dtype=bool)
    assert embedded.any() and np.isfinite(adata.obsm["X_spatia"][embedded]).all()


def test_a_checkpoint_from_before_the_gene_query_pools_through_the_image_queries_alone(dataset, tmp_path):
    """Checkpoints written before `fusion.image_query_weight` existed have no gene query: they
    load, embed and resume with the image queries' share 1, even where their measured
    morphometry weight is below 1 (which today's default would take as the share)."""
    from spatia.train.module import CHECKPOINT_KEY

    out = tmp_path / "run"
    _run(dataset, out, train_overrides=dict(FAST, max_steps=2))
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    fusion = checkpoint[CHECKPOINT_KEY]["config"]["fusion"]
    assert fusion.pop("image_query_weight") == fusion["morphometry_weight"]
    fusion["morphometry_weight"] = 0.5
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "gene_query" not in k}
    torch.save(checkpoint, last)
    model, info = load_model(last)  # strict: a gene query the weights lack would be refused
    assert info.config.fusion.image_query_weight == 1.0 and model.cell_fusion.gene_query is None
    result = _run(dataset, out, resume=last, train_overrides={"max_steps": 3})
    assert result.global_step == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["fusion"]["image_query_weight"] == 1.0


def test_a_checkpoint_from_before_the_measured_morphometry_weight_keeps_full_weight(dataset, tmp_path):
    """Format-2 checkpoints written before `fusion.morphometry_weight` existed trained with the
    measures at full weight: they load, embed and resume with weight 1, not a newly measured one."""
    from spatia.train.module import CHECKPOINT_KEY

    out = tmp_path / "run"
    _run(dataset, out, train_overrides=dict(FAST, max_steps=2))
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY]["config"]["fusion"].pop("morphometry_weight") is not None
    torch.save(checkpoint, last)
    model, info = load_model(last)
    assert info.config.fusion.morphometry_weight == 1.0 and model.cell_fusion.morphometry.weight == 1.0
    result = _run(dataset, out, resume=last, train_overrides={"max_steps": 3})  # no "cannot change" refusal
    assert result.global_step == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["fusion"]["morphometry_weight"] == 1.0
