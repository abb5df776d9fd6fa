"""Staging a slide's tables on disk for a build: counts, polygons and ground truth read back
a block of cells at a time must equal the tables read whole."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatia.io.matrix import open_feature_matrix, read_feature_matrix
from spatia.io.polygons import CellPolygons
from spatia.mist.staging import stage_ground_truth, stage_slide


@pytest.mark.real_data
def test_feature_matrix_streamed_in_blocks_equals_the_matrix_read_whole(real_bundle):
    path = real_bundle / "cell_feature_matrix.h5"
    whole = read_feature_matrix(path).counts
    opened = open_feature_matrix(path)
    assert opened.shape == whole.shape and opened.n_nonzero == whole.nnz
    blocks = list(opened.row_blocks(max_nonzero=5_000))
    assert len(blocks) > 10 and [first for first, _ in blocks] == sorted(first for first, _ in blocks)
    assert blocks[0][0] == 0 and sum(b.shape[0] for _, b in blocks) == whole.shape[0]
    assert (sp.vstack([b for _, b in blocks]).tocsr() != whole).nnz == 0


def test_staged_counts_and_polygons_read_back_by_cell(tmp_path):
    """Counts in vocabulary columns (a symbol measured twice summed, zeros dropped), read back
    for cells in any order; polygons likewise."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, size=(50, 4)).astype(np.int32)
    dense[7] = 0
    genes = ["B", "A", "B", "C"]  # B measured twice
    vocabulary = {"A": 0, "B": 1, "C": 2, "D": 3}  # D: another slide's gene
    n_vertices = rng.integers(3, 9, size=50)
    n_vertices[3] = 0
    offsets = np.concatenate([[0], np.cumsum(n_vertices)])
    vertices = rng.normal(size=(offsets[-1], 2))
    slide = SimpleNamespace(
        cells=pd.DataFrame(index=pd.Index([f"c{i}" for i in range(50)])),
        counts=sp.csr_matrix(dense),
        gene_names=genes,
        cell_boundaries=CellPolygons(offsets, vertices),
        path=None,
    )
    staged = stage_slide(slide, vocabulary, tmp_path / "stage")
    expected = np.zeros((50, 4), dtype=np.int64)
    expected[:, 0] = dense[:, 1]
    expected[:, 1] = dense[:, 0] + dense[:, 2]
    expected[:, 2] = dense[:, 3]
    cells = rng.permutation(50)
    indptr, indices, values = staged.counts.rows(cells)
    got = sp.csr_matrix((values, indices, indptr), shape=(50, 4)).toarray()
    np.testing.assert_array_equal(got, expected[cells])
    assert indices.dtype == values.dtype == np.uint32
    assert all(np.all(np.diff(indices[a:b]) > 0) for a, b in zip(indptr[:-1], indptr[1:]))  # ascending, no zeros
    assert np.all(values > 0)
    np.testing.assert_array_equal(staged.counts.total, expected.sum(axis=1))
    np.testing.assert_array_equal(staged.counts.n_detected, (expected > 0).sum(axis=1))
    got_offsets, got_vertices = staged.polygons.rows(cells)
    subset = slide.cell_boundaries.subset(cells)
    np.testing.assert_array_equal(got_offsets, subset.offsets)
    np.testing.assert_array_equal(got_vertices, subset.vertices_um)


def test_staged_ground_truth_aligns_rows_by_cell_id(tmp_path, monkeypatch):
    """Rows out of order, a cell listed twice (first row wins), a cell without a row and a row
    of an unknown cell; numbers, booleans and text; read back in batches of 2 rows."""
    from spatia.mist import staging

    monkeypatch.setattr(staging, "TRUTH_BATCH_ROWS", 2)
    table = pd.DataFrame(
        {
            "cell_id": ["c2", "ghost", "c0", "c2", "c3"],
            "size": [2.5, 9.0, 0.5, 7.0, 3.5],
            "cluster": [2, 9, 0, 7, 3],
            "is_target": [True, False, False, False, True],
            "cell_type": ["t", "x", "b", None, "t"],
        }
    )
    table.to_parquet(tmp_path / "truth.parquet")
    cell_ids = pd.Index(["c0", "c1", "c2", "c3"], dtype=object)
    (tmp_path / "stage").mkdir()
    truth = stage_ground_truth(tmp_path / "truth.parquet", cell_ids, tmp_path / "stage")
    np.testing.assert_array_equal(truth.has_row, [True, False, True, True])
    exact = truth.rows(np.array([3, 0, 2]), as_float=False)
    np.testing.assert_array_equal(exact["size"], [3.5, 0.5, 2.5])
    assert exact["cluster"].dtype == np.int64 and exact["cluster"].tolist() == [3, 0, 2]
    assert exact["is_target"].dtype == np.bool_ and exact["is_target"].tolist() == [True, False, True]
    assert exact["cell_type"].tolist() == ["t", "b", "t"]
    with_missing = truth.rows(np.array([1, 2]), as_float=True)
    assert np.isnan(with_missing["cluster"][0]) and with_missing["cluster"][1] == 2.0
    assert np.isnan(with_missing["is_target"][0]) and with_missing["is_target"][1] == 1.0
    assert with_missing["cell_type"].tolist() == [None, "t"]


