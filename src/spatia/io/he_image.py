"""A registered post-Xenium H&E image read through the morphology image's pixel frame.

`HEImage` resamples an RGB H&E pyramid (decoded tile by tile by `spatia.io.tiff`) into windows of
the Xenium morphology frame, through 10x's alignment matrix (`read_alignment_csv`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spatia.errors import BundleError, ConfigError
from spatia.io.image import DEFAULT_CACHE_BYTES
from spatia.io.tiff import TiffPyramid, TileCache, check_window, snap_factor


# Registered H&E image
# ---------------------------------------------------------------------------------------------


def read_alignment_csv(path: str | Path) -> np.ndarray:
    """Read 10x's H&E image alignment file: a 3 x 3 affine matrix as CSV.

    The matrix maps homogeneous H&E level-0 pixel coordinates ``(x, y, 1)`` to Xenium morphology
    level-0 pixel coordinates (the convention of Xenium Explorer's ``*_imagealignment.csv`` and of
    spatialdata-io, which uses it as the H&E image's transform to the morphology frame). Lines
    without numbers (a header) are skipped.

    Returns:
        float64 (3, 3).
    """
    path = Path(path)
    fix = "an alignment file holds three lines of three comma-separated numbers (the 3 x 3 affine matrix)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BundleError("the H&E alignment file does not exist", path=path, fix=fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read the H&E alignment file ({exc})", path=path, fix=fix) from None
    rows = []
    number = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
    for line in text.splitlines():
        tokens = [t for t in re.split(r"[,;\s]+", line.strip()) if t]
        if not tokens:
            continue
        if not all(number.match(t) for t in tokens):
            if rows:
                raise BundleError(f"non-numeric line in the alignment matrix: {line!r}", path=path, fix=fix)
            continue  # header
        rows.append([float(t) for t in tokens])
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise BundleError(
            f"expected a 3 x 3 matrix, found {len(rows)} numeric lines of lengths {[len(r) for r in rows]}",
            path=path,
            fix=fix + " (a Xenium Explorer keypoints file is not an alignment matrix)",
        )
    matrix = np.array(rows, dtype=np.float64)
    _check_affine(matrix, path)
    return matrix


def _check_affine(matrix: np.ndarray, path: Path | None) -> None:
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise BundleError("the alignment matrix must be a finite 3 x 3 matrix", path=path)
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-6):
        raise BundleError(
            f"the last row of the alignment matrix is {matrix[2].tolist()}, expected [0, 0, 1] (an affine transform)",
            path=path,
        )
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise BundleError("the alignment matrix is singular (it collapses the image)", path=path)


class HEImage:
    """A registered post-Xenium H&E image, read through the morphology image's pixel frame.

    Attributes:
        path: the H&E OME-TIFF / TIFF (RGB).
        alignment_path: the 10x alignment CSV, or None when a matrix or identity was given.
        he_to_morphology_px: float64 (3, 3) affine, H&E level-0 px -> morphology level-0 px.
        level_shapes_yx: the H&E pyramid's own level shapes, level 0 first.
        dtype: pixel data type (uint8 for H&E).
        channel_names: ``["R", "G", "B"]``.

    ``read_window`` takes a window in morphology pixels (of a morphology pyramid level) and
    returns the H&E resampled into that frame; ``read_native_window`` reads the H&E's own pixels.
    """

    def __init__(
        self,
        path: str | Path,
        alignment: str | Path | np.ndarray | None = None,
        *,
        morphology_downsample: Sequence[float] = (1.0,),
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError("the H&E image does not exist", path=self.path, fix="pass the path of the H&E .ome.tif")
        self._init_args = {"alignment": alignment, "morphology_downsample": tuple(morphology_downsample), "cache_bytes": cache_bytes}
        if alignment is None:
            self.alignment_path = None
            matrix = np.eye(3)
        elif isinstance(alignment, np.ndarray):
            self.alignment_path = None
            matrix = np.asarray(alignment, dtype=np.float64)
            _check_affine(matrix, None)
        else:
            self.alignment_path = Path(alignment)
            matrix = read_alignment_csv(self.alignment_path)
        self.he_to_morphology_px = matrix
        self.morphology_to_he_px = np.linalg.inv(matrix)
        self.morphology_downsample = [float(f) for f in morphology_downsample]
        self._pyr = TiffPyramid(self.path)
        pyr = self._pyr
        if pyr.samples >= 3:
            self._mode = "samples"
        elif pyr.samples == 1 and pyr.n_channels >= 3:
            self._mode = "planes"
        else:
            raise BundleError(
                f"the H&E image has {pyr.samples} samples and {pyr.n_channels} channels; expected RGB",
                path=self.path,
                fix="pass an RGB H&E image (3 samples per pixel, or 3 channel planes)",
            )
        self.level_shapes_yx = list(pyr.level_shapes_yx)
        self.dtype = pyr.dtype
        self.channel_names = ["R", "G", "B"]
        self._cache = TileCache(cache_bytes)
        self._stats = {"tiles_decoded": 0, "bytes_read": 0, "cache_hits": 0}

    def __getstate__(self) -> dict:
        return {"path": self.path, "init_args": self._init_args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], **state["init_args"])

    def __repr__(self) -> str:
        return f"HEImage({str(self.path)!r}, levels={self.level_shapes_yx}, alignment={self.alignment_path})"

    @property
    def io_stats(self) -> dict[str, int]:
        return dict(self._stats)

    def downsample_factor(self, level: int) -> float:
        """H&E level-0 pixels per pixel of H&E `level`."""
        return snap_factor(self.level_shapes_yx[0][1] / self.level_shapes_yx[level][1])

    def read_native_window(self, x_px: int, y_px: int, width_px: int, height_px: int, *, level: int = 0) -> np.ndarray:
        """H&E pixels in its own frame: (height_px, width_px, 3) of `dtype`, outside filled with 0."""
        x, y, w, h = check_window(x_px, y_px, width_px, height_px)
        if not 0 <= level < len(self.level_shapes_yx):
            raise ConfigError(f"H&E pyramid level {level} does not exist", path=self.path)
        args = {"cache": self._cache, "stats": self._stats}
        if self._mode == "samples":
            return self._pyr.read(level, int(self._pyr.plane_index[0, 0]), x, y, w, h, cache_key=(id(self),), **args)[
                ..., :3
            ]
        planes = [
            self._pyr.read(level, int(self._pyr.plane_index[c, 0]), x, y, w, h, cache_key=(id(self),), **args)[..., 0]
            for c in range(3)
        ]
        return np.stack(planes, axis=-1)

    def read_window(
        self,
        x_px: int,
        y_px: int,
        width_px: int,
        height_px: int,
        *,
        level: int = 0,
        downsample: float | None = None,
        order: int = 1,
    ) -> np.ndarray:
        """The H&E resampled into a window of the morphology frame.

        The window is in pixels of morphology pyramid `level` (or of a frame `downsample` times
        coarser than morphology level 0). Output pixel (row r, column c) samples the H&E at
        ``inv(he_to_morphology_px) @ (level-0 centre of (x_px + c, y_px + r))``, from the H&E
        pyramid level closest in resolution (never coarser than needed), with bilinear (`order`
        1) or nearest (`order` 0) interpolation. Returns (height_px, width_px, 3) of `dtype`;
        morphology pixels that fall outside the H&E are 0.
        """
        from scipy import ndimage

        x, y, w, h = check_window(x_px, y_px, width_px, height_px)
        if downsample is None:
            if not 0 <= level < len(self.morphology_downsample):
                raise ConfigError(
                    f"morphology level {level} unknown to the H&E reader (levels 0..{len(self.morphology_downsample) - 1})",
                    path=self.path,
                )
            factor = self.morphology_downsample[level]
        else:
            factor = float(downsample)
        inverse = self.morphology_to_he_px
        # H&E level-0 px per output px, and the coarsest H&E level that is not coarser than that.
        scale = factor * math.sqrt(abs(np.linalg.det(inverse[:2, :2])))
        he_level = 0
        for k in range(len(self.level_shapes_yx)):
            if self.downsample_factor(k) <= scale * 1.001:
                he_level = k
        g = self.downsample_factor(he_level)
        cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        x0 = (x + cols + 0.5) * factor - 0.5  # morphology level-0 pixel-centre coordinates
        y0 = (y + rows + 0.5) * factor - 0.5
        u = inverse[0, 0] * x0 + inverse[0, 1] * y0 + inverse[0, 2]
        v = inverse[1, 0] * x0 + inverse[1, 1] * y0 + inverse[1, 2]
        u = (u + 0.5) / g - 0.5  # H&E level coordinates
        v = (v + 0.5) / g - 0.5
        u_min, u_max = int(np.floor(u.min())) - 1, int(np.ceil(u.max())) + 2
        v_min, v_max = int(np.floor(v.min())) - 1, int(np.ceil(v.max())) + 2
        level_h, level_w = self.level_shapes_yx[he_level]
        # keep the native read inside the image (plus the one-pixel margin): the rest is 0 anyway
        u_lo, u_hi = max(u_min, -1), min(u_max, level_w + 1)
        v_lo, v_hi = max(v_min, -1), min(v_max, level_h + 1)
        out = np.zeros((h, w, 3), dtype=self.dtype)
        if u_lo >= u_hi or v_lo >= v_hi:
            return out
        native = self.read_native_window(u_lo, v_lo, u_hi - u_lo, v_hi - v_lo, level=he_level)
        inside = (u >= -0.5) & (u <= level_w - 0.5) & (v >= -0.5) & (v <= level_h - 0.5)
        coords = np.stack([v - v_lo, u - u_lo])
        info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
        for c in range(3):
            sampled = ndimage.map_coordinates(
                native[..., c].astype(np.float32), coords, order=order, mode="constant", cval=0.0
            )
            if info is not None:
                sampled = np.clip(np.rint(sampled), info.min, info.max)
            out[..., c] = np.where(inside, sampled, 0).astype(self.dtype)
        return out
