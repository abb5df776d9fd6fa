"""TIFF pyramids read tile by tile: the decoder under `MorphologyImage` and `HEImage`.

Nothing is decoded when a file is opened: only the TIFF directory (tile offsets, sizes,
compression) is parsed, through tifffile's page and SubIFD parsing. ``TiffPyramid.read`` reads
from disk (``os.pread``) and decodes only the tiles or strips that intersect the requested
window, keeping recently decoded tiles in a small LRU cache (``TileCache``) so that neighbouring
windows (cell crops, niche tiles) do not decode the same tile twice.

Supported: pyramids as SubIFDs or as reduced-resolution pages in the main IFD chain; tiled or
stripped pages, contiguous or separate samples, any codec tifffile/imagecodecs decodes; OME-XML
channel names, PhysicalSizeX and multi-file TiffData (``parse_ome``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatia.errors import BundleError, ConfigError

_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}
DAMAGED_FIX = "the file is damaged or incomplete: copy it again from the instrument output or re-download it"


# ---------------------------------------------------------------------------------------------
# Low-level pieces: raw file reads, tile cache, one TIFF pyramid
# ---------------------------------------------------------------------------------------------


class FileReader:
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


class TileCache:
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
class Plane:
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


def physical_size_um(value: str | None, unit: str | None) -> float | None:
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


def parse_ome(xml: str | None, filename: str) -> tuple[list[str], float | None, int | None]:
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
    size_um = physical_size_um(pixels.attrib.get("PhysicalSizeX"), pixels.attrib.get("PhysicalSizeXUnit"))
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


class _Collect(logging.Handler):
    """Keeps the messages tifffile logs while a file is parsed (instead of printing them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def tifffile_messages():
    """Collect tifffile's log messages (warnings about damaged files) instead of letting them
    print before spatia's own message; yields the list they are appended to."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class TiffPyramid:
    """The pyramid levels and 2-D planes of one TIFF file, with windowed reads.

    Planes are indexed ``[channel, z]``: the ``Z`` axis of the file's series is z, every other
    non-spatial axis (``C``, or ``I``/``Q``/``T`` when unnamed) is flattened into channels.

    A file whose tiles lie past its end (a truncated copy) is refused when opened; what tifffile
    reports about a damaged directory (e.g. lost OME metadata) is kept in `parse_messages`.
    """

    def __init__(self, path: Path):
        import tifffile

        self.path = Path(path)
        self.reader = FileReader(self.path)
        self.parse_messages: list[str] = []
        try:
            with tifffile_messages() as messages, tifffile.TiffFile(self.path, _multifile=False) as tif:
                if not tif.series:
                    raise BundleError("the TIFF file holds no image", path=self.path, fix=DAMAGED_FIX)
                series = tif.series[0]
                ome_xml = tif.ome_metadata if tif.is_ome else None
                self._read_structure(series)
        except BundleError:
            raise
        except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, struct.error) as exc:
            raise BundleError(
                f"cannot read the image as a TIFF file ({type(exc).__name__}: {exc})",
                path=self.path,
                fix=DAMAGED_FIX,
            ) from None
        self.parse_messages = list(dict.fromkeys(messages))
        self._check_extent()
        names, size_um, first_c = parse_ome(ome_xml, self.path.name)
        self.ome_channel_names = names
        self.ome_first_channel = first_c
        self.ome_pixel_size_um = size_um

    def _check_extent(self) -> None:
        """Refuse a file whose tiles lie past its end (truncated by an interrupted copy)."""
        size = self.path.stat().st_size
        n_tiles = n_past = 0
        for planes in self.levels:
            for plane in planes:
                present = plane.bytecounts > 0
                n_tiles += int(present.sum())
                n_past += int((present & (plane.offsets + plane.bytecounts > size)).sum())
        if n_past:
            raise BundleError(
                f"the image file is truncated: {n_past} of its {n_tiles} tiles lie past its end ({size} bytes)",
                path=self.path,
                fix=DAMAGED_FIX,
            )

    def _read_structure(self, series: Any) -> None:
        axes = series.axes
        plane_axes = [a for a in axes if a not in "YXS"]
        self.dtype = np.dtype(series.dtype)
        levels: list[list[Plane]] = []
        for level in series.levels:
            pages = list(level.pages)
            if any(page is None for page in pages):
                raise BundleError("the image has missing pages", path=self.path, fix=DAMAGED_FIX)
            levels.append([self._plane(page) for page in pages])
        sizes = [series.shape[axes.index(a)] for a in plane_axes]
        n_planes = int(np.prod(sizes)) if sizes else 1
        if any(len(planes) != n_planes for planes in levels):
            raise BundleError("pyramid levels hold different numbers of planes", path=self.path, fix=DAMAGED_FIX)
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
                    raise BundleError("planes have different samples per pixel", path=self.path, fix=DAMAGED_FIX)

    def _plane(self, page: Any) -> Plane:
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
                fix=DAMAGED_FIX,
            )
        jpeg_args: dict = {}
        if key.compression in _JPEG_COMPRESSIONS:
            jpeg_args = {"jpegtables": getattr(page, "jpegtables", None) or key.jpegtables, "jpegheader": key.jpegheader}
        return Plane(
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
        self, plane: Plane, seg_index: int, cache: TileCache, cache_key: tuple, stats: dict
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
                raise BundleError(f"cannot read the image file ({exc})", path=self.path, fix=DAMAGED_FIX) from None
            if len(data) != count:
                raise BundleError(
                    f"the image file is truncated (tile {seg_index} needs bytes {offset}..{offset + count})",
                    path=self.path,
                    fix=DAMAGED_FIX,
                )
            try:
                decoded, _, _ = plane.decode(data, seg_index, **plane.jpeg_args)
            except Exception as exc:  # imagecodecs raises codec-specific error classes
                raise BundleError(
                    f"tile {seg_index} of the image cannot be decoded ({type(exc).__name__}: {exc})",
                    path=self.path,
                    fix=DAMAGED_FIX,
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
                        fix=DAMAGED_FIX,
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
        cache: TileCache,
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


def snap_factor(ratio: float) -> float:
    """Level-0 px per level px; snapped to the nearest power of two when within 2 %."""
    if ratio <= 0:
        return ratio
    power = 2.0 ** round(math.log2(ratio))
    return power if abs(ratio - power) / ratio < 0.02 else ratio


def as_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ConfigError(f"{name} must be an integer number of pixels, got {value!r}", fix="round the coordinate")


def check_window(x_px: Any, y_px: Any, width_px: Any, height_px: Any) -> tuple[int, int, int, int]:
    x, y = as_int(x_px, "x_px"), as_int(y_px, "y_px")
    w, h = as_int(width_px, "width_px"), as_int(height_px, "height_px")
    if w <= 0 or h <= 0:
        raise ConfigError(f"a window needs a positive width and height, got {w} x {h} px")
    return x, y, w, h


# ---------------------------------------------------------------------------------------------
