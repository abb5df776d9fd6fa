"""SpatialData in and out (the optional extra ``pip install 'spatia[spatialdata]'``).

* `to_spatialdata(slide)` (also ``XeniumSlide.to_spatialdata()``) gives the `SpatialData` object
  spatialdata-io's ``xenium(path, cells_as_circles=True)`` gives, minus the transcripts and the
  label rasters: the morphology image ``morphology_focus`` (lazy: dask reads the TIFF pyramid
  tile by tile, one pyramid level per scale), the shapes ``cell_boundaries``,
  ``nucleus_boundaries`` (polygons) and ``cell_circles`` (centroid + radius sqrt(area / pi)),
  and the table ``table`` (raw counts) annotating ``cell_circles`` through ``region`` /
  ``cell_id``. Coordinate system ``global``, in morphology level-0 pixels: the image maps by
  the identity, shapes (stored in micrometres, Xenium's frame) by ``Scale(1 / pixel_size_um)``.
* `read_spatialdata(sdata_or_zarr)` turns such an object (ours, or spatialdata-io's Xenium
  reader's, or a ``.zarr`` store written from either) back into a `XeniumSlide`, which
  `spatia build` takes like a bundle (a path to a SpatialData ``.zarr`` store works there too).

Conventions read (spatialdata-io's): shapes and ``table.obsm["spatial"]`` in micrometres; the
pixel size is the scale between the cell shapes and the image in the chosen coordinate system.
spatialdata is imported only inside the functions (module import stays light).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.arrays import ragged_index
from spatia.errors import ConfigError, InputDataError
from spatia.io.image import PyramidImage
from spatia.io.polygons import CellPolygons
from spatia.io.slide import XeniumSlide
from spatia.io.tiff import check_window

if TYPE_CHECKING:
    from spatialdata import SpatialData

COORDINATE_SYSTEM = "global"
IMAGE_ELEMENTS = ("morphology_focus", "morphology_mip")  # spatialdata-io's names, first found is read
CELL_SHAPES, NUCLEUS_SHAPES, CIRCLES, TABLE = "cell_boundaries", "nucleus_boundaries", "cell_circles", "table"
REGION_KEY, INSTANCE_KEY = "region", "cell_id"
GENE_FEATURE_TYPE = "Gene Expression"
CHUNK_PX = 1024  # dask chunk (per channel) of the lazy image in to_spatialdata
INSTALL_FIX = "install the optional extra: pip install 'spatia[spatialdata]'"
# slide.cells columns renamed back to the Xenium names spatialdata-io keeps in table.obs
_XENIUM_OBS_NAMES = {"cell_area_um2": "cell_area", "nucleus_area_um2": "nucleus_area"}
_DERIVED_COLUMNS = ("x_centroid_um", "y_centroid_um", "x_centroid_px", "y_centroid_px")


def _import_spatialdata():
    try:
        import spatialdata
    except ImportError as error:
        raise ConfigError(f"SpatialData support needs the spatialdata package ({error})", fix=INSTALL_FIX) from None
    return spatialdata


def is_spatialdata_store(path: str | Path) -> bool:
    """A folder that looks like a SpatialData ``.zarr`` store (zarr metadata + element groups)."""
    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs")):
        return False
    return any((path / group).is_dir() for group in ("images", "shapes", "tables", "points", "labels"))


# --- out: XeniumSlide -> SpatialData ----------------------------------------------------------


class _LevelArray:
    """One pyramid level of a `MorphologyImage` as a (c, y, x) array that dask reads by chunks."""

    def __init__(self, image: Any, level: int):
        self.image, self.level = image, level
        h, w = image.level_shapes_yx[level]
        self.shape = (len(image.channel_names), int(h), int(w))
        self.dtype = np.dtype(image.dtype)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        (c0, c1, _), (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape))
        if c1 <= c0 or y1 <= y0 or x1 <= x0:
            return np.zeros((max(c1 - c0, 0), max(y1 - y0, 0), max(x1 - x0, 0)), dtype=self.dtype)
        return np.stack([self.image.read_window(x0, y0, x1 - x0, y1 - y0, level=self.level, channel=c)
                         for c in range(c0, c1)])


def _image_element(image: Any, chunk_px: int):
    """The morphology image as a lazy multiscale image element (scale k = pyramid level k)."""
    import dask.array as da
    from dask.utils import SerializableLock
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from spatialdata.transformations._utils import compute_coordinates
    from xarray import DataArray, Dataset, DataTree

    lock = SerializableLock()  # one lock for every level: they share the image's file handles
    channels = [str(name) for name in image.channel_names]
    scales = {}
    for level in range(image.n_levels):
        array = _LevelArray(image, level)
        data = da.from_array(array, chunks=(1, chunk_px, chunk_px), lock=lock, asarray=False, fancy=False,
                             meta=np.empty((0, 0, 0), dtype=array.dtype), name=False)  # False: a fresh random key
        scales[f"scale{level}"] = Dataset({"image": DataArray(data, dims=("c", "y", "x"), coords={"c": channels})})
    element = DataTree.from_dict(scales) if image.n_levels > 1 else scales["scale0"]["image"]
    set_transformation(element, {COORDINATE_SYSTEM: Identity()}, set_all=True)
    element = compute_coordinates(element)
    Image2DModel().validate(element)
    return element


def _polygons_element(polygons: CellPolygons, cell_ids: np.ndarray, pixel_size_um: float):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Scale

    keep = np.flatnonzero(polygons.has_polygon())
    sub = polygons.subset(keep)
    rings = shapely.linearrings(sub.vertices_um, indices=sub.cell_of_vertex())  # closes each ring
    frame = gpd.GeoDataFrame({"geometry": shapely.polygons(rings)}, index=pd.Index(cell_ids[keep], name="cell_id"))
    scale = Scale([1.0 / pixel_size_um, 1.0 / pixel_size_um], axes=("x", "y"))
    return ShapesModel.parse(frame, transformations={COORDINATE_SYSTEM: scale})


def to_spatialdata(slide: XeniumSlide, *, image_name: str = IMAGE_ELEMENTS[0], circles: bool = True,
                   nucleus_boundaries: bool = True, chunk_px: int = CHUNK_PX) -> SpatialData:
    """The slide as a `SpatialData` object laid out as spatialdata-io's Xenium reader lays it out.

    Elements: image `image_name` (all channels, every pyramid level, read lazily), shapes
    ``cell_boundaries`` (cells with a polygon), ``nucleus_boundaries`` (when read),
    ``cell_circles`` (every cell; `circles`), table ``table``: ``.X`` raw counts (float32 CSR),
    ``obs`` the cells table with Xenium's column names (``cell_id``, ``cell_area``, ...) and
    ``region``, ``obsm["spatial"]`` centroids in um, ``uns["spatia"]`` slide ID and pixel size.
    The table annotates ``cell_circles`` (``cell_boundaries`` when `circles` is False).
    """
    spatialdata = _import_spatialdata()
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    if slide.counts is None:
        raise ConfigError("to_spatialdata needs the counts and polygons in memory, but this slide was read with "
                          "in_memory=False", fix="read the bundle with spatia.io.read_xenium(path) (the default)")
    ps = float(slide.pixel_size_um)
    cell_ids = np.asarray(slide.cells.index.astype(str))
    shapes = {}
    if slide.cell_boundaries is not None:
        shapes[CELL_SHAPES] = _polygons_element(slide.cell_boundaries, cell_ids, ps)
    if nucleus_boundaries and slide.nucleus_boundaries is not None:
        shapes[NUCLEUS_SHAPES] = _polygons_element(slide.nucleus_boundaries, cell_ids, ps)
    xy_um = slide.cells[["x_centroid_um", "y_centroid_um"]].to_numpy(dtype=np.float64)
    if circles:
        shapes[CIRCLES] = ShapesModel.parse(
            xy_um, geometry=0, radius=_radii_um(slide), index=pd.Index(cell_ids, name="cell_id"),
            transformations={COORDINATE_SYSTEM: Scale([1.0 / ps, 1.0 / ps], axes=("x", "y"))})
    region = CIRCLES if circles else CELL_SHAPES
    if region not in shapes:
        raise ConfigError(f"the slide has no cell polygons for the table to annotate ({slide.slide_id})",
                          fix="call to_spatialdata(circles=True)")
    table = TableModel.parse(_table(slide, cell_ids, xy_um, region), region=region, region_key=REGION_KEY,
                             instance_key=INSTANCE_KEY)
    images = {image_name: _image_element(slide.image, chunk_px)}
    sdata = spatialdata.SpatialData(images=images, shapes=shapes, tables={TABLE: table})
    sdata.attrs.update({"spatia_writer": "spatia.io.to_spatialdata", "spatia_slide_id": str(slide.slide_id)})
    return sdata


def _radii_um(slide: XeniumSlide) -> np.ndarray:
    """sqrt(cell_area / pi) as spatialdata-io; cells without an area get the median radius."""
    area = slide.cells["cell_area_um2"].to_numpy(dtype=np.float64) if "cell_area_um2" in slide.cells else None
    radius = np.sqrt(area / np.pi) if area is not None else np.full(slide.n_cells, np.nan)
    missing = ~np.isfinite(radius) | (radius <= 0)
    if missing.any():
        radius[missing] = np.nanmedian(radius[~missing]) if (~missing).any() else 1.0
    return radius


def _table(slide: XeniumSlide, cell_ids: np.ndarray, xy_um: np.ndarray, region: str):
    import anndata as ad

    from spatia import __version__

    obs = slide.cells.drop(columns=[c for c in _DERIVED_COLUMNS if c in slide.cells]).rename(columns=_XENIUM_OBS_NAMES)
    for column in obs.columns:
        if obs[column].dtype == object or pd.api.types.is_string_dtype(obs[column].dtype):
            obs[column] = obs[column].astype("category")
    obs.insert(0, INSTANCE_KEY, cell_ids)
    obs.index = pd.Index(cell_ids, name=None)
    obs[REGION_KEY] = pd.Categorical([region] * len(obs))
    var = pd.DataFrame({"gene_ids": np.asarray(slide.gene_ids, dtype=str), "feature_types": GENE_FEATURE_TYPE},
                       index=ad.utils.make_index_unique(pd.Index(slide.gene_names, dtype=str)))
    uns = {"spatia": {"slide_id": str(slide.slide_id), "pixel_size_um": float(slide.pixel_size_um),
                      "source_path": "" if slide.path is None else str(Path(slide.path).resolve()),
                      "cluster_columns": np.asarray(slide.cluster_columns, dtype=str), "spatia_version": __version__}}
    return ad.AnnData(X=sp.csr_matrix(slide.counts, dtype=np.float32), obs=obs, var=var,
                      obsm={"spatial": xy_um.copy()}, uns=uns)


# --- in: SpatialData -> XeniumSlide -----------------------------------------------------------


class SpatialDataImage(PyramidImage):
    """An image element of a SpatialData object with `MorphologyImage`'s reading interface.

    ``read_window`` computes only the dask chunks a window touches; parts outside are 0.
    """

    def __init__(self, levels: list[Any], channel_names: list[str], pixel_size_um: float, path: Path | str,
                 pixel_size_source: str):
        self._levels = levels  # dask arrays (c, y, x), level 0 first
        self.channel_names = channel_names
        self.level_shapes_yx = [(int(a.shape[1]), int(a.shape[2])) for a in levels]
        self.dtype = np.dtype(levels[0].dtype)
        self.pixel_size_um = float(pixel_size_um)
        self.pixel_size_source = pixel_size_source
        self.path = Path(path)
        self.n_z = 1
        self.ome_pixel_size_um: float | None = None
        self.warnings: list[str] = []
        self.files: list[Path] = []
        self._stats = {"windows_read": 0}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"SpatialDataImage({str(self.path)!r}, channels={self.channel_names}, levels={self.level_shapes_yx}, "
                f"dtype={self.dtype}, pixel_size_um={self.pixel_size_um})")

    def read_window(self, x_px: int, y_px: int, width_px: int, height_px: int, *, level: int = 0,
                    channel: int | str = 0) -> np.ndarray:
        """Pixels of one channel, (height_px, width_px) of `dtype`, window in pixels of `level`."""
        x, y, w, h = check_window(x_px, y_px, width_px, height_px)
        array = self._levels[self._check_level(level)]
        c = self.channel_index(channel)
        out = np.zeros((h, w), dtype=self.dtype)
        H, W = array.shape[1:]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            with self._lock:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = np.asarray(array[c, y0:y1, x0:x1].compute(scheduler="synchronous"))
                self._stats["windows_read"] += 1
        return out


def _affine_xy(element: Any, coordinate_system: str, name: str, where: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True) or {}
    if coordinate_system not in transforms:
        raise InputDataError(f"{where}: element {name!r} has no transformation to the coordinate system "
                             f"{coordinate_system!r} (it has {sorted(transforms)})",
                             fix="pass coordinate_system=... naming one that both the image and the cell shapes have")
    return np.asarray(transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=np.float64)


def _pick(container: Any, wanted: str | None, defaults: tuple[str, ...], kind: str, where: str, fix: str) -> str:
    names = list(container.keys())
    if wanted is not None:
        if wanted not in names:
            raise InputDataError(f"{where}: no {kind} element {wanted!r} (it has {names})", fix=fix)
        return wanted
    for name in defaults:
        if name in names:
            return name
    if kind == "image" and len(names) == 1:
        return names[0]
    wanted_names = " or ".join(map(repr, defaults))
    raise InputDataError(f"{where}: no {kind} element named {wanted_names} (it has {names})", fix=fix)


def _image_levels(element: Any, name: str, where: str) -> tuple[list[Any], list[str]]:
    from xarray import DataTree

    arrays = [element[k]["image"] if "image" in element[k] else next(iter(element[k].data_vars.values()))
              for k in element.children] if isinstance(element, DataTree) else [element]
    if tuple(arrays[0].dims) != ("c", "y", "x"):
        raise InputDataError(f"{where}: image {name!r} has dimensions {tuple(arrays[0].dims)}; a 2-D (c, y, x) "
                             "morphology image is needed", fix="pass image=... naming a 2-D image element")
    channels = [str(c) for c in arrays[0].coords["c"].values] if "c" in arrays[0].coords else []
    return [a.data for a in arrays], channels


def _cell_polygons(frame: Any, cell_ids: pd.Index, name: str, problems: list[str]) -> CellPolygons:
    """Polygons of a shapes element aligned to `cell_ids` (exterior ring, closing vertex dropped)."""
    import shapely

    keys = np.asarray((frame["cell_id"] if "cell_id" in frame.columns else frame.index).astype(str))
    geoms = np.asarray(frame.geometry.values, dtype=object)
    multi = shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON
    if multi.any():
        problems.append(f"{name}: {int(multi.sum())} multi-polygons; the first polygon of each is kept")
        geoms = np.where(multi, shapely.get_geometry(geoms, 0), geoms)
    coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    counts = np.bincount(ring, minlength=len(geoms))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    closed = np.zeros(len(geoms), dtype=bool)
    rings = np.flatnonzero(counts > 1)
    closed[rings] = np.all(coords[starts[rings]] == coords[starts[rings] + counts[rings] - 1], axis=1)
    lengths = counts - closed
    first = ~pd.Index(keys).duplicated()
    if not first.all():
        problems.append(f"{name}: {int((~first).sum())} cells have more than one polygon; the first is kept")
    position = pd.Index(keys[first]).get_indexer(cell_ids)
    unknown = int(first.sum() - (position >= 0).sum())
    if unknown:
        problems.append(f"{name}: {unknown} polygons of cells not in the table; skipped")
    rows = np.flatnonzero(first)[np.maximum(position, 0)]
    cell_lengths = np.where(position >= 0, lengths[rows], 0)
    offsets, gather = ragged_index(starts[rows], cell_lengths)
    without = int((cell_lengths < 3).sum())
    if without:
        problems.append(f"{name}: {without} cells have no polygon")
    return CellPolygons(offsets=offsets, vertices_um=coords[gather])


def read_spatialdata(sdata: SpatialData | str | Path, *, image: str | None = None, table: str = TABLE,
                     cell_shapes: str = CELL_SHAPES, nucleus_shapes: str | None = NUCLEUS_SHAPES,
                     coordinate_system: str = COORDINATE_SYSTEM, slide_id: str | None = None) -> XeniumSlide:
    """A `XeniumSlide` from a SpatialData object (or ``.zarr`` store) laid out as spatialdata-io's
    ``xenium()`` or `to_spatialdata` lay it out; `spatia build` takes it like a bundle.

    Reads: the table's raw counts (``Gene Expression`` features; others become controls), cell
    IDs (``obs["cell_id"]``), centroids (``obsm["spatial"]``, um), areas; the cell (and nucleus)
    polygons; the image (``morphology_focus``, else ``morphology_mip``, else `image`) lazily. The
    pixel size is the scale from the cell shapes (um) to the image's pixels in `coordinate_system`.

    Raises:
        InputDataError: a missing element, column or transformation, naming it and the fix.
    """
    spatialdata = _import_spatialdata()
    from spatia.expression import counts_from_anndata

    path = None
    if isinstance(sdata, (str, Path)):
        path = Path(sdata)
        if not is_spatialdata_store(path):
            raise InputDataError("not a SpatialData .zarr store (no zarr metadata with images/shapes/tables groups)",
                                 path=path, fix="pass a store written by SpatialData.write (or a Xenium bundle folder)")
        sdata = spatialdata.read_zarr(path)
    elif getattr(sdata, "path", None) is not None:
        path = Path(sdata.path)
    where = str(path) if path is not None else "SpatialData object"
    reader_fix = "read the Xenium bundle with spatialdata_io.xenium(path) (or XeniumSlide.to_spatialdata())"
    table_name = _pick(sdata.tables, table, (), "table", where, f"pass table=... naming the counts table; {reader_fix}")
    adata = sdata.tables[table_name]
    image_name = _pick(sdata.images, image, IMAGE_ELEMENTS, "image", where, f"pass image=... naming the morphology "
                       f"(DAPI) image; {reader_fix} with morphology_focus=True")
    cells_name = _pick(sdata.shapes, cell_shapes, (), "shapes", where, "pass cell_shapes=... naming the cell "
                       f"polygons; {reader_fix} with cells_boundaries=True")
    problems: list[str] = []

    # -- cells: IDs, centroids (um), areas, other columns ---------------------------------------
    obs = adata.obs
    attrs = adata.uns.get("spatialdata_attrs", {})
    id_column = "cell_id" if "cell_id" in obs else attrs.get("instance_key")
    ids = obs.get(id_column, obs.index)
    cell_ids = pd.Index(np.asarray(ids).astype(str), name="cell_id")
    if cell_ids.has_duplicates:
        n_repeated = int(cell_ids.duplicated().sum())
        raise InputDataError(f"{where}: table {table_name!r} has {n_repeated} duplicated cell IDs",
                             fix="keep one row per cell in the table")
    if "spatial" not in adata.obsm:
        raise InputDataError(f"{where}: table {table_name!r} has no obsm['spatial'] (cell centroids in um)",
                             fix=f"store the centroids (x_um, y_um) in obsm['spatial']; {reader_fix}")
    xy_um = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    cells = pd.DataFrame({"x_centroid_um": xy_um[:, 0], "y_centroid_um": xy_um[:, 1]}, index=cell_ids)
    drop = {"cell_id", attrs.get("region_key"), attrs.get("instance_key"), "cell_labels"}
    for column in obs.columns:
        if column not in drop:
            cells[{v: k for k, v in _XENIUM_OBS_NAMES.items()}.get(column, column)] = obs[column].values
    for column in ("cell_area_um2", "nucleus_area_um2"):
        if column not in cells:
            cells[column] = np.nan
    spatia_uns = adata.uns.get("spatia", {})
    cluster_columns = [str(c) for c in spatia_uns.get("cluster_columns", []) if str(c) in cells]

    # -- counts: gene columns; the other feature types are controls ----------------------------
    counts_all = counts_from_anndata(adata, source=path)
    types = adata.var["feature_types"].astype(str).to_numpy() if "feature_types" in adata.var else \
        np.full(adata.n_vars, GENE_FEATURE_TYPE)
    is_gene = types == GENE_FEATURE_TYPE
    names = np.asarray(adata.var_names.astype(str))
    gene_ids = adata.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in adata.var else names

    # -- pixel size: cell shapes (um) -> image level-0 pixels, an isotropic scale ---------------
    element = sdata.images[image_name]
    to_image = np.linalg.inv(_affine_xy(element, coordinate_system, image_name, where)) @ _affine_xy(
        sdata.shapes[cells_name], coordinate_system, cells_name, where)
    scale = to_image[0, 0]
    if not (scale > 0 and np.allclose(to_image, np.diag([scale, scale, 1.0]), rtol=1e-6, atol=1e-9 * scale)):
        raise InputDataError(f"{where}: the cell shapes {cells_name!r} map to the image {image_name!r} by "
                             f"{np.round(to_image, 6).tolist()}, not by a scale (um -> px) alone",
                             fix="keep Xenium's frame: shapes in um with Scale(1 / pixel_size) and the image by "
                                 f"the identity in {coordinate_system!r}, as spatialdata_io.xenium writes them")
    pixel_size_um = 1.0 / scale
    cells.insert(2, "x_centroid_px", cells["x_centroid_um"] / pixel_size_um)
    cells.insert(3, "y_centroid_px", cells["y_centroid_um"] / pixel_size_um)

    levels, channels = _image_levels(element, image_name, where)
    if len(channels) == 1 and not channels[0].isalpha():
        problems.append(f"image {image_name!r}: channel {channels[0]!r} has no name; taken to be DAPI")
        channels = ["DAPI"]
    image_path = (path / "images" / image_name) if path is not None else Path(f"<SpatialData>/images/{image_name}")
    morphology = SpatialDataImage(levels, channels, pixel_size_um, image_path, f"{cells_name} -> {image_name} scale")

    boundaries = _cell_polygons(sdata.shapes[cells_name], cell_ids, cells_name, problems)
    nuclei = None
    if nucleus_shapes is not None and nucleus_shapes in sdata.shapes:
        nuclei = _cell_polygons(sdata.shapes[nucleus_shapes], cell_ids, nucleus_shapes, problems)
    if slide_id is None:
        slide_id = str(spatia_uns.get("slide_id") or (path.name.removesuffix(".zarr") if path else "spatialdata"))
    return XeniumSlide(
        path=path if path is not None else Path("<in-memory SpatialData>"), slide_id=slide_id,
        pixel_size_um=pixel_size_um, image=morphology, cells=cells,
        counts=sp.csr_matrix(counts_all[:, np.flatnonzero(is_gene)]), gene_names=list(names[is_gene]),
        gene_ids=list(gene_ids[is_gene]), control_counts=sp.csr_matrix(counts_all[:, np.flatnonzero(~is_gene)]),
        control_names=list(names[~is_gene]), control_types=list(types[~is_gene]), cell_boundaries=boundaries,
        nucleus_boundaries=nuclei, cluster_columns=cluster_columns, he=None, problems=problems,
        metadata={"spatialdata": {"table": table_name, "image": image_name, "cell_shapes": cells_name,
                                  "coordinate_system": coordinate_system}},
    )
