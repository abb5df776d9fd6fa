"""`flow_train`: the latent autoencoder and the conditional contrastive flow (a plain torch loop).

FLOW_DIR (written under a temporary name, renamed when complete):

    autoencoder.pt      CropAutoencoder state, its config, crop size, latent stats
    flow.pt             VelocityNet state (EMA weights when ema_decay > 0), raw weights, config,
                        transitions, signature coordinates, embedding standardisation
    heldout.npz         what `flow_generate` needs for the held-out pairs: crops, masks,
                        standardised control latents, conditions, pair IDs, transitions, niches
    pairs.parquet       every used pair: rows, transition, niche, heldout, noise_swapped
    train_log.json      losses every `log_every` steps, autoencoder quality, timings
    spatia_run.json     run record (config, seed, inputs, versions)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spatia.flow.autoencoder import (CropAutoencoder, LatentStats, encode_all, latent_stats, reconstruction_quality,
                                     train_autoencoder)
from spatia.flow.config import CONDITION_KEYS, OPTIONAL_CONDITION_KEYS, AutoencoderConfig, FlowModelConfig, FlowTrainConfig
from spatia.flow.data import FlowData, load_flow_data, swap_targets, training_crops
from spatia.flow.model import VelocityNet
from spatia.flow.paths import bridge, check_contrastive_weight, contrastive_fm_loss, draw_negatives, target_velocity
from spatia.outputs import atomic_output, save_torch_atomic, write_run_record

log = logging.getLogger(__name__)


@dataclass
class FlowTrainResult:
    """What `flow_train` wrote and measured."""

    out_dir: Path
    condition: str
    n_train_pairs: int
    n_heldout_pairs: int
    n_swapped_pairs: int
    autoencoder_quality: dict[str, float]
    final_loss: dict[str, float]
    steps: int
    seconds: float
    steps_per_second: float
    transitions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "condition": self.condition, "train_pairs": self.n_train_pairs,
                "heldout_pairs": self.n_heldout_pairs, "swapped_pairs": self.n_swapped_pairs,
                "autoencoder": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.autoencoder_quality.items()},
                "final_loss": {k: round(v, 5) for k, v in self.final_loss.items()}, "steps": self.steps,
                "seconds": round(self.seconds, 1), "steps_per_second": round(self.steps_per_second, 2)}


def load_autoencoder(path: str | Path) -> tuple[CropAutoencoder, LatentStats, dict]:
    """A frozen autoencoder and its latent stats from `autoencoder.pt`."""
    from spatia.errors import InputDataError

    path = Path(path)
    if path.is_dir():
        path = path / "autoencoder.pt"
    if not path.exists():
        raise InputDataError("the autoencoder file does not exist", path=path,
                             fix="give autoencoder.pt from a FLOW_DIR written by `spatia flow train`")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = CropAutoencoder(AutoencoderConfig(**state["config"]), state["image_size_px"])
    model.load_state_dict(state["state_dict"])
    model.eval().requires_grad_(False)
    return model, LatentStats(**state["stats"]), state


def _lr_factor(step: int, config) -> float:
    if config.constant_lr:
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / max(1, config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def condition_keys(condition: str, embeddings) -> tuple[str, ...]:
    """The obsm keys the flow is conditioned on: `CONDITION_KEYS[condition]`, less the spatial
    levels the embeddings lack (a checkpoint whose stage ran no niche or tissue level), with a
    warning. A required key that is missing stays in, so the caller can refuse it."""
    keys = CONDITION_KEYS[condition]
    absent = [k for k in keys if k in OPTIONAL_CONDITION_KEYS and k not in embeddings]
    if absent:
        log.warning("condition %r: the embeddings have no %s (the checkpoint ran no such level); conditioning "
                    "on %s", condition, " or ".join(absent), " + ".join(k for k in keys if k not in absent))
    return tuple(k for k in keys if k not in absent)


def split_validation(train, fraction: float, seed: int):
    """(training pairs, validation pairs or None): a seeded `fraction` of each transition's pairs
    (at least one where a transition has two or more) for early stopping."""
    if fraction <= 0:
        return train, None
    rng = np.random.default_rng(seed)
    val_rows = []
    for _, rows in train.groupby("transition", sort=True).indices.items():
        k = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            val_rows.extend(rng.choice(rows, max(1, min(k, len(rows) - 1)), replace=False).tolist())
    if not val_rows:
        return train, None
    is_val = np.zeros(len(train), bool)
    is_val[val_rows] = True
    return train[~is_val].reset_index(drop=True), train[is_val].reset_index(drop=True)


@torch.no_grad()
def validation_loss(net: VelocityNet, val, lat: torch.Tensor, z_all: torch.Tensor | None, coords: torch.Tensor,
                    seed: int, draws: int = 4) -> float:
    """Plain flow-matching loss (no contrastive term, no condition drop) on the validation pairs,
    at `draws` seeded times per pair: the same times at every call, so calls compare."""
    gen = torch.Generator().manual_seed(seed + 3)
    c = torch.from_numpy(val["ctrl_row"].to_numpy())
    g = torch.from_numpy(val["tgt_row"].to_numpy())
    trans = torch.from_numpy(val["transition"].to_numpy().astype(np.int64))
    was_training = net.training
    net.eval()
    total = 0.0
    for _ in range(draws):
        l0, l1 = lat[c], lat[g]
        t = torch.rand(len(c), generator=gen)
        v = net(bridge(l0, l1, t), t, None if z_all is None else z_all[c], trans, coords[trans], None, None)
        total += float((v - target_velocity(l0, l1)).pow(2).mean())
    net.train(was_training)
    return total / draws


def build_velocity_net(model_config: FlowModelConfig, latent_channels: int, z_dim: int | None, n_transitions: int,
                       n_coords: int) -> VelocityNet:
    return VelocityNet(model_config, latent_channels, z_dim, n_transitions, n_coords)


def flow_train(dataset: str | Path, pairs_dir: str | Path, embeddings: str | Path, out_dir: str | Path,
               config: FlowTrainConfig = FlowTrainConfig(), seed: int = 0, *, autoencoder: str | Path | None = None,
               data: FlowData | None = None, log_every: int = 50) -> FlowTrainResult:
    """Train (or reuse) the autoencoder and train the flow; write FLOW_DIR (refused if it exists).

    Args:
        dataset: MIST dataset directory (`spatia build`), the source of the crops.
        pairs_dir: folder written by `spatia pair` (pairs.parquet, signatures.npz).
        embeddings: `.h5ad` written by `spatia embed` (obsm X_spatia, X_spatia_cell).
        out_dir: FLOW_DIR to create.
        config: `FlowTrainConfig`.
        seed: seeds the holdout, pair noise, initialisation, batches, times and condition drops.
        autoencoder: reuse this autoencoder.pt (or FLOW_DIR) instead of training one.
        data: already loaded inputs (`load_flow_data`), e.g. shared by the ablation variants.
    """
    check_contrastive_weight(config.contrastive_weight)
    if not 0.0 <= config.pair_noise < 1.0:
        from spatia.errors import ConfigError

        raise ConfigError(f"pair_noise = {config.pair_noise}", fix="use a fraction in [0, 1)")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if data is None:
        data = load_flow_data(dataset, pairs_dir, embeddings, signature_pcs=config.model.signature_pcs,
                              holdout=config.holdout, holdout_fraction=config.holdout_fraction, seed=seed)
    pairs = data.pairs
    train = pairs[~pairs["heldout"]].reset_index(drop=True)
    held = pairs[pairs["heldout"]].reset_index(drop=True)
    if len(train) == 0 or len(held) == 0:
        from spatia.errors import InputDataError

        raise InputDataError(f"{len(train)} training and {len(held)} held-out pairs", path=pairs_dir,
                             fix="pair more cells, or use holdout='random'")

    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        # 1. autoencoder
        held_cells = np.unique(np.concatenate([held["ctrl_row"], held["tgt_row"]]))
        train_cells = np.setdiff1d(np.unique(np.concatenate([train["ctrl_row"], train["tgt_row"]])), held_cells)
        if autoencoder is not None:
            ae, _, ae_state = load_autoencoder(autoencoder)
            ae_history = ae_state.get("history", [])
        elif config.autoencoder.cells == "dataset":
            fit_images, fit_masks = training_crops(dataset, data.cell_ids[held_cells], config.autoencoder.max_cells, seed)
            ae, ae_history = train_autoencoder(fit_images, fit_masks, config.autoencoder, seed)
        else:
            rng = np.random.default_rng(seed)
            fit_cells = train_cells if len(train_cells) <= config.autoencoder.max_cells else \
                np.sort(rng.choice(train_cells, config.autoencoder.max_cells, replace=False))
            ae, ae_history = train_autoencoder(data.images[fit_cells], data.masks[fit_cells], config.autoencoder, seed)
        latents = encode_all(ae, data.images, data.masks)
        stats = latent_stats(latents[torch.from_numpy(train_cells)])
        quality = reconstruction_quality(ae, data.images[held_cells], data.masks[held_cells])
        save_torch_atomic({"config": ae.config.__dict__, "image_size_px": ae.image_size_px, "state_dict": ae.state_dict(),
                           "stats": stats.to_dict(), "history": ae_history, "heldout_quality": quality},
                          tmp / "autoencoder.pt")
        lat = stats.standardise(latents)

        # 2. conditions
        keys = condition_keys(config.condition, data.embeddings)
        missing = [k for k in keys if k not in data.embeddings]
        if missing:
            from spatia.errors import InputDataError

            raise InputDataError(f"the embeddings lack obsm[{missing[0]!r}] needed by condition {config.condition!r}",
                                 path=embeddings, fix="embed with a checkpoint whose stage gives that key")
        key = "+".join(keys) if keys else None
        z_all = None
        z_mean = z_std = z_proj = None
        if keys:
            z_raw = torch.from_numpy(np.concatenate([data.embeddings[k] for k in keys], axis=1))
            ctrl_train = torch.from_numpy(train["ctrl_row"].to_numpy())
            z_mean, z_std = z_raw[ctrl_train].mean(0), z_raw[ctrl_train].std(0).clamp_min(1e-6)
            z_all = (z_raw - z_mean) / z_std
            if config.model.embedding_pcs > 0:  # keep the top principal directions of the training controls
                _, _, v = torch.linalg.svd(z_all[ctrl_train] - z_all[ctrl_train].mean(0), full_matrices=False)
                z_proj = v[: config.model.embedding_pcs].T.contiguous()
                z_all = z_all @ z_proj
                z_all = z_all / z_all[ctrl_train].std(0).clamp_min(1e-6)
        coords = torch.from_numpy(data.signature_coords)
        niche_codes = {n: i for i, n in enumerate(sorted(pairs["niche"].astype(str).unique()))}

        # 3. pair noise on the training pairs
        groups = train["slide_id"].astype(str).to_numpy()
        if config.pair_noise_scope == "transition_slide":
            groups = groups + "|" + train["transition_tag"].astype(str).to_numpy()
        tgt_rows, swapped = swap_targets(train["tgt_row"].to_numpy(), groups, config.pair_noise, seed + 1)
        train = train.assign(tgt_row=tgt_rows, noise_swapped=swapped)

        # 4. flow (optionally with a validation part of the training pairs, for early stopping)
        train, val = split_validation(train, config.optim.validation_fraction, seed + 2)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if config.model.patch < 1 or lat.shape[-1] % config.model.patch or lat.shape[-2] % config.model.patch:
            from spatia.errors import ConfigError

            raise ConfigError(f"model.patch = {config.model.patch} does not divide the latent map "
                              f"{tuple(lat.shape[-2:])}", fix="use a patch size that divides the latent side (1, 2, ...)")
        net = build_velocity_net(config.model, lat.shape[1], None if z_all is None else z_all.shape[1],
                                 len(data.transitions), coords.shape[1])
        ema = copy.deepcopy(net).requires_grad_(False) if config.optim.ema_decay > 0 else None
        opt = torch.optim.AdamW(net.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.optim))
        c_rows = torch.from_numpy(train["ctrl_row"].to_numpy())
        t_rows = torch.from_numpy(train["tgt_row"].to_numpy())
        trans = torch.from_numpy(train["transition"].to_numpy().astype(np.int64))
        niche = torch.tensor([niche_codes[str(n)] for n in train["niche"]], dtype=torch.int64)
        score = torch.from_numpy(train["match_score"].to_numpy().astype(np.float32))
        weights = score / score.mean() if config.weight_by_match_score else torch.ones_like(score)
        history: list[dict[str, float]] = []
        flow_started = time.perf_counter()
        p_drop = config.model.condition_dropout
        parts: dict[str, float] = {}
        val_history: list[dict[str, float]] = []
        best: tuple[float, int, dict] = (math.inf, -1, {})
        for step in range(config.optim.steps):
            idx = torch.randint(0, len(train), (min(config.optim.batch_size, len(train)),), generator=gen)
            l0, l1 = lat[c_rows[idx]], lat[t_rows[idx]]
            t = torch.rand(len(idx), generator=gen)
            lt, u = bridge(l0, l1, t), target_velocity(l0, l1)
            j, has_neg = draw_negatives(trans[idx], niche[idx], gen)
            drop_z = torch.rand(len(idx), generator=gen) < p_drop
            drop_p = torch.rand(len(idx), generator=gen) < p_drop
            z = None if z_all is None else z_all[c_rows[idx]]
            v = net(lt, t, z, trans[idx], coords[trans[idx]], drop_z, drop_p)
            loss, parts = contrastive_fm_loss(v, u, weights[idx], u_neg=u[j], has_neg=has_neg,
                                              contrastive_weight=config.contrastive_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                # warm-up: the average does not remember the untrained start in short runs
                decay = min(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1.0 - decay)
            if step % log_every == 0 or step == config.optim.steps - 1:
                history.append({"step": step, "loss": float(loss.detach()), **parts, "lr": sched.get_last_lr()[0]})
            if val is not None and ((step + 1) % config.optim.validate_every == 0 or step == config.optim.steps - 1):
                current = ema if ema is not None else net
                val_loss = validation_loss(current, val, lat, z_all, coords, seed)
                val_history.append({"step": step, "val_fm": val_loss})
                if val_loss < best[0]:
                    best = (val_loss, step, copy.deepcopy(current.state_dict()))
        flow_seconds = time.perf_counter() - flow_started
        final = ema if ema is not None else net
        validation = None
        if val is not None:
            final.load_state_dict(best[2])
            validation = {"pairs": int(len(val)), "best_step": best[1], "best_val_fm": best[0], "history": val_history}
        save_torch_atomic({
            "config": json.loads(json.dumps(config, default=lambda o: o.__dict__)),
            "state_dict": final.state_dict(), "raw_state_dict": net.state_dict(),
            "latent_channels": lat.shape[1], "z_dim": None if z_all is None else z_all.shape[1],
            "z_key": key, "z_mean": z_mean, "z_std": z_std, "z_projection": z_proj, "transitions": data.transitions,
            "signature_coords": coords, "niche_codes": niche_codes,
        }, tmp / "flow.pt")

        # 5. held-out pairs for generation
        hc, ht = held["ctrl_row"].to_numpy(), held["tgt_row"].to_numpy()
        z_held = np.zeros((len(held), 0), np.float32) if z_all is None else z_all[torch.from_numpy(hc)].numpy()
        def text(column: str) -> np.ndarray:
            return np.asarray(held[column].astype(str).to_numpy(), dtype=str)

        np.savez_compressed(
            tmp / "heldout.npz", pair_id=held["pair_id"].to_numpy(), transition=held["transition"].to_numpy(),
            transition_tag=text("transition_tag"), niche=text("niche"), slide_id=text("slide_id"),
            x_ctrl_id=text("x_ctrl_id"), x_tgt_id=text("x_tgt_id"), ctrl_images=data.images[hc],
            ctrl_masks=data.masks[hc], tgt_images=data.images[ht], tgt_masks=data.masks[ht],
            ctrl_latents=lat[torch.from_numpy(hc)].numpy(), z=z_held, transitions=np.asarray(data.transitions, dtype=str),
        )
        pairs_out = pairs.assign(noise_swapped=False)
        pairs_out.loc[~pairs_out["heldout"], "noise_swapped"] = swapped
        pairs_out.loc[~pairs_out["heldout"], "tgt_row_used"] = tgt_rows
        pairs_out.to_parquet(tmp / "pairs.parquet", index=False)
        seconds = time.perf_counter() - started
        result = FlowTrainResult(out_dir, config.condition, len(train), len(held), int(swapped.sum()), quality,
                                 {k: float(v) for k, v in history[-1].items() if k != "step"} if history else {},
                                 config.optim.steps, seconds, config.optim.steps / max(flow_seconds, 1e-9),
                                 list(data.transitions))
        (tmp / "train_log.json").write_text(json.dumps({"flow": history, "validation": validation,
                                                        "autoencoder": ae_history, "summary": result.summary()},
                                                       indent=2) + "\n")
        write_run_record(tmp, "flow train", {"flow_train": config, "inputs": {
            "dataset": str(dataset), "pairs": str(pairs_dir), "embeddings": str(embeddings),
            "autoencoder": None if autoencoder is None else str(autoencoder)}}, seed)
    return result
