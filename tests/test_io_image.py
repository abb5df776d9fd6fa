"""Lazy windowed reads of morphology images: pyramids, v2 channel folders, z-stacks, H&E."""

from __future__ import annotations

import pickle
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

from spatia.errors import BundleError, ConfigError
from spatia.io.he_image import HEImage, read_alignment_csv
from spatia.io.image import DEFAULT_PIXEL_SIZE_UM, XENIUM_V2_CHANNELS, MorphologyImage
from helpers import write_pyramid


def downsample(image: np.ndarray) -> np.ndarray:
    return image[..., ::2, ::2]


def reference_window(level: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Slice of a full 2-D array with zero padding outside."""
    out = np.zeros((h, w), dtype=level.dtype)
    ys, ye = max(y, 0), min(y + h, level.shape[0])
    xs, xe = max(x, 0), min(x + w, level.shape[1])
    if ys < ye and xs < xe:
        out[ys - y : ye - y, xs - x : xe - x] = level[ys:ye, xs:xe]
    return out


WINDOWS = [
    (0, 0, 256, 256),  # aligned with tiles
    (100, 333, 300, 257),  # crosses tile borders
    (3900, 4000, 512, 512),  # past the bottom-right edge: zero padded
    (-40, -25, 64, 64),  # before the top-left corner
    (4096, 100, 10, 10),  # fully outside
]


def test_real_image_windows_equal_slices_of_full_reads(real_bundle):
    path = real_bundle / "morphology_focus.ome.tif"
    image = MorphologyImage(path)
    assert image.level_shapes_yx == [(4096, 4096), (2048, 2048), (1024, 1024)]
    assert image.channel_names == ["DAPI"]
    assert image.dtype == np.uint16 and image.n_z == 1
    assert image.pixel_size_um == pytest.approx(0.2125) and image.pixel_size_source == "ome"
    assert [image.downsample_factor(level) for level in range(3)] == [1.0, 2.0, 4.0]
    assert image.io_stats["tiles_decoded"] == 0  # opening decodes nothing
    for level in range(3):
        full = tifffile.imread(path, level=level)
        assert np.array_equal(image.read_level(level), full)
        scale = 2**level
        for x, y, w, h in WINDOWS:
            x_l, y_l = x // scale, y // scale
            window = image.read_window(x_l, y_l, w, h, level=level, channel="DAPI")
            assert window.shape == (h, w) and window.dtype == np.uint16
            assert np.array_equal(window, reference_window(full, x_l, y_l, w, h)), (level, x, y)


def test_cache_reuses_decoded_tiles_and_pickle_round_trip(real_bundle):
    image = MorphologyImage(real_bundle / "morphology_focus.ome.tif")
    first = image.read_window(200, 200, 200, 200)
    decoded = image.io_stats["tiles_decoded"]
    assert decoded == 4  # 256 px tiles: the window touches 2 x 2 of them
    again = image.read_window(210, 190, 200, 200)  # the same 4 tiles
    assert image.io_stats["tiles_decoded"] == decoded and image.io_stats["cache_hits"] >= 4
    assert np.array_equal(first[0:190, 10:200], again[10:200, 0:190])
    clone = pickle.loads(pickle.dumps(image))
    assert np.array_equal(clone.read_window(200, 200, 200, 200), first)


def test_pyramid_with_subifds_and_ome_metadata(tmp_path):
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 4000, (300, 500), dtype=np.uint16)
    levels = [level0, downsample(level0), downsample(downsample(level0))]
    path = write_pyramid(tmp_path / "p.ome.tif", levels, channel_names=["DAPI"], pixel_size_um=0.5)
    image = MorphologyImage(path)
    assert image.level_shapes_yx == [(300, 500), (150, 250), (75, 125)]
    assert image.pixel_size_um == 0.5 and image.pixel_size_source == "ome"
    for level, data in enumerate(levels):
        assert image.downsample_factor(level) == 2.0**level
        assert np.array_equal(image.read_level(level), data)
        assert np.array_equal(image.read_window(37, 11, 90, 70, level=level), reference_window(data, 37, 11, 90, 70))
    with pytest.raises(ConfigError, match="level 3 does not exist"):
        image.read_window(0, 0, 10, 10, level=3)
    with pytest.raises(ConfigError, match="unknown channel"):
        image.read_window(0, 0, 10, 10, channel="CD45")
    with pytest.raises(ConfigError, match="positive width"):
        image.read_window(0, 0, 0, 10)


def test_pyramid_as_reduced_pages_strips_and_default_pixel_size(tmp_path):
    rng = np.random.default_rng(1)
    level0 = rng.integers(0, 60000, (256, 384), dtype=np.uint16)
    path = tmp_path / "chain.tif"
    with tifffile.TiffWriter(path) as tw:  # no OME: levels are reduced pages of the main chain, stored in strips
        tw.write(level0, rowsperstrip=50)
        tw.write(downsample(level0), rowsperstrip=50, subfiletype=1)
    image = MorphologyImage(path)
    assert image.level_shapes_yx == [(256, 384), (128, 192)]
    assert image.pixel_size_um == DEFAULT_PIXEL_SIZE_UM and image.pixel_size_source == "default"
    assert any("pixel size" in w for w in image.warnings)
    assert np.array_equal(image.read_window(-5, 40, 100, 100), reference_window(level0, -5, 40, 100, 100))
    assert np.array_equal(image.read_level(1), downsample(level0))


def test_zstack_is_max_projected(tmp_path):
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 1000, (5, 200, 260), dtype=np.uint16)
    stack[3, 50:60, 70:80] = 65000  # a bright spot in one z plane only
    path = write_pyramid(
        tmp_path / "morphology.ome.tif", [stack, downsample(stack)], axes="ZYX", channel_names=["DAPI"]
    )
    image = MorphologyImage(path)
    assert image.n_z == 5 and image.channel_names == ["DAPI"]
    projection = stack.max(axis=0)
    assert np.array_equal(image.read_level(0), projection)
    assert np.array_equal(image.read_window(60, 40, 32, 32), reference_window(projection, 60, 40, 32, 32))
    assert image.read_window(70, 50, 10, 10).min() == 65000
    assert np.array_equal(image.read_level(1), downsample(stack).max(axis=0))


def test_multichannel_single_file_channel_selection(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 1000, (3, 128, 128), dtype=np.uint16)
    path = write_pyramid(tmp_path / "c.ome.tif", [data], axes="CYX", channel_names=["DAPI", "18S", "Vimentin"])
    image = MorphologyImage(path)
    assert image.channel_names == ["DAPI", "18S", "Vimentin"]
    for index, name in enumerate(image.channel_names):
        assert np.array_equal(image.read_level(0, channel=name), data[index])
        assert np.array_equal(image.read_level(0, channel=index), data[index])
    assert np.array_equal(image.read_level(0, channel="vimentin"), data[2])  # case-insensitive


def _v2_ome_xml(index: int, shape: tuple[int, int], uuids: list[str]) -> str:
    """OME-XML as Xenium v2 writes it into each channel file: all 4 channels, TiffData per file."""
    channels = "".join(
        f'<Channel ID="Channel:0:{c}" Name="{name}" SamplesPerPixel="1"/>' for c, name in enumerate(XENIUM_V2_CHANNELS)
    )
    tiffdata = "".join(
        f'<TiffData FirstC="{c}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1">'
        f'<UUID FileName="morphology_focus_{c:04d}.ome.tif">{uuids[c]}</UUID></TiffData>'
        for c in range(4)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" UUID="{uuids[index]}">'
        '<Image ID="Image:0" Name="morphology_focus">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="{shape[1]}" SizeY="{shape[0]}" '
        'SizeC="4" SizeZ="1" SizeT="1" PhysicalSizeX="0.2125" PhysicalSizeY="0.2125">'
        f"{channels}{tiffdata}</Pixels></Image></OME>"
    )


def test_v2_folder_of_channel_files_with_multifile_ome(tmp_path):
    folder = tmp_path / "morphology_focus"
    folder.mkdir()
    rng = np.random.default_rng(4)
    data = rng.integers(0, 5000, (4, 192, 320), dtype=np.uint16)
    uuids = [f"urn:uuid:{uuid.UUID(int=i + 1)}" for i in range(4)]
    # files written in reverse order of names: the reader orders channels by file name
    for c in reversed(range(4)):
        with tifffile.TiffWriter(folder / f"morphology_focus_{c:04d}.ome.tif") as tw:
            tw.write(
                data[c],
                tile=(64, 64),
                subifds=1,
                compression="zlib",
                description=_v2_ome_xml(c, data.shape[1:], uuids),
                metadata=None,
            )
            tw.write(downsample(data[c]), tile=(64, 64), subfiletype=1, compression="zlib", metadata=None)
    image = MorphologyImage(folder)
    assert image.channel_names == XENIUM_V2_CHANNELS and not image.warnings  # names came from the OME-XML
    assert image.level_shapes_yx == [(192, 320), (96, 160)]
    assert image.pixel_size_um == 0.2125
    for c, name in enumerate(XENIUM_V2_CHANNELS):
        assert np.array_equal(image.read_window(10, 20, 100, 80, channel=name), data[c, 20:100, 10:110])
        assert np.array_equal(image.read_level(1, channel=c), downsample(data[c]))
    assert np.array_equal(image.read_level(0, channel="CD45"), data[1])  # one part of "ATP1A1/CD45/E-Cadherin"


def test_v2_folder_without_channel_names_uses_xenium_order(tmp_path):
    folder = tmp_path / "morphology_focus"
    folder.mkdir()
    data = np.arange(4 * 64 * 64, dtype=np.uint16).reshape(4, 64, 64)
    for c in range(4):
        tifffile.imwrite(folder / f"morphology_focus_{c:04d}.ome.tif", data[c], tile=(32, 32), metadata=None)
    image = MorphologyImage(folder, pixel_size_um=0.2125)
    assert image.channel_names == XENIUM_V2_CHANNELS and image.pixel_size_source == "given"
    assert any("channel names" in w for w in image.warnings)
    assert np.array_equal(image.read_level(0, channel=3), data[3])


def test_40k_slide_window_decodes_only_its_tiles(tmp_path):
    size, tile = 40_000, 512
    n_tiles = -(-size // tile)

    def tiles(n: int):
        per_row = -(-n // tile)
        for ty in range(per_row):
            for tx in range(per_row):
                yield np.full((tile, tile), (ty * per_row + tx) % 65521, dtype=np.uint16)

    path = tmp_path / "big.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:  # written tile by tile: never in memory
        args = {"dtype": np.uint16, "tile": (tile, tile), "compression": "zstd", "compressionargs": {"level": 1}}
        tw.write(tiles(size), shape=(size, size), subifds=1, metadata={"axes": "YX", "PhysicalSizeX": 0.2125}, **args)
        tw.write(tiles(size // 2), shape=(size // 2, size // 2), subfiletype=1, **args)

    tracemalloc.start()
    image = MorphologyImage(path)
    assert image.io_stats == {"tiles_decoded": 0, "bytes_read": 0, "cache_hits": 0}
    x, y = 1000, 2000  # spans tile columns 1-2 and rows 3-4
    window = image.read_window(x, y, 512, 512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert image.level_shapes_yx == [(size, size), (size // 2, size // 2)]
    assert image.io_stats["tiles_decoded"] == 4
    assert image.io_stats["bytes_read"] < path.stat().st_size / 100
    assert peak < 32 * 2**20  # the whole slide would be 3.2 GB
    rows, cols = np.arange(y, y + 512) // tile, np.arange(x, x + 512) // tile
    assert np.array_equal(window, ((rows[:, None] * n_tiles + cols[None, :]) % 65521).astype(np.uint16))

    edge = image.read_window(19_800, 19_900, 512, 512, level=1)  # level 1 is 20,000 px wide
    per_row = -(-(size // 2) // tile)
    rows, cols = np.arange(19_900, 20_000) // tile, np.arange(19_800, 20_000) // tile
    assert np.array_equal(edge[:100, :200], (rows[:, None] * per_row + cols[None, :]) % 65521)
    assert not edge[100:].any() and not edge[:, 200:].any()


# ---------------------------------------------------------------------------------------------
# H&E
# ---------------------------------------------------------------------------------------------


def _pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth test pattern in [0, 1], defined in morphology level-0 pixel coordinates."""
    return 0.5 + 0.25 * np.sin(x / 23.0) + 0.25 * np.cos(y / 17.0 + x / 51.0)


def _write_he(tmp_path: Path, he_to_morph: np.ndarray, shape=(700, 900)) -> Path:
    """An RGB H&E whose pixel (u, v) shows the pattern at morphology position he_to_morph @ (u, v, 1)."""
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    x = he_to_morph[0, 0] * u + he_to_morph[0, 1] * v + he_to_morph[0, 2]
    y = he_to_morph[1, 0] * u + he_to_morph[1, 1] * v + he_to_morph[1, 2]
    value = _pattern(x, y)
    rgb = np.stack([value * 250, (1 - value) * 250, np.full_like(value, 128)], axis=-1).round().astype(np.uint8)
    return write_pyramid(
        tmp_path / "he.ome.tif", [rgb, rgb[::2, ::2]], axes="YXS", tile=128, photometric="rgb", pixel_size_um=None
    )


def test_he_window_is_resampled_into_the_morphology_frame(tmp_path):
    angle = np.deg2rad(12.0)
    scale = 1.3  # morphology px per H&E px
    he_to_morph = np.array(
        [
            [scale * np.cos(angle), -scale * np.sin(angle), 40.0],
            [scale * np.sin(angle), scale * np.cos(angle), -25.0],
            [0.0, 0.0, 1.0],
        ]
    )
    he_path = _write_he(tmp_path, he_to_morph)
    csv = tmp_path / "he_imagealignment.csv"
    csv.write_text("\n".join(",".join(f"{v:.12g}" for v in row) for row in he_to_morph) + "\n")
    assert np.allclose(read_alignment_csv(csv), he_to_morph)
    he = HEImage(he_path, csv, morphology_downsample=[1.0, 2.0])
    assert he.level_shapes_yx == [(700, 900), (350, 450)]
    assert np.array_equal(he.read_native_window(0, 0, 900, 700), tifffile.imread(he_path))

    x0, y0, w, h = 300, 400, 120, 90
    window = he.read_window(x0, y0, w, h)
    assert window.shape == (h, w, 3) and window.dtype == np.uint8
    rows, cols = np.mgrid[0:h, 0:w]
    expected = _pattern(x0 + cols.astype(float), y0 + rows.astype(float)) * 250
    assert np.abs(window[..., 0].astype(float) - expected).max() < 6  # bilinear + uint8 rounding
    assert np.all(window[..., 2] == 128)

    coarse = he.read_window(x0 // 2, y0 // 2, w // 2, h // 2, level=1)  # morphology level 1 (2x coarser)
    rows, cols = np.mgrid[0 : h // 2, 0 : w // 2]
    expected_coarse = _pattern((x0 // 2 + cols + 0.5) * 2 - 0.5, (y0 // 2 + rows + 0.5) * 2 - 0.5) * 250
    assert np.abs(coarse[..., 0].astype(float) - expected_coarse).max() < 12

    # the other direction (matrix taken as morphology -> H&E) does not reproduce the pattern
    wrong = HEImage(he_path, np.linalg.inv(he_to_morph)).read_window(x0, y0, w, h)
    assert np.abs(wrong[..., 0].astype(float) - expected).mean() > 20

    # morphology pixels outside the H&E are 0
    outside = he.read_window(-500, -500, 50, 50)
    assert not outside.any()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,0,0\n0,1,0\n", "expected a 3 x 3 matrix"),
        ("1,0,0\n0,1,0\n0,0,2\n", "last row"),
        ("0,0,5\n0,0,3\n0,0,1\n", "singular"),
        ("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,4\n5,6,7,8\n", "expected a 3 x 3 matrix"),
    ],
)
def test_bad_alignment_csv(tmp_path, text, message):
    path = tmp_path / "alignment.csv"
    path.write_text(text)
    with pytest.raises(BundleError, match=message):
        read_alignment_csv(path)


def test_alignment_csv_with_header_and_spaces(tmp_path):
    path = tmp_path / "alignment.csv"
    path.write_text("a,b,c\n 2.0, 0.0, 10\n0.0, 2.0, -5.5e1\n0 ,0, 1\n")
    assert np.allclose(read_alignment_csv(path), [[2, 0, 10], [0, 2, -55], [0, 0, 1]])
