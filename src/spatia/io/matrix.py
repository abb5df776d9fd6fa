"""The 10x cell-feature matrix: HDF5 (`cell_feature_matrix.h5`) or MEX folder.

`open_feature_matrix` opens the HDF5 file without reading the counts (they stream a block of
cells at a time); `read_feature_matrix` reads everything into a `FeatureMatrix`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatia.arrays import row_blocks_by_entries
from spatia.errors import BundleError
from spatia.io.tables import REPLACE_FIX, ids_to_str

GENE_FEATURE_TYPE = "Gene Expression"
"""The 10x feature type of real genes; every other feature type is a control (kept for QC)."""


@dataclass
class FeatureMatrix:
    """The 10x cell-feature matrix, cells as rows.

    Attributes:
        counts: CSR (n_barcodes, n_features), int32 or float32 raw counts.
        barcodes: object (n_barcodes,) of str cell IDs.
        feature_ids, feature_names, feature_types, genomes: object (n_features,) of str.
    """

    counts: sp.csr_matrix
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray
    genomes: np.ndarray

    @property
    def is_gene(self) -> np.ndarray:
        return self.feature_types == GENE_FEATURE_TYPE


def _counts_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype.kind in "iu":
        if data.size and (data.max() > np.iinfo(np.int32).max or data.min() < 0):
            return data.astype(np.float32)
        return data.astype(np.int32, copy=False)
    return data.astype(np.float32, copy=False)


_MATRIX_FIX = "use the cell_feature_matrix.h5 written by Xenium Onboard Analysis (10x HDF5 format)"


@dataclass
class FeatureMatrixFile:
    """A 10x cell-feature matrix opened without reading its counts: barcodes, features and the
    row pointers, with `row_blocks` to stream the counts a block of cells at a time.

    Attributes:
        path: ``cell_feature_matrix.h5`` or a MEX folder.
        barcodes, feature_ids, feature_names, feature_types, genomes: as in `FeatureMatrix`.
        indptr: int64 (n_barcodes + 1,): row pointers (HDF5; None for MEX, see `mex`).
        n_nonzero: stored entries.
    """

    path: Path
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray
    genomes: np.ndarray
    indptr: np.ndarray | None
    n_nonzero: int
    mex: FeatureMatrix | None = None
    """A MEX folder's matrix, read whole once (MEX has no row pointers to stream by)."""

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.barcodes), len(self.feature_ids)

    @property
    def is_gene(self) -> np.ndarray:
        return self.feature_types == GENE_FEATURE_TYPE

    def row_blocks(self, max_nonzero: int = 1 << 22):
        """Yield (first_row, CSR (rows, n_features) with sorted indices) for consecutive blocks
        of rows holding about `max_nonzero` stored entries each (a MEX folder is read whole)."""
        if self.mex is not None:
            yield 0, self.mex.counts
            return
        import h5py

        n_features = self.shape[1]
        try:
            with h5py.File(self.path, "r") as h5:
                data, indices = h5["matrix/data"], h5["matrix/indices"]
                for row, stop in row_blocks_by_entries(self.indptr, max_nonzero):
                    lo, hi = int(self.indptr[row]), int(self.indptr[stop])
                    block_indices = indices[lo:hi].astype(np.int64)
                    if len(block_indices) and (block_indices.min() < 0 or block_indices.max() >= n_features):
                        raise BundleError("the feature matrix has feature indices out of range", path=self.path, fix=REPLACE_FIX)
                    block = sp.csr_matrix(
                        (_counts_dtype(data[lo:hi]), block_indices, self.indptr[row : stop + 1] - lo),
                        shape=(stop - row, n_features),
                    )
                    block.sort_indices()
                    yield row, block
        except BundleError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"cannot read the HDF5 feature matrix ({exc})", path=self.path, fix=REPLACE_FIX) from None

    def read(self) -> FeatureMatrix:
        """The whole matrix in memory."""
        if self.mex is not None:
            return self.mex
        blocks = [block for _, block in self.row_blocks()]
        counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(self.shape, dtype=np.int32)
        if counts.data.dtype.kind == "f":  # a block held values beyond int32: all float32
            counts.data = counts.data.astype(np.float32)
        index_dtype = np.int32 if max(self.shape[1], counts.nnz) < np.iinfo(np.int32).max else np.int64
        counts.indices = counts.indices.astype(index_dtype)
        counts.indptr = counts.indptr.astype(index_dtype)
        return FeatureMatrix(counts, self.barcodes, self.feature_ids, self.feature_names, self.feature_types, self.genomes)


