"""Feature extractors for FID / KID (each takes uint8 crops (B, S, S), returns (B, F) float).

- `FIDInceptionV3`: the FID variant of Inception-v3 (pytorch-fid / torch-fidelity: average pools
  without padded zeros in the A, C and first E blocks, a max pool in the last E block, 2,048-D
  global average pool), with torchvision `Inception3` parameter names, so the standard
  `pt_inception-2015-12-05-6726825d.pth` state dict loads with `strict=True`. Input as in
  torch-fidelity: grey crops repeated to 3 channels, resized to 299 x 299 by TF1-style bilinear
  interpolation (align_corners=False, no half-pixel offset), then (x - 128) / 128. Weights come
  only from a local file the user gives; nothing is downloaded.
- `SpatiaImageFeatures`: the CLS token of the cell-level image encoder of a `spatia pretrain`
  checkpoint.
- `RandomConvFeatures`: a fixed, seeded random conv net (mean- and max-pooled). Its FID is
  "not comparable across projects": only across variants scored in the same run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spatia.errors import InputDataError

RANDOM_LABEL = "random conv features (seeded; not comparable across projects)"


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, bd, pool], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """`max_pool=False`: FID's first E block (average pool without padded zeros); True: the last."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source coordinate = dst * in / out (no
    half-pixel offset), neighbours clamped at the edge. x (B, C, H, W) float."""
    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    y0, y1, wy = axis(x.shape[2])
    x0, x1, wx = axis(x.shape[3])
    top = x[:, :, y0] * (1 - wy)[:, None] + x[:, :, y1] * wy[:, None]
    return top[..., x0] * (1 - wx) + top[..., x1] * wx


class FIDInceptionV3(nn.Module):
    """Inception-v3 FID feature extractor (2,048-D pool features); see the module docstring."""

    num_features = 2048
    name = "inception_v3_fid (pt_inception-2015-12-05)"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; unused by the features

    @classmethod
    def from_weights(cls, path: str | Path) -> FIDInceptionV3:
        """Load `pt_inception-2015-12-05-6726825d.pth` (a plain state dict) from a local file."""
        path = Path(path)
        if not path.exists():
            raise InputDataError("the Inception weights file does not exist", path=path,
                                 fix="download pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) once "
                                     "and pass its local path; spatia never downloads")
        model = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise InputDataError(f"the file is not the FID Inception-v3 state dict ({str(error)[:200]})", path=path,
                                 fix="use pt_inception-2015-12-05-6726825d.pth") from None
        return model.eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return (resize_bilinear_tf1(x, 299) - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class RandomConvFeatures(nn.Module):
    """A fixed random conv net: 4 stride-2 conv + ReLU layers (seeded He init), then the
    concatenated global mean and max of the last two layers."""

    name = RANDOM_LABEL

    def __init__(self, seed: int = 0, width: int = 32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = [1, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.num_features = 2 * (widths[-1] + widths[-2])
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()[:, None] / 255.0 if images.dim() == 3 else images.float() / 255.0
        pooled = []
        for k, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if k >= len(self.convs) - 2:
                pooled += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        return torch.cat(pooled, dim=1)


class SpatiaImageFeatures(nn.Module):
    """CLS token of the cell image encoder of a SPATIA checkpoint."""

    def __init__(self, checkpoint: str | Path):
        super().__init__()
        from spatia.train import load_model

        model, _ = load_model(checkpoint)
        self.encoder = model.image_encoder("cell").eval().requires_grad_(False)
        self.size_px = int(model.config.image.cell_size_px)
        self.num_features = int(self.encoder.norm.normalized_shape[0])
        self.name = f"spatia cell image encoder ({Path(checkpoint).name})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()[:, None] / 255.0 if images.dim() == 3 else images.float() / 255.0
        if x.shape[-1] != self.size_px:
            x = F.interpolate(x, size=(self.size_px, self.size_px), mode="bilinear", antialias=True, align_corners=False)
        return self.encoder(x)[:, 0]


@torch.no_grad()
def extract(extractor: nn.Module, images, batch_size: int = 128) -> torch.Tensor:
    """Features (N, F) float64 of uint8 crops (N, S, S)."""
    images = torch.as_tensor(images)
    out = [extractor(images[s:s + batch_size]).double() for s in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, extractor.num_features), dtype=torch.float64)
