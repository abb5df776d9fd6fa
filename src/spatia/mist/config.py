"""`BuildConfig`: every choice the MIST builder makes, with the `cpu` and `paper` presets.

The resolved config is written into the dataset's `manifest.json` and `spatia_run.json`; a
resumed build must use the same config (and the same inputs and seed) as the one it resumes.
Files and options are merged by `spatia.config.load_config` (unknown keys and wrong types are
refused there); `BuildConfig.validate` holds the rules between fields, and read back from a
manifest a config is `load_config(BuildConfig, manifest["builder_config"])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spatia.errors import ConfigError
from spatia.keys import SPLIT_BUFFER_UM

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("blocks", "slides")
SEGMENTATIONS = ("polygons", "circles")


@dataclass(frozen=True)
class BuildConfig:
    """How `spatia build` turns Xenium bundles into a MIST dataset.

    Sizes are in pixels: `*_image_px` are stored (output) sizes, `niche_px` is the niche tile
    side in full-resolution slide pixels. A tissue region is `tissue_niches x tissue_niches`
    niches (4 x 4 = 1024 x 1024 px in the paper).
    """

    cell_image_px: int = 64
    """Side of the stored cell crop (Sc)."""
    niche_px: int = 256
    """Side of one niche tile in full-resolution pixels (the paper's 256 px grid)."""
    niche_image_px: int = 64
    """Side of the stored niche image (Sn); the 256 px tile is area-resized to it."""
    tissue_niches: int = 4
    """Niches per tissue-region side (4 -> 4 x 4 niches, 1024 x 1024 px)."""
    tissue_image_px: int = 128
    """Side of the stored tissue-region image (St)."""
    scale_percentile: float = 99.0
    """Percentile of cell bounding-square sides that maps to `cell_image_px` (global scale per
    slide). The paper uses the maximum (100); a high percentile keeps one giant outlier from
    shrinking every cell. Cells larger than that are clipped (counted, flagged in the index)."""
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    """Low/high percentiles of non-zero image intensities mapped to 0 and 255 (per slide)."""
    norm_max_samples: int = 4_000_000
    """Pixels sampled (on a coarse pyramid level, strided) to estimate the percentiles."""
    image_channel: int = 0
    """Channel of the morphology image to use (0 = DAPI for Xenium)."""
    min_counts: int = 1
    """Cells with fewer total counts are skipped (reason `zero_counts` when the total is 0,
    `low_counts` otherwise)."""
    split_mode: str = "blocks"
    """`blocks`: spatially disjoint square blocks of tissue regions within each slide; `slides`:
    whole slides go to one split."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Target fractions of blocks (or slides) for train / val / test."""
    split_block_tissues: int = 1
    """Block side in tissue regions for `split_mode="blocks"` (1 -> 1024 px blocks)."""
    split_buffer_um: float = SPLIT_BUFFER_UM
    """Train cells closer than this to a val/test block get split `buffer` (kept in the
    dataset and in their niche sums, but never sampled as training cells)."""
    slide_splits: dict[str, str] = field(default_factory=dict)
    """Optional fixed split per slide ID (`split_mode="slides"`), e.g. donor-disjoint splits."""
    record_codec: str = "lz4"
    """Compression of record payloads: `lz4` (masked crops shrink about tenfold) or `none`."""
    lmdb_map_size_gb: float = 1024.0
    """Upper bound of each LMDB store (virtual; the files only grow as needed)."""
    segmentation: str = "polygons"
    """`polygons`: the bundle's cell segmentation (cell_boundaries.parquet, else
    cells.zarr.zip); a bundle without one is refused. `circles`: circles of `circle_radius_um`
    around every cell centroid instead (for bundles without segmentation; asked for explicitly)."""
    circle_radius_um: float = 0.0
    """Radius of the circles of `segmentation="circles"` (required there, e.g. 6)."""
    accept_cell_loss: bool = False
    """Build even when a slide keeps no cell, or loses more than half of its cells to one skip
    reason (otherwise an `InputDataError` names the reason and its usual cause). A build that
    keeps no cell at all is always refused."""
    accept_pixel_size_mismatch: bool = False
    """Build even when experiment.xenium's pixel size and the image's OME pixel size differ by
    more than 1 % (experiment.xenium's is then used); otherwise an `InputDataError`."""
    preset: str = "cpu"
    """Name of the preset this config started from (informational)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def cpu(cls, **overrides: Any) -> BuildConfig:
        """Small images for CPU training: crop 64 px, niche 64 px, tissue 128 px."""
        return cls(**{"preset": "cpu", **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> BuildConfig:
        """The paper's sizes for ViT-MAE encoders: crop, niche and tissue images all 224 px."""
        base = {"preset": "paper", "cell_image_px": 224, "niche_image_px": 224, "tissue_image_px": 224}
        return cls(**{**base, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BuildConfig:
        """`cpu` or `paper`, with field overrides (None values are ignored)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if name == "cpu":
            return cls.cpu(**overrides)
        if name == "paper":
            return cls.paper(**overrides)
        raise ConfigError(f"unknown build preset {name!r}", fix="use --preset cpu or --preset paper")

    # ------------------------------------------------------------------------------------------
    @property
    def tissue_px(self) -> int:
        """Side of a tissue region in full-resolution pixels (1024 by default)."""
        return self.niche_px * self.tissue_niches

    def validate(self) -> None:
        """Raise `ConfigError` for values out of range or inconsistent with each other."""

        def bad(problem: str, fix: str) -> ConfigError:
            return ConfigError(problem, fix=fix)

        for name in ("cell_image_px", "niche_px", "niche_image_px", "tissue_niches", "tissue_image_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}", f"set {name} to e.g. 64")
        if self.cell_image_px < 8:
            raise bad(f"cell_image_px={self.cell_image_px} is too small", "use at least 8 px (64 for CPU, 224 for the paper)")
        if not 0 < self.scale_percentile <= 100:
            raise bad(f"scale_percentile must be in (0, 100], got {self.scale_percentile}", "use e.g. 99")
        lo, hi = self.norm_percentiles
        if not 0 <= lo < hi <= 100:
            raise bad(f"norm_percentiles must satisfy 0 <= low < high <= 100, got {self.norm_percentiles}", "use e.g. 1,99.8")
        if self.norm_max_samples < 1000:
            raise bad("norm_max_samples must be at least 1000", "use the default 4000000")
        if self.min_counts < 0:
            raise bad("min_counts must be >= 0", "use 1 to skip cells with zero counts, 0 to keep them")
        if self.split_mode not in SPLIT_MODES:
            raise bad(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}", "use blocks or slides")
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
            raise bad(
                f"split_fractions must be three non-negative numbers summing to 1 with train > 0, got {fr}",
                "use e.g. 0.8,0.1,0.1",
            )
        if self.split_block_tissues < 1:
            raise bad("split_block_tissues must be >= 1", "use 1 (one 1024 px tissue region per block)")
        if self.split_buffer_um < 0:
            raise bad("split_buffer_um must be >= 0", "use 0 for no buffer")
        for slide, split in self.slide_splits.items():
            if split not in SPLITS:
                raise bad(f"slide_splits[{slide!r}] = {split!r} is not one of {SPLITS}", "use train, val or test")
        if self.record_codec not in ("lz4", "none"):
            raise bad(f"record_codec must be lz4 or none, got {self.record_codec!r}", "use lz4")
        if self.lmdb_map_size_gb <= 0:
            raise bad("lmdb_map_size_gb must be positive", "use the default 1024")
        if self.segmentation not in SEGMENTATIONS:
            raise bad(f"segmentation must be one of {SEGMENTATIONS}, got {self.segmentation!r}", "use polygons or circles")
        if self.segmentation == "circles" and not self.circle_radius_um > 0:
            raise bad("segmentation 'circles' needs circle_radius_um > 0", "give the radius, e.g. --radius-um 6")
        if self.circle_radius_um < 0:
            raise bad("circle_radius_um must be >= 0", "use a positive radius in micrometres")
