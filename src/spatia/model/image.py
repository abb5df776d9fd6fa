"""Image encoder: a ViT with MAE masking over cell, niche and tissue images.

The encoder is the ViT-MAE encoder (pre-LayerNorm blocks, a CLS token, fixed 2-D sine-cosine
patch positions) written with fused QKV projections and `scaled_dot_product_attention`, so it
runs fast on CPU. Its weights load from a local Hugging Face `ViTMAE` directory
(`load_vitmae_weights`): `transformers` reads the directory, we copy the tensors across.

Masking is MAE's: a random subset of patches is dropped *before* the encoder, so the pixels of
masked patches never reach the visible tokens.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spatia.errors import ConfigError, InputDataError
from spatia.model.config import ImageConfig
from spatia.model.layers import SelfAttentionBlock, patchify, sincos_2d

log = logging.getLogger(__name__)


def random_patch_mask(n: int, n_patches: int, mask_ratio: float, *, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw MAE masks for `n` images of `n_patches` patches.

    Keeps `int(n_patches * (1 - mask_ratio))` patches per image (ViTMAE's count), uniformly at
    random. Returns `keep` int64 `(n, n_keep)` (patch indices, ascending) and `masked` bool
    `(n, n_patches)` (True = hidden from the encoder, a reconstruction target).
    """
    n_keep = int(n_patches * (1.0 - mask_ratio) + 1e-9)
    if n_keep >= n_patches:
        keep = torch.arange(n_patches, device=device).expand(n, n_patches)
        return keep, torch.zeros(n, n_patches, dtype=torch.bool, device=device)
    noise = torch.rand(n, n_patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    masked = torch.ones(n, n_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep, False)
    return keep, masked


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A patch-position table `(g0**2, H)` for a `grid x grid` layout.

    Unchanged when the grid is the same. The fixed MAE sine-cosine table is rebuilt exactly for
    the new grid; any other table (e.g. learned) is resized bicubically, as transformers'
    `interpolate_pos_encoding` does.
    """
    g0 = math.isqrt(table.shape[0])
    if g0 == grid:
        return table
    hidden = table.shape[1]
    if torch.allclose(table, sincos_2d(g0, hidden).to(table), atol=1e-4):
        return sincos_2d(grid, hidden).to(table)
    image = table.reshape(1, g0, g0, hidden).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(grid * grid, hidden)


class ImageEncoder(nn.Module):
    """ViT encoder over square single- or multi-channel images of any side divisible by the patch.

    forward(images, keep) -> tokens `(N, 1 + K, hidden_size)` float32: the CLS token first, then
    the K kept patches in the order of `keep` (all patches, row-major, when `keep` is None).
    `images` is `(N, C, S, S)` float32 in [0, 1]; it is normalised with the config's
    `pixel_mean` / `pixel_std` inside. Patch positions come from `position_table` (fixed, not
    trained: the MAE sine-cosine table for `image_size_px`, or the one loaded with ViTMAE
    weights); other image sides use `resize_position_table`.
    """

    def __init__(self, cfg: ImageConfig, image_size_px: int):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.channels = cfg.channels
        self.hidden_size = cfg.hidden_size
        self.pixel_mean, self.pixel_std = cfg.pixel_stats()
        self.grid = image_size_px // cfg.patch_size
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size**2, cfg.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.register_buffer("position_table", sincos_2d(self.grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.hidden_size, cfg.heads, cfg.mlp_size, cfg.dropout, cfg.layer_norm_eps)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)

    def positions(self, grid: int) -> torch.Tensor:
        """Position table `(grid**2, hidden_size)` for a `grid x grid` patch layout."""
        if grid == self.grid:
            return self.position_table
        return resize_position_table(self.position_table, grid)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        n, _, side, _ = images.shape
        x = patchify((images - self.pixel_mean) / self.pixel_std, self.patch_size)
        pos = self.positions(side // self.patch_size)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
            pos = pos[keep]
        x = self.patch_embed(x) + pos
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# pretrained ViTMAE weights
# --------------------------------------------------------------------------------------------

_ARCH_KEYS = (  # ViTMAEConfig attribute -> our ImageConfig key
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "layers"),
    ("num_attention_heads", "heads"),
    ("intermediate_size", "mlp_size"),
    ("patch_size", "patch_size"),
)


def _layer_keys(state: dict[str, torch.Tensor], i: int) -> dict[str, str]:
    """Names of layer i's tensors in a ViTMAEModel state dict (transformers 5.x or 4.x)."""
    new = f"layers.{i}."
    if f"{new}attention.q_proj.weight" in state:
        return {"ln1": f"{new}layernorm_before", "q": f"{new}attention.q_proj",
                "k": f"{new}attention.k_proj", "v": f"{new}attention.v_proj",
                "o": f"{new}attention.o_proj", "ln2": f"{new}layernorm_after",
                "fc1": f"{new}mlp.fc1", "fc2": f"{new}mlp.fc2"}
    old = f"encoder.layer.{i}."
    return {"ln1": f"{old}layernorm_before", "q": f"{old}attention.attention.query",
            "k": f"{old}attention.attention.key", "v": f"{old}attention.attention.value",
            "o": f"{old}attention.output.dense", "ln2": f"{old}layernorm_after",
            "fc1": f"{old}intermediate.dense", "fc2": f"{old}output.dense"}


def load_vitmae_weights(encoder: ImageEncoder, directory: str | Path, cfg: ImageConfig) -> dict:
    """Copy the encoder weights of a local ViTMAE directory into `encoder`.

    `directory` holds `config.json` + weights as written by `save_pretrained` of
    `ViTMAEModel` or `ViTMAEForPreTraining` (only the encoder is used). Rules:
    - width, depth, heads, MLP size and patch size must equal the config's `image.*` values
      (otherwise `ConfigError` naming the keys to set);
    - the image size may differ: the weights' patch-position table is used as it is when the
      patch grid is the same, rebuilt for our grid when it is the MAE sine-cosine table, and
      resized bicubically otherwise (`resize_position_table`);
    - RGB weights on single-channel images: the patch projection is summed over its 3 input
      channels (the same as feeding the grey image as R = G = B).
    Returns a small report dict (directory, channels_adapted, source image size).
    """
    from transformers import ViTMAEConfig, ViTMAEModel
    from transformers.utils import logging as hf_logging

    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise InputDataError(
            "not a ViTMAE weights directory (no config.json)",
            path=directory,
            fix="give the folder written by ViTMAEModel.save_pretrained (config.json + model.safetensors)",
        )
    try:
        vit_cfg = ViTMAEConfig.from_pretrained(directory)
    except Exception as error:  # transformers raises several types for a bad config.json
        raise InputDataError(f"cannot read config.json as a ViTMAE config ({error})", path=directory,
                             fix="give a directory saved from a transformers ViTMAE model") from None
    if getattr(vit_cfg, "model_type", "vit_mae") != "vit_mae":
        raise InputDataError(f"config.json describes a '{vit_cfg.model_type}' model, not vit_mae",
                             path=directory, fix="give a ViTMAE directory")
    mismatched = []
    for theirs, ours in _ARCH_KEYS:
        value = getattr(vit_cfg, theirs)
        value = value[0] if isinstance(value, (list, tuple)) else value
        if value != getattr(cfg, ours):
            mismatched.append(f"image.{ours}: config {getattr(cfg, ours)}, weights {value}")
    if mismatched:
        raise ConfigError(
            "the ViTMAE weights do not fit the image encoder of the config (" + "; ".join(mismatched) + ")",
            path=directory,
            fix="set these image.* keys to the weights' values in your config (use 'extends:' to "
            "override only them), or use weights saved for this config",
        )
    if vit_cfg.hidden_act != "gelu":
        raise InputDataError(f"hidden_act '{vit_cfg.hidden_act}' is not supported (gelu only)",
                             path=directory, fix="use a ViTMAE model with gelu activations")
    if vit_cfg.num_channels not in (cfg.channels, 3) or (vit_cfg.num_channels == 3 and cfg.channels != 1):
        raise InputDataError(
            f"weights take {vit_cfg.num_channels}-channel images; the config has {cfg.channels}",
            path=directory, fix="set image.channels to the weights' channel count")
    if abs(vit_cfg.layer_norm_eps - cfg.layer_norm_eps) > 1e-15:
        log.warning("ViTMAE layer_norm_eps %g differs from image.layer_norm_eps %g",
                    vit_cfg.layer_norm_eps, cfg.layer_norm_eps)

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        source = ViTMAEModel.from_pretrained(directory)
    except Exception as error:
        raise InputDataError(f"cannot load the ViTMAE weights ({error})", path=directory,
                             fix="re-save the model with save_pretrained") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    state = source.state_dict()

    def tensor(name: str) -> torch.Tensor:
        return state[name].detach().float()

    with torch.no_grad():
        proj = tensor("embeddings.patch_embeddings.projection.weight")  # (H, C, p, p)
        adapted = proj.shape[1] != cfg.channels
        if adapted:
            proj = proj.sum(dim=1, keepdim=True)
        encoder.patch_embed.weight.copy_(proj.reshape(proj.shape[0], -1))
        encoder.patch_embed.bias.copy_(tensor("embeddings.patch_embeddings.projection.bias"))
        table = tensor("embeddings.position_embeddings")[0]          # (1 + g0**2, H), CLS row first
        encoder.cls_token.copy_(tensor("embeddings.cls_token") + table[:1])
        encoder.position_table.copy_(resize_position_table(table[1:], encoder.grid))
        for i, block in enumerate(encoder.blocks):
            k = _layer_keys(state, i)
            block.norm1.weight.copy_(tensor(f"{k['ln1']}.weight"))
            block.norm1.bias.copy_(tensor(f"{k['ln1']}.bias"))
            block.qkv.weight.copy_(torch.cat([tensor(f"{k[x]}.weight") for x in "qkv"], dim=0))
            biases = [state.get(f"{k[x]}.bias") for x in "qkv"]
            if any(b is None for b in biases):  # qkv_bias=False
                block.qkv.bias.zero_()
            else:
                block.qkv.bias.copy_(torch.cat([b.float() for b in biases]))
            block.proj.weight.copy_(tensor(f"{k['o']}.weight"))
            block.proj.bias.copy_(tensor(f"{k['o']}.bias"))
            block.norm2.weight.copy_(tensor(f"{k['ln2']}.weight"))
            block.norm2.bias.copy_(tensor(f"{k['ln2']}.bias"))
            block.mlp.fc1.weight.copy_(tensor(f"{k['fc1']}.weight"))
            block.mlp.fc1.bias.copy_(tensor(f"{k['fc1']}.bias"))
            block.mlp.fc2.weight.copy_(tensor(f"{k['fc2']}.weight"))
            block.mlp.fc2.bias.copy_(tensor(f"{k['fc2']}.bias"))
        encoder.norm.weight.copy_(tensor("layernorm.weight"))
        encoder.norm.bias.copy_(tensor("layernorm.bias"))
    image_size = vit_cfg.image_size
    log.info("loaded ViTMAE encoder weights from %s%s", directory,
             " (RGB patch projection summed to one channel)" if adapted else "")
    return {"directory": str(directory), "channels_adapted": adapted,
            "source_image_size": image_size if isinstance(image_size, int) else list(image_size)}
