"""`flow_generate`: predicted target crops for the held-out pairs of every transition.

GEN_DIR (written under a temporary name, renamed when complete):

    generated.npz     pair_id, transition_tag, niche, slide_id, x_ctrl_id, x_tgt_id,
                      generated_images uint8 (N, S, S), generated_masks bool, the control and
                      real target crops and masks (ctrl_images, ctrl_masks, tgt_images, tgt_masks),
                      and the autoencoder's reconstructions of both (recon_ctrl_images: a
                      zero-step flow; recon_tgt_images: the latent model's ceiling)
    grid_<transition>.png   rows of control | generated | real target
    generate.json     counts, sampler, steps, guidance, images per second, the flow's variant
    spatia_run.json   run record
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spatia.errors import InputDataError
from spatia.flow.autoencoder import decode_all, encode_all
from spatia.flow.config import FlowGenerateConfig, FlowModelConfig
from spatia.flow.model import VelocityNet
from spatia.flow.sample import integrate
from spatia.flow.train import load_autoencoder
from spatia.outputs import atomic_output, write_run_record


@dataclass
class FlowGenerateResult:
    out_dir: Path
    n_images: int
    per_transition: dict[str, int]
    seconds: float
    images_per_second: float

    def summary(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "images": self.n_images, "per_transition": self.per_transition,
                "seconds": round(self.seconds, 2), "images_per_second": round(self.images_per_second, 1)}


def load_flow(flow_dir: str | Path, *, raw: bool = False) -> tuple[VelocityNet, dict]:
    """The trained velocity network (EMA weights unless `raw`) and its checkpoint dict."""
    path = Path(flow_dir) / "flow.pt"
    if not path.exists():
        raise InputDataError("flow.pt is missing", path=flow_dir, fix="give a FLOW_DIR written by `spatia flow train`")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model_config = FlowModelConfig(**state["config"]["model"])
    net = VelocityNet(model_config, state["latent_channels"], state["z_dim"], len(state["transitions"]),
                      state["signature_coords"].shape[1])
    net.load_state_dict(state["raw_state_dict" if raw else "state_dict"])
    return net.eval().requires_grad_(False), state


@torch.no_grad()
def predict_latents(net: VelocityNet, l0: torch.Tensor, z: torch.Tensor | None, transition: torch.Tensor,
                    coords: torch.Tensor, config: FlowGenerateConfig) -> torch.Tensor:
    """Integrate the guided field from the control latents l0 (standardised) to t = 1."""
    out = []
    for start in range(0, len(l0), config.batch_size):
        sl = slice(start, start + config.batch_size)
        zb = None if z is None else z[sl]
        tb = transition[sl]
        cb = coords[tb]

        def field(x, t, zb=zb, tb=tb, cb=cb):
            return net.guided(x, t, zb, tb, cb, config.guidance)

        out.append(integrate(field, l0[sl], config.steps, config.sampler))
    return torch.cat(out) if out else l0[:0]


def flow_generate(flow_dir: str | Path, out_dir: str | Path, config: FlowGenerateConfig = FlowGenerateConfig(),
                  seed: int = 0) -> FlowGenerateResult:
    """Generate the held-out pairs' targets with the flow in FLOW_DIR; write GEN_DIR."""
    flow_dir, out_dir = Path(flow_dir), Path(out_dir)
    torch.manual_seed(seed)
    net, state = load_flow(flow_dir)
    ae, stats, _ = load_autoencoder(flow_dir / "autoencoder.pt")
    with np.load(flow_dir / "heldout.npz", allow_pickle=False) as f:
        held = {k: f[k] for k in f.files}
    started = time.perf_counter()
    l0 = torch.from_numpy(held["ctrl_latents"])
    z = torch.from_numpy(held["z"]) if state["z_dim"] else None
    transition = torch.from_numpy(held["transition"].astype(np.int64))
    latents = predict_latents(net, l0, z, transition, state["signature_coords"], config)
    images, masks = decode_all(ae, stats.unstandardise(latents))
    seconds = time.perf_counter() - started
    # references: the control's latent decoded (a zero-step flow) and the real target through the
    # autoencoder (the best any latent model can do)
    recon_ctrl, _ = decode_all(ae, stats.unstandardise(l0))
    recon_tgt, _ = decode_all(ae, encode_all(ae, held["tgt_images"], held["tgt_masks"]))
    tags = held["transition_tag"]
    per_transition = {str(t): int((tags == t).sum()) for t in np.unique(tags)}
    run_config = json.loads((flow_dir / "spatia_run.json").read_text())["config"] if (flow_dir / "spatia_run.json").exists() else {}
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        np.savez_compressed(
            tmp / "generated.npz", generated_images=images, generated_masks=masks, recon_ctrl_images=recon_ctrl,
            recon_tgt_images=recon_tgt,
            **{k: held[k] for k in ("pair_id", "transition_tag", "niche", "slide_id", "x_ctrl_id", "x_tgt_id",
                                    "ctrl_images", "ctrl_masks", "tgt_images", "tgt_masks")})
        for name in per_transition:
            rows = np.flatnonzero(tags == name)[: config.grid_rows]
            write_grid(tmp / f"grid_{safe_name(name)}.png", held["ctrl_images"][rows], images[rows],
                       held["tgt_images"][rows])
        result = FlowGenerateResult(out_dir, len(images), per_transition, seconds, len(images) / max(seconds, 1e-9))
        info = {**result.summary(), "sampler": config.sampler, "steps": config.steps, "guidance": config.guidance,
                "flow_dir": str(flow_dir), "condition": state["config"].get("condition"),
                "flow_train_config": run_config.get("flow_train")}
        (tmp / "generate.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        write_run_record(tmp, "flow generate", {"flow_generate": config, "flow_dir": str(flow_dir)}, seed)
    return result


def safe_name(name: str) -> str:
    """A file-name-safe version of a transition name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def write_grid(path: Path, *columns: np.ndarray, scale: int = 2, gap_px: int = 2) -> Path:
    """A PNG with one row per example and one column per image set (uint8 (n, S, S) each)."""
    from PIL import Image

    n = min(len(c) for c in columns)
    if n == 0:
        return path
    s = columns[0].shape[-1]
    cell = s + gap_px
    canvas = np.full((n * cell + gap_px, len(columns) * cell + gap_px), 255, np.uint8)
    for r in range(n):
        for c, col in enumerate(columns):
            canvas[gap_px + r * cell: gap_px + r * cell + s, gap_px + c * cell: gap_px + c * cell + s] = col[r]
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    image.save(path)
    return path
