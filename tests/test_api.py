"""The notebook API: a cheap `import spatia` with lazy names, `spatia.tl.embed` writing obsm by
cell name, and the `spatia.pl` plots on small synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import spatia
from spatia.errors import InputDataError

HEAVY = ("torch", "lightning", "scanpy", "transformers")


def _modules_loaded_after(code: str) -> list[str]:
    """The HEAVY modules present in a fresh interpreter after running `code`."""
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_spatia_and_its_lazy_modules_do_not_import_torch_lightning_or_scanpy():
    assert _modules_loaded_after("import spatia") == []
    # resolving the names is cheap too: the heavy packages wait for the call
    assert _modules_loaded_after("import spatia\nspatia.tl, spatia.pl, spatia.stages, spatia.read_xenium, "
                                 "spatia.embed, spatia.tl.embed, spatia.pl.spatial_clusters") == []


def test_lazy_names_resolve_to_the_library_functions():
    import spatia.io.xenium
    import spatia.pl
    import spatia.stages
    import spatia.tl

    assert spatia.read_xenium is spatia.io.xenium.read_xenium
    assert spatia.stages is sys.modules["spatia.stages"]
    for name in ("simulate", "build", "pretrain", "embed", "pair"):
        assert getattr(spatia, name) is getattr(spatia.stages, name)
    assert callable(spatia.stages.evaluate)
    assert spatia.tl is sys.modules["spatia.tl"] and spatia.pl is sys.modules["spatia.pl"]
    assert {"read_xenium", "tl", "pl", "stages", "embed", "__version__"} <= set(dir(spatia))
    from importlib.metadata import version

    from spatia import __version__

    assert __version__ == spatia.__version__ == version("spatia")
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        spatia.not_a_name  # noqa: B018


# --- spatia.pl ---------------------------------------------------------------------------------


def _three_groups(n_per: int = 60, n_missing: int = 5, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Cells in three separated embedding groups laid out in three spatial bands; the last
    `n_missing` cells have NaN embeddings (not embedded)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), n_per)
    z = (np.eye(3)[groups] * 20 + rng.normal(size=(3 * n_per, 3))).astype(np.float32)
    z = np.hstack([z, rng.normal(size=(3 * n_per, 5)).astype(np.float32)])
    z[-n_missing:] = np.nan
    xy_um = np.column_stack([groups * 100.0 + rng.uniform(0, 80, 3 * n_per), rng.uniform(0, 300, 3 * n_per)])
    adata = ad.AnnData(np.zeros((3 * n_per, 2), dtype=np.float32),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(3 * n_per)]))
    adata.obsm["X_spatia"] = z
    adata.obsm["spatial"] = xy_um
    return adata, groups


def test_spatial_clusters_draws_each_leiden_cluster_at_its_cells_with_a_legend_and_labels():
    adata, _ = _three_groups()
    ax = spatia.pl.spatial_clusters(adata, basis="X_spatia", resolution=0.3)
    assert ax.get_xlabel() == "x (um)" and ax.get_ylabel() == "y (um)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "not embedded (5)"
    assert sorted(labels[1:]) == ["0 (60)", "1 (60)", "2 (55)"]  # the three groups, found exactly
    # every drawn point is a cell position; the clusters are spatially separated bands
    offsets = [collection.get_offsets() for collection in ax.collections]
    assert sum(len(o) for o in offsets) == adata.n_obs
    for o in offsets[1:]:
        assert np.ptp(np.floor(np.asarray(o)[:, 0] / 100)) == 0
    assert ax.yaxis_inverted()
    plt.close("all")


def test_spatial_clusters_refuses_a_missing_basis():
    adata, _ = _three_groups()
    with pytest.raises(InputDataError, match="no obsm\\['X_other'\\]"):
        spatia.pl.spatial_clusters(adata, basis="X_other")


def test_pairs_draws_one_segment_from_each_control_to_its_target():
    adata, _ = _three_groups()
    table = pd.DataFrame({"x_ctrl_id": ["c0", "c1", "c2", "c70"], "x_tgt_id": ["c100", "c101", "c102", "c171"],
                          "transition_tag": ["a_to_b", "a_to_b", "a_to_b", "b_to_c"]})
    _, ax = plt.subplots()
    assert spatia.pl.pairs(table, adata, ax=ax) is ax
    from matplotlib.collections import LineCollection

    segments = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert [len(c.get_segments()) for c in segments] == [3, 1]
    xy = adata.obsm["spatial"]
    np.testing.assert_allclose(segments[0].get_segments()[1], xy[[1, 101]])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "a_to_b (3 pairs)" in labels and "b_to_c (1 pairs)" in labels
    assert ax.get_xlabel() == "x (um)" and ax.get_ylabel() == "y (um)"

    ax_one = spatia.pl.pairs(table, adata, transition="b_to_c")
    assert [len(c.get_segments()) for c in ax_one.collections if isinstance(c, LineCollection)] == [1]
    with pytest.raises(InputDataError, match="no pairs of transition 'x'"):
        spatia.pl.pairs(table, adata, transition="x")
    with pytest.raises(InputDataError, match="none of the 4 pairs"):
        spatia.pl.pairs(table.assign(x_ctrl_id="elsewhere"), adata)
    plt.close("all")


def test_signature_genes_reads_a_pair_folder_and_bars_the_top_delta_g_genes(tmp_path):
    from spatia.perturb.signatures import Signatures

    genes = [f"G{i}" for i in range(8)]
    delta = np.array([[0.1, 2.0, -1.0, 0.5, 1.5, 0.0, -2.0, 0.3],
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    Signatures(transitions=["t1", "t2"], tasks=["task", "task"], genes=genes, delta=delta, mean_ctrl=np.zeros_like(delta),
               mean_tgt=delta, n_pairs=np.array([40, 7])).write(tmp_path)

    ax = spatia.pl.signature_genes(tmp_path, "t1", n=3)
    bars = sorted(ax.patches, key=lambda p: -p.get_y())  # top to bottom
    assert [round(p.get_width(), 6) for p in bars] == [2.0, 1.5, 0.5]
    assert [t.get_text() for t in sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])] == ["G1", "G4", "G3"]
    assert "Delta g" in ax.get_xlabel() and ax.get_ylabel() == "gene"
    assert "40 pairs" in ax.get_title()

    down = spatia.pl.signature_genes(tmp_path / "signatures.npz", "t1", n=2, direction="down")
    assert sorted(round(p.get_width(), 6) for p in down.patches) == [-2.0, -1.0]
    with pytest.raises(InputDataError, match="2 transitions"):
        spatia.pl.signature_genes(tmp_path)
    plt.close("all")


# --- spatia.tl.embed ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_dataset(simulated_mist, simulated_checkpoint) -> ad.AnnData:
    return spatia.tl.embed(simulated_mist, simulated_checkpoint, progress_bar=False)


def test_embed_of_a_dataset_returns_every_cell_with_the_checkpoints_levels(embedded_dataset, simulated_mist):
    from spatia.mist.store import index_path

    n_cells = len(pd.read_parquet(index_path(simulated_mist, "cell"), columns=["cell_id"]))
    adata = embedded_dataset  # every cell of the bundle; those the build skipped flagged, NaN rows
    embedded = adata.obs["spatia_embedded"].to_numpy()
    assert embedded.sum() == n_cells and adata.n_obs >= n_cells
    assert {"X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue", "spatial"} <= set(adata.obsm)
    assert adata.obsm["X_spatia"].dtype == np.float32 and np.isfinite(adata.obsm["X_spatia"][embedded]).all()
    assert np.isnan(adata.obsm["X_spatia"][~embedded]).all()
    assert adata.uns["X_spatia"]["n_embedded"] == n_cells


def test_embed_writes_obsm_rows_by_cell_name_and_nan_for_cells_the_dataset_lacks(
        embedded_dataset, simulated_bundle, simulated_mist, simulated_checkpoint):
    adata = spatia.read_xenium(simulated_bundle).to_anndata()
    rng = np.random.default_rng(0)
    adata = adata[rng.permutation(adata.n_obs)].copy()  # another order than the dataset's
    names = adata.obs_names.to_numpy().astype(object)
    names[:7] = [f"ghost{i}" for i in range(7)]  # cells the dataset does not have
    adata.obs_names = names
    before = adata.copy()

    copied = spatia.tl.embed(adata, simulated_checkpoint, dataset=simulated_mist, copy=True, progress_bar=False)
    assert "X_spatia" not in adata.obsm and "spatia_embedded" not in adata.obs  # the input is untouched
    assert spatia.tl.embed(adata, simulated_checkpoint, dataset=simulated_mist, progress_bar=False) is None

    reference = embedded_dataset
    reference = reference[reference.obs["spatia_embedded"].to_numpy()]
    known = adata.obs_names.isin(reference.obs_names)
    assert (~known).sum() >= 7
    for result in (copied, adata):
        assert (result.obs_names == before.obs_names).all()
        np.testing.assert_array_equal(result.obs["spatia_embedded"].to_numpy(), known)
        for key in ("X_spatia", "X_spatia_cell", "X_spatia_niche", "X_spatia_tissue"):
            values = result.obsm[key]
            assert values.shape == (adata.n_obs, reference.obsm[key].shape[1])
            np.testing.assert_allclose(values[known], reference[adata.obs_names[known]].obsm[key], rtol=1e-5, atol=1e-6)
            assert np.isnan(values[~known]).all()
        assert result.uns["X_spatia"]["n_embedded"] == int(known.sum())
    # the counts and spatial coordinates the reader gave are kept
    np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])


def test_embed_refuses_an_anndata_of_other_cells_before_embedding(simulated_mist, simulated_checkpoint):
    other = ad.AnnData(np.zeros((10, 2), dtype=np.float32), obs=pd.DataFrame(index=[f"x{i}" for i in range(10)]))
    with pytest.raises(InputDataError, match="only 0 of the AnnData's 10 cells"):
        spatia.tl.embed(other, simulated_checkpoint, dataset=simulated_mist, progress_bar=False)
    with pytest.raises(InputDataError, match="pass dataset="):
        spatia.tl.embed(other, simulated_checkpoint, progress_bar=False)


def test_concatenate_levels_matches_the_evaluations_concatenation_and_keeps_nan_rows():
    """`spatia.tl.concatenate_levels` gives the representation `spatia evaluate` scores as
    "cell+niche": each block centred and scaled to unit total variance over the embedded cells;
    a cell without an embedding stays NaN; bad level lists and missing levels are refused."""
    from spatia.errors import ConfigError
    from spatia.evaluate.baselines import concatenate_blocks

    rng = np.random.default_rng(0)
    adata = ad.AnnData(np.zeros((50, 3), dtype=np.float32))
    cell, niche = rng.normal(0, 5, size=(50, 8)), rng.normal(3, 0.1, size=(50, 4))
    cell[7] = np.nan  # a cell the dataset skipped
    adata.obsm["X_spatia_cell"], adata.obsm["X_spatia_niche"] = cell, niche

    spatia.tl.concatenate_levels(adata, "cell+niche")
    both = adata.obsm["X_spatia_cell+niche"]
    assert both.shape == (50, 12) and both.dtype == np.float32
    assert np.isnan(both[7]).all() and np.isfinite(np.delete(both, 7, axis=0)).all()
    kept = np.delete(np.arange(50), 7)
    np.testing.assert_allclose(both[kept], concatenate_blocks(cell[kept], niche[kept]), rtol=1e-6)
    # each block carries unit total variance, whatever its scale (5 vs 0.1 here)
    for block in (both[kept, :8], both[kept, 8:]):
        np.testing.assert_allclose((block.astype(np.float64) ** 2).sum() / len(kept), 1.0, rtol=1e-5)

    copied = spatia.tl.concatenate_levels(adata, "cell+niche", copy=True)
    np.testing.assert_array_equal(copied.obsm["X_spatia_cell+niche"], both)
    for bad in ("cell", "cell+cell", "cell+nucleus"):
        with pytest.raises(ConfigError, match="levels"):
            spatia.tl.concatenate_levels(adata, bad)
    with pytest.raises(InputDataError, match="X_spatia_tissue"):
        spatia.tl.concatenate_levels(adata, "cell+niche+tissue")
