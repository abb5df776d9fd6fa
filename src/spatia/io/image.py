"""Lazy, windowed reads of Xenium morphology images (`MorphologyImage`).

Coordinate conventions (the same everywhere in spatia):

* Image frame: ``x`` is the column, ``y`` the row, origin at the top-left corner.
* Pixel coordinates are given in the pixels of the pyramid level being read; level 0 is the
  full-resolution image. ``downsample_factor(level)`` converts: level-0 px = level px * factor.
* Micrometres: ``x_um = x_px * pixel_size_um`` at level 0 (Xenium places micrometre (0, 0) at the
  top-left corner of the morphology image).

Nothing is decoded when an image is opened: ``read_window`` decodes only the tiles that intersect
the window (the TIFF decoder and its tile cache are in `spatia.io.tiff`; the registered H&E image
is `spatia.io.he_image`).

Supported layouts (all through tifffile's page and SubIFD parsing):

* single-file OME-TIFF, pyramid as SubIFDs (Xenium ``morphology_focus.ome.tif``, v1) or as
  reduced-resolution pages in the main IFD chain;
* a folder of per-channel OME-TIFFs (Xenium v2 ``morphology_focus/morphology_focus_0000.ome.tif``,
  ...), one channel (or more) per file, concatenated in file-name order;
* z-stacks (Xenium ``morphology.ome.tif``, OME axis ``Z``): every read is the maximum projection
  over z, as in the SPATIA paper;
* tiled or stripped pages, contiguous or separate samples, any codec tifffile/imagecodecs decodes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spatia.errors import BundleError, ConfigError
from spatia.io.tiff import TiffPyramid, TileCache, as_int, check_window, snap_factor

log = logging.getLogger(__name__)

DEFAULT_PIXEL_SIZE_UM = 0.2125
"""Xenium morphology pixel size (um/px), used only when neither metadata nor OME states one."""

DEFAULT_CACHE_BYTES = 128 * 2**20
"""Default byte budget of the decoded-tile LRU cache of one image."""

XENIUM_V2_CHANNELS = ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"]
"""10x's documented stain order of the four ``morphology_focus_000N.ome.tif`` files (v2)."""


# The morphology image
# ---------------------------------------------------------------------------------------------


class PyramidImage:
    """What every level-pyramid image reader shares (MorphologyImage, the SpatialData image):
    level and channel lookup, geometry and I/O counters, computed from the attributes
    `level_shapes_yx`, `pixel_size_um`, `channel_names`, `path`, `_stats` and the reader's
    `read_window(x_px, y_px, width_px, height_px, *, level, channel)`."""

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes_yx)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def io_stats(self) -> dict[str, int]:
        """Counters since opening: ``tiles_decoded``, ``bytes_read`` (compressed), ``cache_hits``."""
        return dict(self._stats)

    def downsample_factor(self, level: int) -> float:
        """Level-0 pixels per pixel of `level` (1.0, 2.0, 4.0, ... for Xenium pyramids)."""
        level = self._check_level(level)
        h0, w0 = self.level_shapes_yx[0]
        h, w = self.level_shapes_yx[level]
        return snap_factor(w0 / w)

    def channel_index(self, channel: int | str) -> int:
        """Index of `channel` given as an index or a name (case-insensitive; a part of an
        ``"A/B/C"`` name matches when unambiguous)."""
        if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            index = int(channel)
            if -self.n_channels <= index < self.n_channels:
                return index % self.n_channels
            raise ConfigError(
                f"channel {index} does not exist; the image has {self.n_channels}: {self.channel_names}",
                path=self.path,
            )
        if isinstance(channel, str):
            lowered = [name.lower() for name in self.channel_names]
            if channel.lower() in lowered:
                return lowered.index(channel.lower())
            partial = [i for i, name in enumerate(lowered) if channel.lower() in name.split("/")]
            if len(partial) == 1:
                return partial[0]
        raise ConfigError(
            f"unknown channel {channel!r}; the image has {self.channel_names}",
            path=self.path,
            fix="pass a channel index or one of these names",
        )

    def read_level(self, level: int = 0, channel: int | str = 0) -> np.ndarray:
        """A whole pyramid level of one channel, (height_px, width_px) of `dtype`."""
        level = self._check_level(level)
        h, w = self.level_shapes_yx[level]
        return self.read_window(0, 0, w, h, level=level, channel=channel)

    def _check_level(self, level: int) -> int:
        level = as_int(level, "level")
        if not 0 <= level < self.n_levels:
            raise ConfigError(
                f"pyramid level {level} does not exist; the image has levels 0..{self.n_levels - 1}",
                path=self.path,
            )
        return level

    @property
    def extent_um(self) -> tuple[float, float]:
        """(width_um, height_um) of the image."""
        h, w = self.level_shapes_yx[0]
        return w * self.pixel_size_um, h * self.pixel_size_um


