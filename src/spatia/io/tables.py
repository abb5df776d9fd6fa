"""Xenium tables: generic table reading, cell IDs, the cells table and clusterings.

Polygons are read by `spatia.io.polygons`, the feature matrix by `spatia.io.matrix`.

Every reader returns plain numpy/pandas/scipy objects with cell IDs as ``str``, and appends a
human-readable line to a ``problems`` list (and logs a warning) for anything it skips or
repairs. Missing or malformed *required* content raises `BundleError`.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from spatia.errors import BundleError

log = logging.getLogger(__name__)

REPLACE_FIX = "the file is damaged or not a Xenium output file: copy it again from the Xenium output folder"


def note(problems: list[str], message: str) -> None:
    """Record a counted skip/repair: append to `problems` and log a warning."""
    problems.append(message)
    log.warning(message)


# ---------------------------------------------------------------------------------------------
# Cell IDs
# ---------------------------------------------------------------------------------------------


def ids_to_str(values: np.ndarray | pd.Series | list, *, path: Path | None = None) -> np.ndarray:
    """Cell IDs as an object array of ``str``: integers (old bundles) print without ``.0``,
    bytes are decoded as UTF-8."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64).astype(str).astype(object)
    if array.dtype.kind == "f":
        if np.isnan(array).any() or not np.all(np.mod(array, 1) == 0):
            raise BundleError(
                "cell IDs are non-integer numbers or missing",
                path=path,
                fix="cell_id must be a string or integer column without gaps",
            )
        return array.astype(np.int64).astype(str).astype(object)
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8").astype(object)
    if array.dtype.kind == "U":
        return array.astype(object)
    values = np.asarray(pd.Series(array, dtype=object).to_numpy(), dtype=object)
    if pd.isna(values).any():
        raise BundleError(
            f"{int(pd.isna(values).sum())} cell IDs are missing (empty)", path=path, fix="every cell needs a cell_id"
        )
    kind = pd.api.types.infer_dtype(values, skipna=False)
    if kind == "string":
        return values
    if kind == "bytes":
        return pd.Series(values).str.decode("utf-8").to_numpy(dtype=object)
    if kind == "integer":
        return values.astype(np.int64).astype(str).astype(object)
    return pd.Series(values).astype(str).to_numpy(dtype=object)


# ---------------------------------------------------------------------------------------------
# Generic table reading
# ---------------------------------------------------------------------------------------------


PARQUET_BATCH_ROWS = 65_536
"""Rows per batch when a Parquet table is read in pieces."""


