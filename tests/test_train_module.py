"""Pretraining module: stages and freezing, schedule, config checks, loss falls on a fixed batch."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from spatia.errors import ConfigError
from spatia.model import BatchSizes, load_config, synthetic_batch, synthetic_gene_symbols
from spatia.model.config import config_from_dict
from spatia.train import STAGES, SpatiaPretrainModule, check_train_config, lr_scheduler
from spatia.train.module import step_seed


def _config(**train):
    config = load_config("tiny")
    data = config.to_dict()
    data["train"].update(train)
    return config_from_dict(data, source="test")


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_trains_its_groups_and_freezes_the_rest(stage):
    module = SpatiaPretrainModule(load_config("tiny"), synthetic_gene_symbols(40), stage=stage)
    groups = module.model.parameter_groups()
    spec = STAGES[stage]
    for name, params in groups.items():
        assert all(p.requires_grad == (name in spec.trained_groups) for p in params), (stage, name)
    module.train()
    frozen_params = {id(p) for p in module.model.parameters() if not p.requires_grad}
    for m in module.model.modules():  # frozen modules and everything in them stay in eval (no dropout)
        params = list(m.parameters())
        if params and all(id(p) in frozen_params for p in params):
            assert all(not sub.training for sub in m.modules()), (stage, type(m).__name__)
    if stage == "joint":
        assert not module._frozen_modules and all(m.training for m in module.model.modules())
    else:
        assert module.model.gene_decoder.training  # shared modules train in every stage

    batch = synthetic_batch(load_config("tiny"), BatchSizes(n_tissues=1, cells_per_tissue=16, n_genes=40), seed=3)
    out = module.model(batch, levels=spec.levels, generator=torch.Generator().manual_seed(0))
    expected = {f"{level}/{kind}" for level in spec.levels for kind in ("image", "gene")} | {"total"}
    expected |= {"cell/morphometry"}  # tiny's default weight 0.3; the cell level runs in every stage
    assert set(out.losses) == expected
    out.losses["total"].backward()
    for name, params in groups.items():
        if name not in spec.trained_groups:
            assert all(p.grad is None for p in params), (stage, name)
        else:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (stage, name)


def test_unknown_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown stage"):
        SpatiaPretrainModule(load_config("tiny"), synthetic_gene_symbols(10), stage="slide")


def _lr_curve(schedule: str, steps: int = 101, **kw) -> list[float]:
    """Learning rate at each optimiser step 0..steps-1 (base rate 1), stepping as Lightning does."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, schedule=schedule, **kw)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_lr_schedule():
    kw = dict(max_steps=100, warmup_steps=10, min_ratio=0.1)
    cosine = _lr_curve("cosine", **kw)
    assert cosine[0] == pytest.approx(0.1)                    # warm-up from 1/warmup_steps
    assert cosine[9] == pytest.approx(0.91) and cosine[10] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[100] == pytest.approx(0.1)                  # min_lr_ratio at max_steps
    assert all(a >= b - 1e-12 for a, b in zip(cosine[10:], cosine[11:]))  # monotone decay after warm-up
    constant = _lr_curve("constant", **kw)
    assert constant[50] == constant[100] == 1.0 and constant[0] == pytest.approx(0.1)
    assert _lr_curve("cosine", steps=3, max_steps=100, warmup_steps=0, min_ratio=0.1)[0] == 1.0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_steps", 0, "train.max_steps"),
    ("lr_schedule", "linear", "train.lr_schedule"),
    ("min_lr_ratio", 1.5, "train.min_lr_ratio"),
    ("grad_clip_norm", -1.0, "train.grad_clip_norm"),
    ("val_batches", -2, "train.val_batches"),
    ("max_epochs", 0, "train.max_epochs"),
])
def test_bad_train_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(_config(**{key: value}))


def test_packaged_configs_pass_the_train_checks():
    for name in ("tiny", "base"):
        check_train_config(load_config(name))


