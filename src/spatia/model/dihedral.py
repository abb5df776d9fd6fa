"""The eight orientations of a square cell crop: rotations by 90 degrees and their mirror images.

A nucleus has no preferred orientation in a section, and every morphometry measure the model
uses is the same in all eight (`spatia.model.morphometry`), but a ViT's patch tokens are not.
On a section of a few hundred cells the image encoder can learn orientation as if it were
morphology. The model therefore

- sees each training crop in a random one of the eight orientations (`random_orientations`,
  `train.cell_orientations`), so the cell image encoder learns from eight times as many
  distinct crops; and
- averages its embeddings over the orientations of the crop (`image.embed_orientations`), so
  an embedding does not depend on how the cell happens to lie.

Only the cell crop and its mask turn: niche and tissue images keep their orientation.
"""

from __future__ import annotations

import torch

from spatia.model.config import ORIENTATIONS


def orient(images: torch.Tensor, code: int) -> torch.Tensor:
    """`images` (..., S, S) in orientation `code` (0-7): mirrored (transposed) when code is odd,
    then rotated by (code // 2) x 90 degrees counter-clockwise. Code 0 is the crop as is; the
    eight codes give the eight distinct orientations.
    """
    if not 0 <= int(code) < ORIENTATIONS:
        raise ValueError(f"orientation code must be in 0..{ORIENTATIONS - 1}, not {code}")
    out = images.transpose(-2, -1) if code % 2 else images
    return torch.rot90(out, int(code) // 2, dims=(-2, -1))


def orient_each(images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Image i of `images` (B, ..., S, S) in orientation `codes[i]` (int64 (B,), values 0-7)."""
    if codes.shape != images.shape[:1]:
        raise ValueError(f"one code per image: codes {tuple(codes.shape)}, images {tuple(images.shape)}")
    out = images.clone()
    for code in codes.unique().tolist():
        chosen = codes == code
        out[chosen] = orient(images[chosen], code)
    return out


def random_orientations(batch: dict, generator: torch.Generator | None = None) -> dict:
    """A copy of `batch` whose cell crops (`cell_image`, and `cell_mask` with the same turn) each
    lie in a random orientation drawn from `generator`; other entries are shared, not copied."""
    images = batch["cell_image"]
    codes = torch.randint(0, ORIENTATIONS, (images.shape[0],), device=images.device, generator=generator)
    out = dict(batch)
    out["cell_image"] = orient_each(images, codes)
    if "cell_mask" in batch:
        out["cell_mask"] = orient_each(batch["cell_mask"], codes)
    return out


def oriented(batch: dict, code: int) -> dict:
    """A copy of `batch` with every cell crop and mask in orientation `code`."""
    if code == 0:
        return batch
    out = dict(batch)
    out["cell_image"] = orient(batch["cell_image"], code)
    if "cell_mask" in batch:
        out["cell_mask"] = orient(batch["cell_mask"], code)
    return out