class MorphologyImage(PyramidImage):
    """A lazy Xenium morphology image: pyramid levels, channels, optional z-stack.

    Attributes:
        path: the image file, or the folder of per-channel files (Xenium v2).
        channel_names: one name per channel, e.g. ``["DAPI"]``.
        level_shapes_yx: (height_px, width_px) of every pyramid level, level 0 first.
        dtype: pixel data type (uint16 for Xenium).
        pixel_size_um: micrometres per level-0 pixel.
        pixel_size_source: where the pixel size came from ("given", "ome" or "default").
        n_z: number of z planes (1 unless a z-stack; reads are max-projected over z).

    Opening an image reads only TIFF directories, never pixels. ``read_window`` decodes only
    the tiles that intersect the window. Instances can be pickled (e.g. into DataLoader workers);
    file descriptors are reopened in each process.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pixel_size_um: float | None = None,
        channel_names: Sequence[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.path = Path(path)
        self._init_args = {"pixel_size_um": pixel_size_um, "channel_names": channel_names, "cache_bytes": cache_bytes}
        self.warnings: list[str] = []
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.name.lower().endswith((".ome.tif", ".ome.tiff")))
            if not files:
                files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
            if not files:
                raise BundleError(
                    "the morphology image folder holds no .ome.tif files",
                    path=self.path,
                    fix="a Xenium v2 morphology_focus/ folder holds morphology_focus_0000.ome.tif, ...",
                )
        elif self.path.is_file():
            files = [self.path]
        else:
            raise BundleError("the morphology image does not exist", path=self.path)
        self.files = files
        self._pyramids = [TiffPyramid(f) for f in files]
        first = self._pyramids[0]
        for pyr in self._pyramids[1:]:
            if pyr.level_shapes_yx[0] != first.level_shapes_yx[0] or pyr.dtype != first.dtype:
                raise BundleError(
                    f"channel file {pyr.path.name} has shape {pyr.level_shapes_yx[0]} / {pyr.dtype}, "
                    f"but {first.path.name} has {first.level_shapes_yx[0]} / {first.dtype}",
                    path=self.path,
                    fix="all channel files of one morphology image must have the same size and data type",
                )
            if pyr.n_z != first.n_z:
                raise BundleError("channel files have different numbers of z planes", path=self.path)
        for pyr in self._pyramids:
            if pyr.samples != 1:
                raise BundleError(
                    f"{pyr.path.name} has {pyr.samples} samples per pixel; a morphology image is greyscale",
                    path=pyr.path,
                    fix="pass an RGB H&E image as he_image=..., not as the morphology image",
                )
        for pyr in self._pyramids:
            if pyr.parse_messages:
                self.warnings.append(
                    f"{pyr.path.name}: the TIFF directory is damaged ({'; '.join(pyr.parse_messages)[:300]}); "
                    "its metadata may be lost (copy the file again)"
                )
        n_levels = min(len(p.level_shapes_yx) for p in self._pyramids)
        self.level_shapes_yx: list[tuple[int, int]] = list(first.level_shapes_yx[:n_levels])
        self.dtype = first.dtype
        self.n_z = first.n_z
        self.ome_pixel_size_um: float | None = first.ome_pixel_size_um
        # (pyramid index, channel index inside that pyramid) for every channel
        self._channels = [(i, c) for i, pyr in enumerate(self._pyramids) for c in range(pyr.n_channels)]
        self.channel_names = self._resolve_channel_names(channel_names)
        self.pixel_size_um, self.pixel_size_source = self._resolve_pixel_size(pixel_size_um)
        self._cache = TileCache(cache_bytes)
        self._stats = {"tiles_decoded": 0, "bytes_read": 0, "cache_hits": 0}

    # -- construction helpers ----------------------------------------------------------------

    def _resolve_channel_names(self, given: Sequence[str] | None) -> list[str]:
        n = len(self._channels)
        if given is not None:
            if len(given) != n:
                raise ConfigError(f"{len(given)} channel names given for an image with {n} channels", path=self.path)
            return [str(x) for x in given]
        names: list[str] = []
        missing = False
        for file_index, pyr in enumerate(self._pyramids):
            ome = [x for x in pyr.ome_channel_names]
            if len(ome) == pyr.n_channels and all(ome):
                names.extend(ome)
            elif pyr.n_channels == 1 and pyr.ome_first_channel is not None and pyr.ome_first_channel < len(ome):
                names.append(ome[pyr.ome_first_channel] or "")
            elif pyr.n_channels == 1 and len(self._pyramids) > 1 and len(ome) == len(self._pyramids):
                names.append(ome[file_index] or "")
            else:
                names.extend([""] * pyr.n_channels)
        if any(not name for name in names):
            missing = True
            if n == 1:
                defaults = ["DAPI"]
            elif len(self._pyramids) == 4 and n == 4:
                defaults = XENIUM_V2_CHANNELS
            else:
                defaults = [f"channel_{i}" for i in range(n)]
            names = [name or defaults[i] for i, name in enumerate(names)]
        if missing:
            self.warnings.append(f"channel names missing from the OME metadata; using {names}")
        return names

    def _resolve_pixel_size(self, given: float | None) -> tuple[float, str]:
        if given is not None:
            value = float(given)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"pixel size must be a positive number of um, got {given!r}", path=self.path)
            return value, "given"
        ome = self._pyramids[0].ome_pixel_size_um
        if ome is not None:
            return ome, "ome"
        message = (
            f"no pixel size in the image metadata; assuming the Xenium default {DEFAULT_PIXEL_SIZE_UM} um/px"
        )
        log.warning("%s: %s", self.path, message)
        self.warnings.append(message)
        return DEFAULT_PIXEL_SIZE_UM, "default"

    # -- pickling (DataLoader workers) ---------------------------------------------------------

    def __getstate__(self) -> dict:
        return {"path": self.path, "init_args": self._init_args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], **state["init_args"])

    def __repr__(self) -> str:
        return (
            f"MorphologyImage({str(self.path)!r}, channels={self.channel_names}, levels={self.level_shapes_yx}, "
            f"dtype={self.dtype}, pixel_size_um={self.pixel_size_um}, n_z={self.n_z})"
        )

    # -- public API ---------------------------------------------------------------------------

    def clear_cache(self) -> None:
        """Drop every decoded tile held in the cache."""
        self._cache.clear()

    def close(self) -> None:
        """Close file descriptors (they are reopened on the next read)."""
        for pyr in self._pyramids:
            pyr.close()
        self._cache.clear()

    def read_window(
        self,
        x_px: int,
        y_px: int,
        width_px: int,
        height_px: int,
        *,
        level: int = 0,
        channel: int | str = 0,
    ) -> np.ndarray:
        """Pixels of one channel in a window, as a (height_px, width_px) array of `dtype`.

        `x_px`, `y_px` (top-left corner, column and row) are in pixels of `level`. Parts of the
        window outside the image are 0, so crops at the edges keep their shape. Z-stacks return
        the maximum projection over z.
        """
        x, y, w, h = check_window(x_px, y_px, width_px, height_px)
        level = self._check_level(level)
        file_index, local_channel = self._channels[self.channel_index(channel)]
        pyr = self._pyramids[file_index]
        out: np.ndarray | None = None
        for plane_id in pyr.plane_index[local_channel]:
            window = pyr.read(
                level, int(plane_id), x, y, w, h, cache=self._cache, cache_key=(id(self), file_index), stats=self._stats
            )[..., 0]
            out = window if out is None else np.maximum(out, window, out=out)
        assert out is not None
        return out



# ---------------------------------------------------------------------------------------------
