"""Reading Xenium output folders: lazy morphology images, tables, polygons, counts, H&E.

Entry point: `read_xenium(path) -> XeniumSlide`. Conventions (docs/io.md): micrometres in
``*_um``, morphology level-0 pixels in ``*_px`` (= um / pixel_size_um), x = column, y = row,
origin top-left; cell IDs are ``str``.
"""

from spatia.io.image import (
    DEFAULT_PIXEL_SIZE_UM,
    HEImage,
    MorphologyImage,
    read_alignment_csv,
)
from spatia.io.tables import CellPolygons, FeatureMatrix, FeatureMatrixFile, open_feature_matrix, read_feature_matrix
from spatia.io.xenium import DeferredTables, XeniumSlide, read_experiment, read_xenium

__all__ = [
    "DEFAULT_PIXEL_SIZE_UM",
    "CellPolygons",
    "DeferredTables",
    "FeatureMatrix",
    "FeatureMatrixFile",
    "HEImage",
    "MorphologyImage",
    "XeniumSlide",
    "read_alignment_csv",
    "open_feature_matrix",
    "read_experiment",
    "read_feature_matrix",
    "read_xenium",
]