def test_a_mex_matrix_folder_reads_and_builds_like_the_hdf5_matrix(simulated_bundle, tmp_path):
    """The 10x MEX layout (matrix.mtx.gz features x cells, barcodes.tsv.gz, features.tsv.gz)
    gives the HDF5 file's matrix, whole or through `row_blocks`, and the same staged counts."""
    import gzip

    import scipy.io

    from helpers import copy_bundle
    from spatia.io.xenium import read_xenium

    h5 = read_feature_matrix(simulated_bundle / "cell_feature_matrix.h5")
    bundle = copy_bundle(simulated_bundle, tmp_path / "mex_bundle", skip=("cell_feature_matrix.h5",))
    folder = bundle / "cell_feature_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, h5.counts.T.tocoo())
    pd.Series(h5.barcodes).to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    features = pd.DataFrame({"id": h5.feature_ids, "name": h5.feature_names, "type": h5.feature_types})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)

    mex = read_feature_matrix(folder)
    assert (mex.counts != h5.counts).nnz == 0
    assert list(mex.barcodes) == list(h5.barcodes) and list(mex.feature_names) == list(h5.feature_names)
    blocks = list(open_feature_matrix(folder).row_blocks())
    assert len(blocks) == 1 and (blocks[0][1] != h5.counts).nnz == 0

    vocabulary = {g: i for i, g in enumerate(sorted(set(read_xenium(simulated_bundle).gene_names)))}
    from_mex = stage_slide(read_xenium(bundle, in_memory=False), vocabulary, tmp_path / "stage_mex")
    from_h5 = stage_slide(read_xenium(simulated_bundle, in_memory=False), vocabulary, tmp_path / "stage_h5")
    cells = np.arange(len(from_h5.counts.total))
    for a, b in zip(from_mex.counts.rows(cells), from_h5.counts.rows(cells)):
        np.testing.assert_array_equal(a, b)


def test_a_slide_read_without_its_tables_points_at_them_and_refuses_what_needs_them(simulated_bundle):
    from spatia.errors import ConfigError
    from spatia.io.xenium import read_xenium

    whole = read_xenium(simulated_bundle)
    slide = read_xenium(simulated_bundle, in_memory=False)
    assert slide.counts is None and slide.control_counts is None and slide.cell_boundaries is None
    assert slide.deferred.cell_boundaries == simulated_bundle / "cell_boundaries.parquet"
    assert slide.cells.index.equals(whole.cells.index) and slide.gene_names == whole.gene_names
    matrix = slide.deferred.matrix.read().counts[slide.deferred.matrix_rows][:, np.flatnonzero(slide.deferred.matrix.is_gene)]
    assert (matrix != whole.counts).nnz == 0
    with pytest.raises(ConfigError, match="in_memory=False"):
        slide.to_anndata()


def test_misaligned_or_impossible_tables_are_refused_with_the_reason(tmp_path):
    from spatia.errors import InputDataError

    def slide(counts, polygons=None):
        return SimpleNamespace(cells=pd.DataFrame(index=pd.Index(["a", "b", "c"])), counts=sp.csr_matrix(counts),
                               gene_names=["G0", "G1"], cell_boundaries=polygons, path=tmp_path / "bundle")  # fmt: skip

    vocabulary = {"G0": 0, "G1": 1}
    with pytest.raises(InputDataError, match="2 rows for 3 cells"):
        stage_slide(slide(np.ones((2, 2), dtype=np.int32)), vocabulary, tmp_path / "s1")
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    two_polygons = CellPolygons(np.array([0, 4, 8]), np.concatenate([square, square]))
    with pytest.raises(InputDataError, match="3 cells but 2 cell polygons"):
        stage_slide(slide(np.ones((3, 2), dtype=np.int32), two_polygons), vocabulary, tmp_path / "s2")
    with pytest.raises(InputDataError, match="negative"):
        stage_slide(slide(np.array([[1, -2], [0, 1], [3, 0]], dtype=np.int32)), vocabulary, tmp_path / "s3")
    with pytest.raises(InputDataError, match="above 2\\^32"):
        stage_slide(slide(np.array([[1, 2**33], [0, 1], [3, 0]], dtype=np.int64)), vocabulary, tmp_path / "s4")
