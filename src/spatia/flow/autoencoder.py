"""Latent autoencoder of cell crops: (image, cell mask) -> latent map -> (image, mask).

A small convolutional encoder takes the 2-channel crop (grey image in [0, 1], mask in {0, 1})
to a `latent_channels x S/2^d x S/2^d` map (4 x 8 x 8 for 64 px crops, d = 3); the decoder
mirrors it and returns the image (sigmoid) and the mask logit. Trained once with image MSE +
`mask_weight` x mask BCE + `gradient_weight` x L1 of the image-gradient error (texture), then
frozen; the flow works on latents standardised per channel
(`LatentStats`) over the training cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatia.flow.config import AutoencoderConfig
from spatia.flow.quality import psnr, ssim


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class _Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, down: bool = False, up: bool = False):
        super().__init__()
        self.up = up
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2 if down else 1, padding=1)
        self.norm = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.silu(self.norm(self.conv1(x)))
        return F.silu(self.conv2(x))


class CropAutoencoder(nn.Module):
    """Encoder (B, 2, S, S) -> (B, C, S/2^d, S/2^d) and decoder back."""

    def __init__(self, config: AutoencoderConfig, image_size_px: int):
        super().__init__()
        if config.downsamples < 1 or image_size_px % (2**config.downsamples):
            from spatia.errors import ConfigError

            raise ConfigError(f"crops of {image_size_px} px cannot be halved {config.downsamples} times",
                              fix="choose autoencoder.downsamples so that 2**downsamples divides the crop size")
        self.config = config
        self.image_size_px = int(image_size_px)
        # the first downsampling is the stem itself (4 x 4, stride 2) and the last upsampling the
        # head (transposed 4 x 4, stride 2): no convolution runs at full resolution (CPU cost)
        widths = [min(config.width * 2**i, config.width * 4) for i in range(config.downsamples)]
        self.stem = nn.Conv2d(2, widths[0], 4, stride=2, padding=1)
        self.down = nn.ModuleList(_Stage(widths[i], widths[i + 1], down=True) for i in range(config.downsamples - 1))
        self.to_latent = nn.Conv2d(widths[-1], config.latent_channels, 1)
        self.from_latent = nn.Conv2d(config.latent_channels, widths[-1], 1)
        self.up = nn.ModuleList(_Stage(widths[i + 1], widths[i], up=True) for i in reversed(range(config.downsamples - 1)))
        self.head = nn.ConvTranspose2d(widths[0], 2, 4, stride=2, padding=1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size_px // 2**self.config.downsamples
        return (self.config.latent_channels, side, side)

    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images float (B, S, S) in [0, 1], masks (B, S, S) -> latents (B, C, h, w)."""
        x = torch.stack([images, masks.to(images.dtype)], dim=1)
        x = F.silu(self.stem(x))
        for stage in self.down:
            x = stage(x)
        return self.to_latent(x)

    def decode_logits(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.silu(self.from_latent(latents))
        for stage in self.up:
            x = stage(x)
        out = self.head(F.silu(x))
        return torch.sigmoid(out[:, 0]), out[:, 1]

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents -> (images float (B, S, S) in [0, 1], zero outside the mask; masks bool)."""
        image, mask_logit = self.decode_logits(latents)
        mask = mask_logit > 0
        return image * mask, mask


@dataclass
class LatentStats:
    """Per-channel mean and std of the training latents (standardised latents = (l - mean) / std)."""

    mean: list[float]
    std: list[float]

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, dtype=like.dtype).view(shape), torch.tensor(self.std, dtype=like.dtype).view(shape))

    def standardise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors(latents)
        return (latents - mean) / std

    def unstandardise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors(latents)
        return latents * std + mean

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the horizontal and vertical finite differences of two image
    batches (B, S, S): MSE alone is minimised by a blur of the texture; this term is not."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 crops -> float32 tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)


def train_autoencoder(images: np.ndarray, masks: np.ndarray, config: AutoencoderConfig, seed: int,
                      log_every: int = 100) -> tuple[CropAutoencoder, list[dict]]:
    """Train the autoencoder on uint8 crops (N, S, S) and bool masks; returns it frozen (eval
    mode, no gradients) and its loss log."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CropAutoencoder(config, images.shape[-1])
    x, m = to_float(images), torch.from_numpy(np.asarray(masks, dtype=np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(1, config.steps))))
    history = []
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=gen)
        xb, mb = x[idx], m[idx]
        image, mask_logit = model.decode_logits(model.encode(xb, mb))
        loss_img = F.mse_loss(image, xb)
        loss_mask = F.binary_cross_entropy_with_logits(mask_logit, mb)
        loss = loss_img + config.mask_weight * loss_mask
        if config.gradient_weight > 0:
            loss = loss + config.gradient_weight * gradient_loss(image, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == config.steps - 1:
            history.append({"step": step, "image_mse": float(loss_img.detach()), "mask_bce": float(loss_mask.detach())})
    model.eval().requires_grad_(False)
    return model, history


@torch.no_grad()
def encode_all(model: CropAutoencoder, images: np.ndarray, masks: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Latents (N, C, h, w) of uint8 crops."""
    out = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        out.append(model.encode(to_float(images[sl]), torch.from_numpy(np.asarray(masks[sl]))))
    return torch.cat(out) if out else torch.zeros((0, *model.latent_shape))


@torch.no_grad()
def decode_all(model: CropAutoencoder, latents: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, S, S) and bool masks from (unstandardised) latents."""
    images, masks = [], []
    for start in range(0, len(latents), batch_size):
        image, mask = model.decode(latents[start:start + batch_size])
        images.append(np.rint(image.numpy() * 255.0).astype(np.uint8))
        masks.append(mask.numpy())
    size = model.image_size_px
    if not images:
        return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), bool)
    return np.concatenate(images), np.concatenate(masks)


def latent_stats(latents: torch.Tensor) -> LatentStats:
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return LatentStats(mean.tolist(), std.tolist())


@torch.no_grad()
def reconstruction_quality(model: CropAutoencoder, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of reconstructions of uint8 crops, and mask IoU."""
    recon, recon_mask = decode_all(model, encode_all(model, images, masks))
    inter = np.logical_and(recon_mask, masks).sum()
    union = np.logical_or(recon_mask, masks).sum()
    return {"psnr_db": float(np.mean(psnr(recon, images))), "ssim": float(np.mean(ssim(recon, images))),
            "mask_iou": float(inter / max(union, 1)), "n_cells": int(len(images))}