def open_feature_matrix(path: Path) -> FeatureMatrixFile:
    """Open ``cell_feature_matrix.h5`` (10x HDF5) or a ``cell_feature_matrix/`` MEX folder:
    barcodes, features and row pointers are read and checked; the counts are not."""
    if path.is_dir():
        mex = _read_mex(path)
        return FeatureMatrixFile(path, mex.barcodes, mex.feature_ids, mex.feature_names, mex.feature_types, mex.genomes,
                                 None, int(mex.counts.nnz), mex)  # fmt: skip
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "matrix" not in h5:
                raise BundleError("not a 10x feature matrix: no 'matrix' group", path=path, fix=_MATRIX_FIX)
            group = h5["matrix"]
            needed = ["barcodes", "data", "indices", "indptr", "shape", "features/id", "features/name", "features/feature_type"]
            missing = [k for k in needed if k not in group]
            if missing:
                raise BundleError(f"not a 10x feature matrix: missing matrix/{missing}", path=path, fix=_MATRIX_FIX)
            n_features, n_cells = (int(v) for v in group["shape"][:2])
            n_data, n_indices = group["data"].shape[0], group["indices"].shape[0]
            indptr = group["indptr"][:].astype(np.int64)
            barcodes = ids_to_str(group["barcodes"][:], path=path)
            feature_ids = ids_to_str(group["features/id"][:], path=path)
            names = ids_to_str(group["features/name"][:], path=path)
            types = ids_to_str(group["features/feature_type"][:], path=path)
            genomes = (
                ids_to_str(group["features/genome"][:], path=path)
                if "features/genome" in group
                else np.array([""] * n_features, dtype=object)
            )
    except BundleError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"cannot read the HDF5 feature matrix ({exc})", path=path, fix=REPLACE_FIX) from None
    if not (
        len(indptr) == n_cells + 1
        and len(barcodes) == n_cells
        and len(feature_ids) == len(names) == len(types) == n_features
        and n_data == n_indices == (indptr[-1] if len(indptr) else 0)
        and (len(indptr) == 0 or indptr[0] == 0)
        and np.all(np.diff(indptr) >= 0)
    ):
        raise BundleError(
            "the feature matrix arrays are inconsistent (shape, barcodes, features, indptr, indices disagree)",
            path=path,
            fix=REPLACE_FIX,
        )
    # stored CSC (features x cells) == CSR (cells x features) with the same arrays
    return FeatureMatrixFile(path, barcodes, feature_ids, names, types, genomes, indptr, int(n_data))


def read_feature_matrix(path: Path) -> FeatureMatrix:
    """Read ``cell_feature_matrix.h5`` (10x HDF5) or a ``cell_feature_matrix/`` MEX folder."""
    return open_feature_matrix(path).read()


def _read_mex(folder: Path) -> FeatureMatrix:
    import scipy.io

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise BundleError(f"the MEX feature matrix folder lacks {stem}(.gz)", path=folder, fix=REPLACE_FIX)

    try:
        matrix = scipy.io.mmread(find("matrix.mtx"))
        barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None, dtype=str)[0].to_numpy(dtype=object)
        features = pd.read_csv(find("features.tsv"), sep="\t", header=None, dtype=str)
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
        raise BundleError(f"cannot read the MEX feature matrix ({exc})", path=folder, fix=REPLACE_FIX) from None
    counts = sp.csr_matrix(matrix.T)
    counts.data = _counts_dtype(counts.data)
    n_features = features.shape[0]
    if counts.shape != (len(barcodes), n_features) or features.shape[1] < 3:
        raise BundleError("the MEX matrix, barcodes and features disagree", path=folder, fix=REPLACE_FIX)
    genomes = features[3].to_numpy(dtype=object) if features.shape[1] > 3 else np.array([""] * n_features, dtype=object)
    return FeatureMatrix(
        counts,
        barcodes,
        features[0].to_numpy(dtype=object),
        features[1].to_numpy(dtype=object),
        features[2].to_numpy(dtype=object),
        genomes,
    )
