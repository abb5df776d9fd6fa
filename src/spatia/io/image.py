"""Lazy, windowed reads of Xenium morphology images and registered H&E images.

Coordinate conventions (the same everywhere in spatia):

* Image frame: ``x`` is the column, ``y`` the row, origin at the top-left corner.
* Pixel coordinates are given in the pixels of the pyramid level being read; level 0 is the
  full-resolution image. ``downsample_factor(level)`` converts: level-0 px = level px * factor.
* Micrometres: ``x_um = x_px * pixel_size_um`` at level 0 (Xenium places micrometre (0, 0) at the
  top-left corner of the morphology image).

Nothing is decoded when an image is opened: only the TIFF directory (tile offsets, sizes,
compression) is parsed. ``read_window`` reads from disk (``os.pread``) and decodes only the tiles
or strips that intersect the requested window, keeping recently decoded tiles in a small LRU cache
so that neighbouring windows (cell crops, niche tiles) do not decode the same tile twice.

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
import os
import re
import struct
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatia.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_PIXEL_SIZE_UM = 0.2125
"""Xenium morphology pixel size (um/px), used only when neither metadata nor OME states one."""

DEFAULT_CACHE_BYTES = 128 * 2**20
"""Default byte budget of the decoded-tile LRU cache of one image."""

XENIUM_V2_CHANNELS = ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"]
"""10x's documented stain order of the four ``morphology_focus_000N.ome.tif`` files (v2)."""

_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}
_DAMAGED_FIX = "the file is damaged or incomplete: copy it again from the instrument output or re-download it"


# ---------------------------------------------------------------------------------------------
# Low-level pieces: raw file reads, tile cache, one TIFF pyramid
# ---------------------------------------------------------------------------------------------


class _FileReader:
    """Positional reads (``os.pread``) with one descriptor per process (safe after fork)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def read(self, offset: int, count: int) -> bytes:
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDONLY)
                self._pid = os.getpid()
            fd = self._fd
        return os.pread(fd, count, offset)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = None

    def __del__(self) -> None:
        self.close()


class _TileCache:
    """A thread-safe LRU cache of decoded tiles with a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


@dataclass(frozen=True)
class _Plane:
    """Where the tiles of one 2-D plane of one pyramid level lie in a TIFF file, and how to decode them."""

    offsets: np.ndarray  # int64 (n_segments,)
    bytecounts: np.ndarray  # int64 (n_segments,)
    decode: Callable[..., Any]
    jpeg_args: dict
    shape_yx: tuple[int, int]
    segment_yx: tuple[int, int]  # tile (or strip) height and width in px
    grid_yx: tuple[int, int]  # number of segments along y and x
    n_separate: int  # sample planes stored separately (planar configuration 2), else 1
    samples: int  # samples per pixel


def _physical_size_um(value: str | None, unit: str | None) -> float | None:
    if value is None:
        return None
    try:
        size = float(value)
    except ValueError:
        return None
    scale = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6, "Å": 1e-4}.get(
        (unit or "µm").strip(), None
    )
    if scale is None or not math.isfinite(size) or size <= 0:
        return None
    return size * scale


def _parse_ome(xml: str | None, filename: str) -> tuple[list[str], float | None, int | None]:
    """Channel names, PhysicalSizeX (um) and the first channel index of `filename` from OME-XML."""
    if not xml:
        return [], None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return [], None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return [], None, None
    names = [
        ch.attrib.get("Name", "")
        for ch in pixels
        if ch.tag.endswith("}Channel") or ch.tag == "Channel"
    ]
    size_um = _physical_size_um(pixels.attrib.get("PhysicalSizeX"), pixels.attrib.get("PhysicalSizeXUnit"))
    first_c = None
    for tiffdata in pixels:
        if not (tiffdata.tag.endswith("}TiffData") or tiffdata.tag == "TiffData"):
            continue
        for uuid in tiffdata:
            if uuid.tag.endswith("UUID") and uuid.attrib.get("FileName", "").lower() == filename.lower():
                first_c = int(tiffdata.attrib.get("FirstC", 0))
                break
        if first_c is not None:
            break
    return names, size_um, first_c


