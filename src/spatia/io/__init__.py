"""Reading Xenium output folders: lazy morphology images, tables, polygons, counts, H&E.

Modules, by job: `bundle` (which file holds what), `xenium` (`read_xenium`), `slide`
(`XeniumSlide`), `tables` (generic tables, cells, clusterings), `polygons`, `matrix` (the 10x
feature matrix), `image` (`MorphologyImage`), `he_image` (`HEImage`), `tiff` (the tile decoder), `spatialdata` (SpatialData in and out; optional extra).
The simulator that writes bundles is `spatia.sim`; `io` only reads.

Entry point: `read_xenium(path) -> XeniumSlide`. Conventions (docs/io.md): micrometres in
``*_um``, morphology level-0 pixels in ``*_px`` (= um / pixel_size_um), x = column, y = row,
origin top-left; cell IDs are ``str``.
"""

from spatia.io.he_image import HEImage, read_alignment_csv
from spatia.io.image import DEFAULT_PIXEL_SIZE_UM, MorphologyImage
from spatia.io.matrix import FeatureMatrix, FeatureMatrixFile, open_feature_matrix, read_feature_matrix
from spatia.io.polygons import CellPolygons
from spatia.io.bundle import BundleFiles, find_bundle_files, read_experiment
from spatia.io.slide import DeferredTables, XeniumSlide
from spatia.io.spatialdata import read_spatialdata
from spatia.io.xenium import read_xenium

__all__ = [
    "BundleFiles",
    "find_bundle_files",
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
    "read_spatialdata",
    "read_xenium",
]