def test_step_seeds_differ_by_step_and_rank():
    seeds = {step_seed(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200
    assert step_seed(1, 0, 0) != step_seed(0, 0, 0)
    assert step_seed(7, 3, 1) == step_seed(7, 3, 1)
    assert 0 <= step_seed(7, 3, 1) < 2**63


def test_loss_falls_on_a_fixed_batch_through_the_trainer(tmp_path):
    """The real training step (AdamW groups, warm-up, clipping, per-level logging) in Lightning."""
    config = _config(lr=1e-3, warmup_steps=5, max_steps=40, lr_schedule="constant")
    batch = synthetic_batch(config, BatchSizes(n_tissues=1, cells_per_tissue=32, n_genes=60), seed=2)
    torch.manual_seed(0)
    module = SpatiaPretrainModule(config, synthetic_gene_symbols(60), stage="joint", seed=0)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    loader = torch.utils.data.DataLoader([batch] * 40, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=loader)
    assert len(history) == 40
    keys = {"train/total", "train/lr", "train/grad_norm"} | {f"train/{lv}/{k}" for lv in ("cell", "niche", "tissue")
                                                            for k in ("image", "gene")}
    assert keys <= set(history[0])
    first = {k: sum(h[k] for h in history[:3]) / 3 for k in keys}
    last = {k: sum(h[k] for h in history[-3:]) / 3 for k in keys}
    # the negative-binomial loss has a floor (the counts' own noise), so the total falls less than MSE did
    assert last["train/total"] < 0.8 * first["train/total"], (first["train/total"], last["train/total"])
    for level in ("cell", "niche", "tissue"):
        for kind in ("image", "gene"):
            key = f"train/{level}/{kind}"
            assert last[key] < first[key], key
    assert history[0]["train/lr"] == pytest.approx(1e-3 / 5)  # warm-up step 1 of 5
    assert history[-1]["train/lr"] == pytest.approx(1e-3)


def test_weight_decay_skips_biases_norms_and_embeddings():
    module = SpatiaPretrainModule(load_config("tiny"), synthetic_gene_symbols(20), stage="cell")
    optimizer = module.configure_optimizers()["optimizer"]
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay
    assert all(names[i].endswith(".weight") for i in decay)
    assert id(module.model.gene_encoder.embedding.weight) not in decay
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.model.parameters() if p.requires_grad}  # frozen groups left out


@pytest.mark.parametrize("turn", [True, False])
def test_the_training_step_turns_the_cell_crops_when_configured(turn):
    """`train.cell_orientations`: the model sees each crop (and its mask, the same way) in one of its
    eight orientations, drawn from the step's seed; niche and tissue images as they are."""
    from spatia.model.dihedral import orient

    config = _config(cell_orientations=turn)
    module = SpatiaPretrainModule(config, synthetic_gene_symbols(40), stage="joint", seed=4)
    batch = synthetic_batch(config, BatchSizes(n_tissues=1, cells_per_tissue=16, n_genes=40), seed=3)
    seen = []
    forward = module.model.forward

    def spy(b, **kwargs):
        seen.append(b)
        return forward(b, **kwargs)

    module.model.forward = spy
    module.log = lambda *args, **kwargs: None
    module.lr_schedulers = lambda: None
    images = batch["cell_image"].clone()
    module.training_step(dict(batch), 0)
    module.training_step(dict(batch), 0)  # the same step again: the same draws
    first, again = seen
    assert torch.equal(first["cell_image"], again["cell_image"])
    assert torch.equal(batch["cell_image"], images)  # the caller's batch is not changed
    assert first["niche_image"] is batch["niche_image"]
    codes = [next(c for c in range(8) if torch.equal(first["cell_image"][i], orient(images[i], c)))
             for i in range(len(images))]
    for i, code in enumerate(codes):
        assert torch.equal(first["cell_mask"][i], orient(batch["cell_mask"][i], code))
    assert (len(set(codes)) > 1) == turn and (set(codes) == {0}) == (not turn)