class _TiffPyramid:
    """The pyramid levels and 2-D planes of one TIFF file, with windowed reads.

    Planes are indexed ``[channel, z]``: the ``Z`` axis of the file's series is z, every other
    non-spatial axis (``C``, or ``I``/``Q``/``T`` when unnamed) is flattened into channels.
    """

    def __init__(self, path: Path):
        import tifffile

        self.path = Path(path)
        self.reader = _FileReader(self.path)
        try:
            with tifffile.TiffFile(self.path, _multifile=False) as tif:
                if not tif.series:
                    raise BundleError("the TIFF file holds no image", path=self.path, fix=_DAMAGED_FIX)
                series = tif.series[0]
                ome_xml = tif.ome_metadata if tif.is_ome else None
                self._read_structure(series)
        except BundleError:
            raise
        except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, struct.error) as exc:
            raise BundleError(
                f"cannot read the image as a TIFF file ({type(exc).__name__}: {exc})",
                path=self.path,
                fix=_DAMAGED_FIX,
            ) from None
        names, size_um, first_c = _parse_ome(ome_xml, self.path.name)
        self.ome_channel_names = names
        self.ome_first_channel = first_c
        self.ome_pixel_size_um = size_um

    def _read_structure(self, series: Any) -> None:
        axes = series.axes
        plane_axes = [a for a in axes if a not in "YXS"]
        self.dtype = np.dtype(series.dtype)
        levels: list[list[_Plane]] = []
        for level in series.levels:
            pages = list(level.pages)
            if any(page is None for page in pages):
                raise BundleError("the image has missing pages", path=self.path, fix=_DAMAGED_FIX)
            levels.append([self._plane(page) for page in pages])
        sizes = [series.shape[axes.index(a)] for a in plane_axes]
        n_planes = int(np.prod(sizes)) if sizes else 1
        if any(len(planes) != n_planes for planes in levels):
            raise BundleError("pyramid levels hold different numbers of planes", path=self.path, fix=_DAMAGED_FIX)
        index = np.arange(n_planes).reshape(sizes if sizes else ())
        if "Z" in plane_axes:
            index = np.moveaxis(index, plane_axes.index("Z"), -1)
            self.plane_index = index.reshape(-1, index.shape[-1])
        else:
            self.plane_index = index.reshape(-1, 1)
        self.levels = levels
        self.level_shapes_yx = [planes[0].shape_yx for planes in levels]
        self.samples = levels[0][0].samples
        for planes in levels:
            for plane in planes:
                if plane.samples != self.samples:
                    raise BundleError("planes have different samples per pixel", path=self.path, fix=_DAMAGED_FIX)

    def _plane(self, page: Any) -> _Plane:
        key = page.keyframe
        if key.imagedepth > 1:
            raise BundleError("volumetric TIFF tiles (ImageDepth > 1) are not supported", path=self.path)
        height, width = int(key.imagelength), int(key.imagewidth)
        if key.is_tiled:
            seg = (int(key.tilelength), int(key.tilewidth))
        else:
            seg = (int(min(key.rowsperstrip, height)), width)
        grid = (-(-height // seg[0]), -(-width // seg[1]))
        n_separate = int(key.samplesperpixel) if key.planarconfig == 2 else 1
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(offsets) != n_separate * grid[0] * grid[1] or len(counts) != len(offsets):
            raise BundleError(
                f"the image directory lists {len(offsets)} tiles where {n_separate * grid[0] * grid[1]} are expected",
                path=self.path,
                fix=_DAMAGED_FIX,
            )
        jpeg_args: dict = {}
        if key.compression in _JPEG_COMPRESSIONS:
            jpeg_args = {"jpegtables": getattr(page, "jpegtables", None) or key.jpegtables, "jpegheader": key.jpegheader}
        return _Plane(
            offsets=offsets,
            bytecounts=counts,
            decode=key.decode,
            jpeg_args=jpeg_args,
            shape_yx=(height, width),
            segment_yx=seg,
            grid_yx=grid,
            n_separate=n_separate,
            samples=int(key.samplesperpixel),
        )

    @property
    def n_channels(self) -> int:
        return int(self.plane_index.shape[0])

    @property
    def n_z(self) -> int:
        return int(self.plane_index.shape[1])

    def _segment(
        self, plane: _Plane, seg_index: int, cache: _TileCache, cache_key: tuple, stats: dict
    ) -> np.ndarray:
        """Decoded segment `seg_index` as (rows, cols, samples_in_segment), cropped to the image."""
        key = (*cache_key, seg_index)
        tile = cache.get(key)
        if tile is not None:
            stats["cache_hits"] += 1
            return tile
        offset, count = int(plane.offsets[seg_index]), int(plane.bytecounts[seg_index])
        sep_index = seg_index % (plane.grid_yx[0] * plane.grid_yx[1])
        ty, tx = divmod(sep_index, plane.grid_yx[1])
        rows = min(plane.segment_yx[0], plane.shape_yx[0] - ty * plane.segment_yx[0])
        cols = min(plane.segment_yx[1], plane.shape_yx[1] - tx * plane.segment_yx[1])
        samples = 1 if plane.n_separate > 1 else plane.samples
        if count == 0 or offset == 0:  # empty tile: TIFF readers fill with zeros
            tile = np.zeros((rows, cols, samples), dtype=self.dtype)
        else:
            try:
                data = self.reader.read(offset, count)
            except OSError as exc:
                raise BundleError(f"cannot read the image file ({exc})", path=self.path, fix=_DAMAGED_FIX) from None
            if len(data) != count:
                raise BundleError(
                    f"the image file is truncated (tile {seg_index} needs bytes {offset}..{offset + count})",
                    path=self.path,
                    fix=_DAMAGED_FIX,
                )
            try:
                decoded, _, _ = plane.decode(data, seg_index, **plane.jpeg_args)
            except Exception as exc:  # imagecodecs raises codec-specific error classes
                raise BundleError(
                    f"tile {seg_index} of the image cannot be decoded ({type(exc).__name__}: {exc})",
                    path=self.path,
                    fix=_DAMAGED_FIX,
                ) from None
            if decoded is None:
                tile = np.zeros((rows, cols, samples), dtype=self.dtype)
            else:
                decoded = np.asarray(decoded)
                tile = decoded.reshape(decoded.shape[-3:])[:rows, :cols]
                if tile.shape[:2] != (rows, cols):
                    raise BundleError(
                        f"tile {seg_index} decodes to shape {tile.shape[:2]}, expected {(rows, cols)}",
                        path=self.path,
                        fix=_DAMAGED_FIX,
                    )
            stats["tiles_decoded"] += 1
            stats["bytes_read"] += count
        tile.setflags(write=False)
        cache.put(key, tile)
        return tile

    def read(
        self,
        level: int,
        plane_id: int,
        x0: int,
        y0: int,
        width: int,
        height: int,
        *,
        cache: _TileCache,
        cache_key: tuple,
        stats: dict,
    ) -> np.ndarray:
        """Window (height, width, samples) of one plane; outside the image filled with 0."""
        plane = self.levels[level][plane_id]
        out = np.zeros((height, width, plane.samples), dtype=self.dtype)
        img_h, img_w = plane.shape_yx
        ys, ye = max(y0, 0), min(y0 + height, img_h)
        xs, xe = max(x0, 0), min(x0 + width, img_w)
        if ys >= ye or xs >= xe:
            return out
        seg_h, seg_w = plane.segment_yx
        ny, nx = plane.grid_yx
        for sep in range(plane.n_separate):
            for ty in range(ys // seg_h, (ye - 1) // seg_h + 1):
                for tx in range(xs // seg_w, (xe - 1) // seg_w + 1):
                    seg_index = sep * ny * nx + ty * nx + tx
                    tile = self._segment(plane, seg_index, cache, (*cache_key, level, plane_id), stats)
                    ty0, tx0 = ty * seg_h, tx * seg_w
                    a_y, b_y = max(ys, ty0), min(ye, ty0 + tile.shape[0])
                    a_x, b_x = max(xs, tx0), min(xe, tx0 + tile.shape[1])
                    block = tile[a_y - ty0 : b_y - ty0, a_x - tx0 : b_x - tx0]
                    if plane.n_separate > 1:
                        out[a_y - y0 : b_y - y0, a_x - x0 : b_x - x0, sep] = block[..., 0]
                    else:
                        out[a_y - y0 : b_y - y0, a_x - x0 : b_x - x0] = block
        return out

    def close(self) -> None:
        self.reader.close()


def _snap_factor(ratio: float) -> float:
    """Level-0 px per level px; snapped to the nearest power of two when within 2 %."""
    if ratio <= 0:
        return ratio
    power = 2.0 ** round(math.log2(ratio))
    return power if abs(ratio - power) / ratio < 0.02 else ratio


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}", fix="round the coordinate")


def _check_window(x_px: Any, y_px: Any, width_px: Any, height_px: Any) -> tuple[int, int, int, int]:
    x, y = _as_int(x_px, "x_px"), _as_int(y_px, "y_px")
    w, h = _as_int(width_px, "width_px"), _as_int(height_px, "height_px")
    if w <= 0 or h <= 0:
        raise ConfigError(f"a window needs a positive width and height, got {w} x {h} px")
    return x, y, w, h


# ---------------------------------------------------------------------------------------------
# The morphology image
# ---------------------------------------------------------------------------------------------


class MorphologyImage:
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
        self._pyramids = [_TiffPyramid(f) for f in files]
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
        n_levels = min(len(p.level_shapes_yx) for p in self._pyramids)
        self.level_shapes_yx: list[tuple[int, int]] = list(first.level_shapes_yx[:n_levels])
        self.dtype = first.dtype
        self.n_z = first.n_z
        self.ome_pixel_size_um: float | None = first.ome_pixel_size_um
        # (pyramid index, channel index inside that pyramid) for every channel
        self._channels = [(i, c) for i, pyr in enumerate(self._pyramids) for c in range(pyr.n_channels)]
        self.channel_names = self._resolve_channel_names(channel_names)
        self.pixel_size_um, self.pixel_size_source = self._resolve_pixel_size(pixel_size_um)
        self._cache = _TileCache(cache_bytes)
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

    def clear_cache(self) -> None:
        """Drop every decoded tile held in the cache."""
        self._cache.clear()

    def close(self) -> None:
        """Close file descriptors (they are reopened on the next read)."""
        for pyr in self._pyramids:
            pyr.close()
        self._cache.clear()

    def downsample_factor(self, level: int) -> float:
        """Level-0 pixels per pixel of `level` (1.0, 2.0, 4.0, ... for Xenium pyramids)."""
        level = self._check_level(level)
        h0, w0 = self.level_shapes_yx[0]
        h, w = self.level_shapes_yx[level]
        return _snap_factor(w0 / w)

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
        x, y, w, h = _check_window(x_px, y_px, width_px, height_px)
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

    def read_level(self, level: int = 0, channel: int | str = 0) -> np.ndarray:
        """A whole pyramid level of one channel, (height_px, width_px) of `dtype`."""
        level = self._check_level(level)
        h, w = self.level_shapes_yx[level]
        return self.read_window(0, 0, w, h, level=level, channel=channel)

    def _check_level(self, level: int) -> int:
        level = _as_int(level, "level")
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


# ---------------------------------------------------------------------------------------------
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
        self._pyr = _TiffPyramid(self.path)
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
        self._cache = _TileCache(cache_bytes)
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
        return _snap_factor(self.level_shapes_yx[0][1] / self.level_shapes_yx[level][1])

    def read_native_window(self, x_px: int, y_px: int, width_px: int, height_px: int, *, level: int = 0) -> np.ndarray:
        """H&E pixels in its own frame: (height_px, width_px, 3) of `dtype`, outside filled with 0."""
        x, y, w, h = _check_window(x_px, y_px, width_px, height_px)
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

        x, y, w, h = _check_window(x_px, y_px, width_px, height_px)
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