def open_parquet_stream(path: Path):
    """A `pyarrow.parquet.ParquetFile` that reads page by page: without pre-buffering, a batch
    costs its own size, not its whole row group (Xenium writes tables of millions of rows as
    one row group)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet or (gzipped) CSV table; any parse failure becomes `BundleError`."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            handle = open_parquet_stream(path)
            # a pandas-written file stores a non-default index as a column: not a table column
            index_columns = (handle.schema_arrow.pandas_metadata or {}).get("index_columns", [])
            schema_names = [c for c in handle.schema_arrow.names if c not in index_columns]
            use = [c for c in columns if c in schema_names] if columns is not None else schema_names
            pieces: dict[str, list[pd.Series]] = {name: [] for name in use}
            for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=use, use_threads=False):
                for name in use:
                    pieces[name].append(batch.column(name).to_pandas())
            if not all(pieces.values()):
                return handle.schema_arrow.empty_table().select(use).to_pandas()
            # one column at a time: the frame, plus one column in two copies, at any moment
            frame = pd.DataFrame(index=pd.RangeIndex(handle.metadata.num_rows))
            for name in use:
                parts = pieces.pop(name)
                frame[name] = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
                del parts
            return frame
        if name.endswith((".csv", ".csv.gz")):
            header = pd.read_csv(path, nrows=0).columns
            use = [c for c in columns if c in header] if columns is not None else None
            return pd.read_csv(path, usecols=use)
    except Exception as exc:
        error = read_error(exc, path)
        if error is None:
            raise
        raise error from None
    raise BundleError("unsupported table format", path=path, fix="use .parquet, .csv or .csv.gz")


TABLE_READ_ERRORS = (OSError, ValueError, EOFError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError)


def read_error(exc: Exception, path: Path) -> BundleError | None:
    """The `BundleError` a failed table read becomes; None for an error that is not about the
    file (a bug: re-raise it)."""
    if isinstance(exc, BundleError):
        return exc
    if isinstance(exc, TABLE_READ_ERRORS):
        return BundleError(f"cannot read the table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=REPLACE_FIX)
    if type(exc).__module__.startswith("pyarrow"):  # pyarrow raises its own error classes (ArrowInvalid, ...)
        return BundleError(f"cannot read the Parquet table ({type(exc).__name__}: {str(exc)[:300]})", path=path, fix=REPLACE_FIX)
    return None


def require_columns(df: pd.DataFrame, required: list[str], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise BundleError(
            f"missing column(s) {missing}; found {list(df.columns)}",
            path=path,
            fix=f"a Xenium {path.name} has columns {required} (and more)",
        )


# ---------------------------------------------------------------------------------------------
# cells.parquet
# ---------------------------------------------------------------------------------------------

_CELL_RENAMES = {
    "x_centroid": "x_centroid_um",
    "y_centroid": "y_centroid_um",
    "cell_area": "cell_area_um2",
    "nucleus_area": "nucleus_area_um2",
}


def read_cells_table(path: Path) -> pd.DataFrame:
    """Read ``cells.parquet`` / ``cells.csv.gz``.

    Returns:
        DataFrame indexed by ``cell_id`` (str, unique) with ``x_centroid_um``, ``y_centroid_um``
        (float64), ``cell_area_um2``, ``nucleus_area_um2`` (float64, NaN when absent) and every
        other column of the file (count columns unchanged, text columns as str).
    """
    df = read_table(path)
    require_columns(df, ["cell_id", "x_centroid", "y_centroid"], path)
    ids = ids_to_str(df.pop("cell_id").to_numpy(), path=path)
    df.rename(columns=_CELL_RENAMES, inplace=True)
    df.index = pd.Index(ids, name="cell_id", dtype=object)
    del ids
    duplicated = df.index.duplicated()
    if duplicated.any():
        raise BundleError(
            f"{int(duplicated.sum())} cell IDs appear more than once (first: {df.index[duplicated][0]!r})",
            path=path,
            fix="cell_id must be unique; use the cells table written by Xenium Onboard Analysis",
        )
    for column in ("x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"):
        if column not in df.columns:
            df[column] = np.nan
        try:
            df[column] = pd.to_numeric(df[column], errors="raise").astype(np.float64)
        except (ValueError, TypeError):
            raise BundleError(f"column {column} is not numeric", path=path, fix=REPLACE_FIX) from None
    for column in df.columns:
        if df[column].dtype == object:
            values = df[column].to_numpy()
            if len(values) and isinstance(values[0], bytes):
                df[column] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    front = ["x_centroid_um", "y_centroid_um", "cell_area_um2", "nucleus_area_um2"]
    return df[front + [c for c in df.columns if c not in front]]


# ---------------------------------------------------------------------------------------------
# Clusterings
# ---------------------------------------------------------------------------------------------


def read_clusterings(clustering_dir: Path, cell_ids: pd.Index, problems: list[str]) -> tuple[pd.DataFrame, list[Path]]:
    """Read every ``<clustering_dir>/<name>/clusters.csv`` (columns Barcode, Cluster).

    Returns:
        A DataFrame indexed like `cell_ids` with one categorical column per clustering, named by
        its folder; categories are the cluster labels as str, ordered numerically when numeric;
        cells without a cluster are NA. And the files read.
    """
    columns: dict[str, pd.Categorical] = {}
    files: list[Path] = []
    if not clustering_dir.is_dir():
        return pd.DataFrame(index=cell_ids), files
    for folder in sorted(p for p in clustering_dir.iterdir() if p.is_dir()):
        path = folder / "clusters.csv"
        if not path.exists():
            continue
        try:
            df = read_table(path)
            require_columns(df, ["Barcode", "Cluster"], path)
        except BundleError as error:
            note(problems, f"clustering {folder.name} skipped: {error.problem}")
            continue
        files.append(path)
        barcodes = pd.Index(ids_to_str(df["Barcode"].to_numpy(), path=path), dtype=object)
        labels = df["Cluster"]
        duplicated = barcodes.duplicated()
        if duplicated.any():
            note(problems, f"clustering {folder.name}: {int(duplicated.sum())} duplicated barcodes; kept the first")
            barcodes, labels = barcodes[~duplicated], labels[~duplicated]
        unknown = int((~barcodes.isin(cell_ids)).sum())
        if unknown:
            note(problems, f"clustering {folder.name}: {unknown} barcodes are not kept cells; ignored")
        if pd.api.types.is_numeric_dtype(labels):
            numeric = pd.to_numeric(labels)
            order = np.sort(numeric.dropna().unique())
            text = numeric.map(lambda v: str(int(v)) if float(v).is_integer() else str(v))
            categories = [str(int(v)) if float(v).is_integer() else str(v) for v in order]
        else:
            text = labels.astype(str)
            categories = sorted(text.dropna().unique())
        series = pd.Series(text.to_numpy(), index=barcodes).reindex(cell_ids)
        columns[folder.name] = pd.Categorical(series.to_numpy(), categories=categories)
    return pd.DataFrame(columns, index=cell_ids), files
