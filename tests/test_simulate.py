"""The ground-truth tissue simulator: determinism, truth consistent with the files, designed
effects measurable in counts and pixels, Xenium formats identical to the real bundle's."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import shapely
import tifffile
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from spatia.cli import app
from spatia.errors import ConfigError, OutputExistsError
from spatia.sim import (
    GROUND_TRUTH_JSON,
    GROUND_TRUTH_TABLE,
    MorphologyShift,
    SimulationConfig,
    StateSpec,
    TransitionSpec,
    default_states,
    default_transitions,
    simulate_bundle,
)
from spatia.sim.config import resolve_states
from spatia.sim.tissue import greedy_packing, nucleus_radius
from spatia.sim.writer import (
    CLUSTERS_RELPATH,
    FEATURE_GENE,
    XeniumBundle,
    boundaries_frame,
    downsample_2x,
    write_xenium_bundle,
    xenium_cell_ids,
)
from spatia.outputs import RUN_RECORD_NAME

SMALL = SimulationConfig(n_cells=300)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def read_counts(path: Path) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """(cells x features CSR, barcodes, feature names, feature types) of a 10x HDF5 file."""
    with h5py.File(path) as h5:
        m = h5["matrix"]
        shape = tuple(m["shape"][:])
        csc = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
        decode = lambda key: [x.decode() for x in m[key][:]]  # noqa: E731
        return csc.T.tocsr(), decode("barcodes"), decode("features/name"), decode("features/feature_type")


def polygons(frame: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """cell IDs (file order) and shapely polygons of a long boundary table."""
    ids = frame["cell_id"].drop_duplicates().tolist()
    rings = frame.groupby("cell_id", sort=False)[["vertex_x", "vertex_y"]].apply(lambda g: g.to_numpy())
    return ids, shapely.polygons([rings[i] for i in ids])


def measure_nuclei(image: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, reach_px: np.ndarray) -> pd.DataFrame:
    """CellProfiler-like measurements of each nucleus from the image alone (given its centre).

    Pixels within `reach_px` of the centre above half of the nucleus's typical brightness (the
    median of its bright pixels, over background) form the nucleus: area (px), elongation (sqrt of the covariance
    eigenvalue ratio), mean intensity, and texture (coefficient of variation in its inner 60%).
    """
    n, half = len(x_px), int(np.ceil(reach_px.max())) + 2
    off = np.arange(2 * half) - half
    cols = np.floor(x_px).astype(int)[:, None] + off
    rows = np.floor(y_px).astype(int)[:, None] + off
    valid = ((rows >= 0) & (rows < image.shape[0]))[:, :, None] & ((cols >= 0) & (cols < image.shape[1]))[:, None, :]
    dx = (cols + 0.5 - x_px[:, None])[:, None, :]
    dy = (rows + 0.5 - y_px[:, None])[:, :, None]
    inside = (dx**2 + dy**2 <= reach_px[:, None, None] ** 2) & valid
    val = image[np.clip(rows, 0, image.shape[0] - 1)[:, :, None], np.clip(cols, 0, image.shape[1] - 1)[:, None, :]]
    val = val.astype(float)
    background = np.median(image[image < np.percentile(image, 50)])
    peak = np.nanpercentile(np.where(inside, val, np.nan).reshape(n, -1), 90, axis=1)
    rough = inside & (val > (background + 0.3 * (peak - background))[:, None, None])
    level = np.nanmedian(np.where(rough, val, np.nan).reshape(n, -1), axis=1)  # robust to bright spots
    fg = inside & (val > (background + 0.5 * (level - background))[:, None, None])
    count = fg.sum(axis=(1, 2))
    mx, my = (fg * dx).sum(axis=(1, 2)) / count, (fg * dy).sum(axis=(1, 2)) / count
    ex, ey = dx - mx[:, None, None], dy - my[:, None, None]
    cxx, cyy = (fg * ex**2).sum(axis=(1, 2)) / count, (fg * ey**2).sum(axis=(1, 2)) / count
    cxy = (fg * ex * ey).sum(axis=(1, 2)) / count
    disc = np.sqrt(np.maximum((cxx - cyy) ** 2 / 4 + cxy**2, 0))
    major, minor = (cxx + cyy) / 2 + disc, np.maximum((cxx + cyy) / 2 - disc, 1e-9)
    inner = fg & (ex**2 + ey**2 <= (0.6 * np.sqrt(count / np.pi))[:, None, None] ** 2)
    inner_mean = (inner * val).sum(axis=(1, 2)) / inner.sum(axis=(1, 2))
    inner_sd = np.sqrt((inner * (val - inner_mean[:, None, None]) ** 2).sum(axis=(1, 2)) / inner.sum(axis=(1, 2)))
    return pd.DataFrame({
        "area_px": count,
        "elongation": np.sqrt(major / minor),
        "intensity": (fg * val).sum(axis=(1, 2)) / count,
        "texture": inner_sd / inner_mean,
    })


@pytest.fixture(scope="module")
def truth(simulated_bundle) -> pd.DataFrame:
    return pd.read_parquet(simulated_bundle / GROUND_TRUTH_TABLE)


@pytest.fixture(scope="module")
def world(simulated_bundle) -> dict:
    return json.loads((simulated_bundle / GROUND_TRUTH_JSON).read_text())


@pytest.fixture(scope="module")
def measured(simulated_bundle, truth, world) -> pd.DataFrame:
    """Ground truth joined with measurements from the rendered DAPI image (cells away from edges)."""
    image = tifffile.imread(simulated_bundle / "morphology_focus.ome.tif")
    ps = world["image"]["pixel_size_um"]
    reach = truth["nucleus_bounding_radius_um"].to_numpy() / ps
    table = pd.concat([truth, measure_nuclei(image, truth["x_px"].to_numpy(), truth["y_px"].to_numpy(), reach)], axis=1)
    margin = 40
    away = (
        (table.x_px > margin) & (table.y_px > margin)
        & (table.x_px < image.shape[1] - margin) & (table.y_px < image.shape[0] - margin)
    )
    return table[away]


# ---------------------------------------------------------------------------------------------
# determinism and atomic output
# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = simulate_bundle(tmp_path / "a", SMALL, seed=7)
    b = simulate_bundle(tmp_path / "b", SMALL, seed=7)
    c = simulate_bundle(tmp_path / "c", SMALL, seed=8)
    assert a.files == b.files == c.files
    for name in a.files:
        if name == RUN_RECORD_NAME:
            continue
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    record_a = json.loads((a.path / RUN_RECORD_NAME).read_text())
    assert record_a["seed"] == 7 and record_a["command"] == "simulate" and record_a["config"]["n_cells"] == 300
    assert record_a["config"] == json.loads((b.path / RUN_RECORD_NAME).read_text())["config"]

    cells_a, cells_c = pd.read_parquet(a.path / "cells.parquet"), pd.read_parquet(c.path / "cells.parquet")
    assert len(cells_a) == len(cells_c) == 300
    assert not np.allclose(cells_a["x_centroid"], cells_c["x_centroid"])
    image_a = tifffile.imread(a.path / "morphology_focus.ome.tif")
    image_c = tifffile.imread(c.path / "morphology_focus.ome.tif")
    assert image_a.shape == image_c.shape and not np.array_equal(image_a, image_c)
    counts_a = read_counts(a.path / "cell_feature_matrix.h5")[0]
    counts_c = read_counts(c.path / "cell_feature_matrix.h5")[0]
    assert counts_a.shape == counts_c.shape and (counts_a != counts_c).nnz > 0

    with pytest.raises(OutputExistsError):
        simulate_bundle(a.path, SMALL, seed=7)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# ---------------------------------------------------------------------------------------------
# ground truth consistent with the files
# ---------------------------------------------------------------------------------------------

def test_cell_ids_and_centroids_agree_across_all_tables(simulated_bundle, truth):
    cells = pd.read_parquet(simulated_bundle / "cells.parquet")
    ids = cells["cell_id"].tolist()
    assert len(ids) == 3000 and len(set(ids)) == 3000
    assert truth["state"].nunique() == 14 and truth["state"].value_counts().min() >= 150  # enough for OT pairing
    assert all(re.fullmatch(r"[a-p]{8}-1", i) for i in ids) and ids == sorted(ids)
    assert truth["cell_id"].tolist() == ids
    np.testing.assert_array_equal(truth["x_um"].to_numpy(), cells["x_centroid"].to_numpy())
    np.testing.assert_array_equal(truth["y_um"].to_numpy(), cells["y_centroid"].to_numpy())
    np.testing.assert_allclose(truth["x_px"] * 0.2125, truth["x_um"], rtol=1e-12)

    counts, barcodes, _, types = read_counts(simulated_bundle / "cell_feature_matrix.h5")
    assert barcodes == ids
    types = np.array(types)
    np.testing.assert_array_equal(np.asarray(counts[:, types == FEATURE_GENE].sum(axis=1)).ravel(),
                                  cells["transcript_counts"])
    np.testing.assert_array_equal(np.asarray(counts.sum(axis=1)).ravel(), cells["total_counts"])
    np.testing.assert_array_equal(truth["transcript_counts"], cells["transcript_counts"])

    for name in ("cell_boundaries.parquet", "nucleus_boundaries.parquet"):
        assert pd.read_parquet(simulated_bundle / name)["cell_id"].drop_duplicates().tolist() == ids
    clusters = pd.read_csv(simulated_bundle / CLUSTERS_RELPATH)
    assert list(clusters.columns) == ["Barcode", "Cluster"]
    assert set(clusters["Barcode"]) < set(ids) and 0.9 < len(clusters) / len(ids) < 1.0
    # clusters follow the true cell type, with some label noise, like a real clustering
    merged = clusters.merge(truth[["cell_id", "cell_type", "cluster"]], left_on="Barcode", right_on="cell_id")
    assert (merged["Cluster"] == merged["cluster"]).all()
    majority = merged.groupby("cell_type")["Cluster"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    assert majority.min() > 0.85 and (merged.groupby("cell_type")["Cluster"].nunique() > 1).any()
    assert merged.groupby("cell_type")["Cluster"].agg(lambda s: s.mode().iloc[0]).is_unique


def test_polygons_closed_nucleus_inside_cell_and_cells_disjoint(simulated_bundle, truth):
    cell_frame = pd.read_parquet(simulated_bundle / "cell_boundaries.parquet")
    nucleus_frame = pd.read_parquet(simulated_bundle / "nucleus_boundaries.parquet")
    for frame in (cell_frame, nucleus_frame):
        grouped = frame.groupby("cell_id", sort=False)
        first, last = grouped.first(), grouped.last()
        assert (first[["vertex_x", "vertex_y"]].to_numpy() == last[["vertex_x", "vertex_y"]].to_numpy()).all()
    ids, cell_polys = polygons(cell_frame)
    _, nucleus_polys = polygons(nucleus_frame)
    assert shapely.is_valid(cell_polys).all() and shapely.is_valid(nucleus_polys).all()
    assert shapely.covers(cell_polys, nucleus_polys).all()
    cells = pd.read_parquet(simulated_bundle / "cells.parquet")
    np.testing.assert_allclose(shapely.area(cell_polys), cells["cell_area"], rtol=1e-4)
    np.testing.assert_allclose(shapely.area(nucleus_polys), cells["nucleus_area"], rtol=1e-4)
    # nucleus polygon area close to the rendered shape's area (the polygon cuts corners)
    ratio = cells["nucleus_area"] / truth["nucleus_area_um2"]
    assert ratio.between(0.9, 1.0 + 1e-6).all()
    # cells never overlap: pairs of intersecting polygons share at most a sliver
    tree = shapely.STRtree(cell_polys)
    left, right = tree.query(cell_polys, predicate="intersects")
    pairs = left < right
    overlap = shapely.area(shapely.intersection(cell_polys[left[pairs]], cell_polys[right[pairs]]))
    assert overlap.max(initial=0.0) < 1e-3
    # the centroid in cells.parquet is the nucleus centre, inside both polygons
    centres = shapely.points(cells["x_centroid"], cells["y_centroid"])
    assert shapely.contains(nucleus_polys, centres).all()
    # cells grow from their nuclei by up to the expansion distance
    grown = np.sqrt(cells["cell_area"] / np.pi) - np.sqrt(cells["nucleus_area"] / np.pi)
    assert grown.max() <= 3.0 + 1e-6 and grown.median() > 1.0


def test_recorded_nucleus_parameters_reproduce_the_shape_and_circles_never_overlap(truth):
    """The ground-truth shape parameters rebuild each nucleus: inside its bounding circle, with
    the recorded area; bounding circles of different nuclei never overlap (packing gap 0.3 um)."""
    theta = np.linspace(0.0, 2 * np.pi, 1024, endpoint=False)[None, :]
    amp = truth[[f"nucleus_harmonic_amp_{k}" for k in range(2, 6)]].to_numpy()[:, None, :]
    phase = truth[[f"nucleus_harmonic_phase_{k}" for k in range(2, 6)]].to_numpy()[:, None, :]
    r = nucleus_radius(theta, truth["nucleus_radius_um"].to_numpy()[:, None],
                       truth["nucleus_elongation"].to_numpy()[:, None],
                       truth["nucleus_orientation_rad"].to_numpy()[:, None], amp, phase)
    bounding = truth["nucleus_bounding_radius_um"].to_numpy()
    assert (r.max(axis=1) + 0.5 * 0.2125 <= bounding).all()
    np.testing.assert_allclose(0.5 * np.mean(r**2, axis=1) * 2 * np.pi, truth["nucleus_area_um2"], rtol=1e-3)
    np.testing.assert_allclose(truth["nucleus_semi_major_um"] * truth["nucleus_semi_minor_um"],
                               truth["nucleus_radius_um"] ** 2)
    xy = truth[["x_um", "y_um"]].to_numpy()
    i, j = cKDTree(xy).query_pairs(2 * bounding.max() + 0.3, output_type="ndarray").T
    assert (np.hypot(*(xy[i] - xy[j]).T) >= bounding[i] + bounding[j] + 0.3 - 1e-9).all()


def test_de_genes_follow_the_designed_fold_changes(simulated_bundle, truth, world):
    counts, _, names, _ = read_counts(simulated_bundle / "cell_feature_matrix.h5")
    column = {name: j for j, name in enumerate(names)}
    per_unit = sp.diags(1.0 / truth["size_factor"].to_numpy()) @ counts  # counts per unit library
    errors, well_measured = [], []
    for transition in world["transitions"]:
        control = (truth["state"] == transition["control"]).to_numpy()
        target = (truth["state"] == transition["target"]).to_numpy()
        assert control.sum() >= 50 and target.sum() >= 50  # the paper's theta_min
        assert transition["n_control"] == control.sum() and transition["n_target"] == target.sum()
        for gene in transition["de_genes"]:
            j = column[gene["gene"]]
            observed = np.log2(per_unit[target, j].mean() / per_unit[control, j].mean())
            assert np.sign(observed) == np.sign(gene["log2_fold_change"]), (transition["name"], gene)
            errors.append(observed - gene["log2_fold_change"])
            well_measured.append(min(counts[control, j].sum(), counts[target, j].sum()) >= 40)
    errors = np.abs(np.array(errors))
    assert errors.mean() < 0.3 and errors[np.array(well_measured)].max() < 0.75
    # genes outside the DE set do not change between control and target (per unit library)
    emt = world["transitions"][0]
    de = {g["gene"] for g in emt["de_genes"]}
    control = (truth["state"] == emt["control"]).to_numpy()
    target = (truth["state"] == emt["target"]).to_numpy()
    lineage_genes = [g for g in world["gene_programs"]["lineage"]["epithelial"] if g not in de]
    for gene in lineage_genes:
        j = column[gene]
        assert abs(np.log2(per_unit[target, j].mean() / per_unit[control, j].mean())) < 0.45, gene


def test_library_size_follows_cell_size_and_controls_are_sparse(simulated_bundle, truth):
    cells = pd.read_parquet(simulated_bundle / "cells.parquet")
    assert 90 < cells["transcript_counts"].mean() < 110
    np.testing.assert_allclose(truth["size_factor"] / truth["cell_area_um2"],
                               (truth["size_factor"] / truth["cell_area_um2"]).iloc[0])
    assert np.corrcoef(truth["expected_transcripts"], cells["transcript_counts"])[0, 1] > 0.8
    controls = cells["total_counts"] - cells["transcript_counts"]
    assert 0 < controls.sum() < 0.05 * len(cells) + 20 and cells["control_probe_counts"].sum() <= controls.sum()


def test_rendered_nuclei_match_their_recorded_parameters(measured):
    ps2 = 0.2125**2
    assert np.corrcoef(measured["area_px"] * ps2, measured["nucleus_area_um2"])[0, 1] > 0.9
    assert np.corrcoef(measured["elongation"], measured["nucleus_elongation"])[0, 1] > 0.9
    assert np.corrcoef(measured["intensity"], measured["nucleus_intensity"])[0, 1] > 0.8
    assert abs(np.median(measured["area_px"] * ps2 / measured["nucleus_area_um2"]) - 1) < 0.2


def test_target_morphology_shifts_in_the_designed_direction(measured, world):
    """Within a domain both states share, each designed change of 20% or more (at the targets'
    mean niche-dependent strength there) shows up in the image, in its direction (the paper pairs
    control and target cells of similar niches)."""
    checked = 0
    for transition in world["transitions"]:
        shift = transition["morphology_shift"]
        expected = {
            "area_px": shift["radius_scale"] ** 2,
            "elongation": shift["elongation_scale"],
            "intensity": shift["intensity_scale"],
            "texture": shift["texture_scale"] * max(shift["spots_scale"], 1.0) ** 0.5,
        }
        in_state = measured[measured["state"].isin([transition["control"], transition["target"]])]
        sizes = in_state.groupby(["domain", "state"]).size().unstack(fill_value=0)
        domain = (sizes[[transition["control"], transition["target"]]].min(axis=1)).idxmax()
        control = in_state[(in_state["domain"] == domain) & (in_state["state"] == transition["control"])]
        target = in_state[(in_state["domain"] == domain) & (in_state["state"] == transition["target"])]
        assert len(control) >= 25 and len(target) >= 25, (transition["name"], domain)
        strength = target["morphology_shift_strength"].mean()  # niche-dependent: scale ** s per cell
        for feature, scale in expected.items():
            scale = scale**strength
            if abs(np.log(scale)) < np.log(1.2):
                continue
            ratio = target[feature].median() / control[feature].median()
            assert np.sign(np.log(ratio)) == np.sign(np.log(scale)), (transition["name"], feature, ratio, scale)
            assert abs(np.log(ratio)) > 0.03, (transition["name"], feature, ratio)
            checked += 1
    assert checked >= 10


def test_target_morphology_depends_on_the_niche(measured, truth, world):
    """The niche-dependent part of each shift: recorded strengths follow s(q) of ground_truth.json,
    the recorded share q matches the domains of the cells around each target, and in the image,
    targets with a strong shift differ from those with a weak one in the designed direction."""
    from scipy.spatial import cKDTree

    tree = cKDTree(truth[["x_um", "y_um"]].to_numpy())
    for t in world["transitions"]:
        rows = truth[truth["state"] == t["target"]]
        nd = t["niche_dependence"]
        expected = nd["base_strength"] + (nd["niche_strength"] - nd["base_strength"]) * rows["niche_share"]
        np.testing.assert_allclose(rows["morphology_shift_strength"], expected)
        # q is measured on the domain grid; the share of neighbouring cells in that domain agrees
        near = tree.query_ball_point(rows[["x_um", "y_um"]].to_numpy(), nd["niche_radius_um"])
        in_domain = (truth["domain"] == nd["niche_domain"]).to_numpy()
        cell_share = np.array([in_domain[n].mean() for n in near])
        assert np.corrcoef(cell_share, rows["niche_share"])[0, 1] > 0.8, t["name"]
    assert (truth.loc[~truth["is_transition_target"], "morphology_shift_strength"] == 0).all()
    by_name = {t["name"]: t for t in world["transitions"]}
    for name, feature in (("EMT_transition", "elongation"), ("T_cell_activation", "area_px"),
                          ("proliferation_activation", "area_px")):
        t = by_name[name]
        target = measured[measured["state"] == t["target"]]
        strength = target["morphology_shift_strength"].to_numpy()
        strong, weak = target[strength > np.median(strength)], target[strength <= np.median(strength)]
        assert min(len(strong), len(weak)) >= 20, name
        scale = t["morphology_shift"]["elongation_scale" if feature == "elongation" else "radius_scale"]
        ratio = strong[feature].median() / weak[feature].median()
        assert np.sign(np.log(ratio)) == np.sign(np.log(scale)) and abs(np.log(ratio)) > 0.03, (name, feature, ratio)


def test_niche_state_splits_each_target_state_by_its_niche_not_by_its_own_domain(truth, world):
    """`niche_state` is the target state plus which side of NICHE_STATE_SHARE its niche share
    lies, None for cells in no target state; both halves occur among cells of one own domain, and
    within it the cell's own expression (which follows its own domain) cannot tell them apart."""
    from spatia.sim.bundle import NICHE_STATE_SHARE

    labelled = truth["niche_state"].notna()
    np.testing.assert_array_equal(labelled.to_numpy(), truth["niche_share"].notna().to_numpy())
    assert labelled.sum() > 0.1 * len(truth)
    rows = truth[labelled]
    half = np.where(rows["niche_share"] >= NICHE_STATE_SHARE, "niche_high", "niche_low")
    np.testing.assert_array_equal(rows["niche_state"].to_numpy(), (rows["state"] + "|" + half).to_numpy())
    mixed = 0
    for t in world["transitions"]:
        target = rows[rows["state"] == t["target"]]
        assert target["niche_state"].nunique() == 2, t["name"]
        counts = target.groupby(["domain", "niche_state"]).size().unstack(fill_value=0)
        mixed += int((counts.min(axis=1) >= 5).any())  # a domain with >= 5 cells of each half
    assert mixed >= 3, "in most transitions one own domain holds cells of both halves"


def test_the_same_state_looks_different_in_different_domains(measured, world):
    """Niche-dependent appearance: nuclei are larger, brighter and more textured in tumour
    than in stroma (designed size 1.08 vs 0.95, intensity 1.05 vs 0.95, texture 1.35 vs 0.9)."""
    domains = {d["name"]: d for d in world["domains"]}
    designed_area = (domains["tumour"]["nucleus_size_scale"] / domains["stroma"]["nucleus_size_scale"]) ** 2
    ratios = []
    for state, group in measured.groupby("state"):
        tumour, stroma = group[group["domain"] == "tumour"], group[group["domain"] == "stroma"]
        if min(len(tumour), len(stroma)) >= 15:
            ratios.append([tumour[f].median() / stroma[f].median() for f in ("area_px", "intensity", "texture")])
    ratios = np.array(ratios)
    assert len(ratios) >= 4
    area, intensity, texture = np.exp(np.log(ratios).mean(axis=0))
    assert (ratios[:, 0] > 1).all() and abs(area / designed_area - 1) < 0.2
    assert intensity > 1.04 and texture > 1.03


# ---------------------------------------------------------------------------------------------
# formats: the same as the real bundle
# ---------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_tables_have_the_real_bundle_columns_and_types(simulated_bundle, real_bundle):
    for name in ("cells.parquet", "cell_boundaries.parquet"):
        real, sim = pq.read_schema(real_bundle / name), pq.read_schema(simulated_bundle / name)
        assert sim.names[: len(real.names)] == real.names, name
        for field in real:
            assert sim.field(field.name).type == field.type, (name, field.name)
        assert pq.ParquetFile(simulated_bundle / name).metadata.row_group(0).column(0).compression == "SNAPPY"
    real = pq.read_schema(real_bundle / "cell_boundaries.parquet")
    nucleus = pq.read_schema(simulated_bundle / "nucleus_boundaries.parquet")
    assert nucleus.names == real.names and all(nucleus.field(f.name).type == f.type for f in real)
    real_cells = pd.read_parquet(real_bundle / "cells.parquet")
    sim_cells = pd.read_parquet(simulated_bundle / "cells.parquet")
    assert (sim_cells.dtypes[real_cells.columns] == real_cells.dtypes).all()
    assert isinstance(sim_cells["cell_id"].iloc[0], str) and sim_cells["cell_id"].str.len().eq(10).all()
    sim_clusters = pd.read_csv(simulated_bundle / CLUSTERS_RELPATH)
    assert sim_clusters.dtypes.equals(pd.read_csv(real_bundle / CLUSTERS_RELPATH).dtypes)
    real_exp = json.loads((real_bundle / "experiment.xenium").read_text())
    sim_exp = json.loads((simulated_bundle / "experiment.xenium").read_text())
    assert set(real_exp) <= set(sim_exp)
    assert all(type(sim_exp[k]) is type(v) for k, v in real_exp.items())
    assert sim_exp["major_version"] == 1
    assert sim_exp["images"] == {"morphology_focus_filepath": "morphology_focus.ome.tif"}


@pytest.mark.real_data
def test_feature_matrix_has_the_real_10x_layout(simulated_bundle, real_bundle):
    def layout(path: Path) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        with h5py.File(path) as h5:
            h5.visititems(lambda name, obj: found.__setitem__(
                name, (obj.dtype.kind, obj.dtype.itemsize if obj.dtype.kind != "S" else 0, obj.ndim, obj.compression)
                if isinstance(obj, h5py.Dataset) else ("group",)))
        return found

    assert layout(simulated_bundle / "cell_feature_matrix.h5") == layout(real_bundle / "cell_feature_matrix.h5")
    with (
        h5py.File(real_bundle / "cell_feature_matrix.h5") as real,
        h5py.File(simulated_bundle / "cell_feature_matrix.h5") as sim,
    ):
        assert set(sim["matrix/features/feature_type"][:]) == set(real["matrix/features/feature_type"][:])
        assert sim["matrix/features/_all_tag_keys"][:].tolist() == real["matrix/features/_all_tag_keys"][:].tolist()
        assert set(sim["matrix/features/genome"][:]) == set(real["matrix/features/genome"][:])
        for key in ("id", "name", "feature_type"):  # fixed-length strings sized to the longest value
            values = sim[f"matrix/features/{key}"][:]
            assert sim[f"matrix/features/{key}"].dtype.itemsize == max(len(v) for v in values)
        types = [t.decode() for t in sim["matrix/features/feature_type"][:]]
        real_types = [t.decode() for t in real["matrix/features/feature_type"][:]]
        assert list(dict.fromkeys(types)) == list(dict.fromkeys(real_types))  # genes first, then controls
        assert types.count(FEATURE_GENE) == 300 and len(types) == 300 + 20 + 41 + 3
        names = [n.decode() for n in sim["matrix/features/name"][:]]
        assert names[:300] == sorted(names[:300])
        probes = [n for n, t in zip(names, types) if t == "Negative Control Probe"]
        assert len(probes) == 20 and all(re.fullmatch(r"NegControlProbe_\d{5}", n) for n in probes)
    counts, *_ = read_counts(simulated_bundle / "cell_feature_matrix.h5")
    assert counts.has_sorted_indices and counts.dtype == np.int32


@pytest.mark.real_data
def test_image_is_a_pyramid_like_the_real_one(simulated_bundle, real_bundle, world):
    def describe(path: Path) -> dict:
        with tifffile.TiffFile(path) as tif:
            page, series = tif.pages[0], tif.series[0]
            return {
                "ome": tif.is_ome, "bigtiff": tif.is_bigtiff, "tile": (page.tilewidth, page.tilelength),
                "compression": page.compression, "photometric": page.photometric, "dtype": series.dtype,
                "axes": series.axes, "subifds": len(page.subifds or ()) >= 2, "software": page.software,
                "reduced": all(l.keyframe.subfiletype == 1 for l in series.levels[1:]),
                "physical_size": "PhysicalSizeX=" in tif.ome_metadata and "PhysicalSizeY=" in tif.ome_metadata,
                "channel": 'Name="DAPI"' in tif.ome_metadata,
            }

    sim_path = simulated_bundle / "morphology_focus.ome.tif"
    assert describe(sim_path) == describe(real_bundle / "morphology_focus.ome.tif")
    with tifffile.TiffFile(sim_path) as tif:
        levels = [level.shape for level in tif.series[0].levels]
        assert levels[0] == (world["image"]["height_px"], world["image"]["width_px"])
        assert len(levels) >= 3 and all(b == ((a[0] + 1) // 2, (a[1] + 1) // 2) for a, b in zip(levels, levels[1:]))
        full = tif.series[0].levels[0].asarray()
        np.testing.assert_array_equal(tif.series[0].levels[1].asarray(), downsample_2x(full))
        assert 'PhysicalSizeX="0.2125"' in tif.ome_metadata
    assert full.dtype == np.uint16 and 0 < np.percentile(full, 50) < np.percentile(full, 99) < 65535


# ---------------------------------------------------------------------------------------------
# layouts v2 and z-stack
# ---------------------------------------------------------------------------------------------

def test_v2_channels_and_zstack(tmp_path):
    result = simulate_bundle(tmp_path / "v2", SimulationConfig(n_cells=400, layout="v2", z_planes=3), seed=2)
    out = result.path
    experiment = json.loads((out / "experiment.xenium").read_text())
    assert experiment["major_version"] == 2
    assert experiment["images"]["morphology_focus_filepath"] == "morphology_focus/morphology_focus_0000.ome.tif"
    assert experiment["images"]["morphology_filepath"] == "morphology.ome.tif"
    assert not (out / "morphology_focus.ome.tif").exists()
    files = sorted(p.name for p in (out / "morphology_focus").iterdir())
    assert files == [f"morphology_focus_{c:04d}.ome.tif" for c in range(4)]

    singles = []
    for name in files:
        with tifffile.TiffFile(out / "morphology_focus" / name) as tif:  # multi-file OME: the whole set
            series = tif.series[0]
            assert series.axes == "CYX" and series.shape == (4, result.height_px, result.width_px)
            assert len(series.levels) >= 3
            for channel in ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"):
                assert f'Name="{channel}"' in tif.ome_metadata
            stack = series.asarray()
        singles.append(tifffile.imread(out / "morphology_focus" / name, is_ome=False))
    np.testing.assert_array_equal(np.stack(singles), stack)
    dapi, membrane = singles[0], singles[1]

    # the boundary stain follows the cell polygons: bright on the boundary, dark at the centre
    cells = pd.read_parquet(out / "cells.parquet")
    boundary = pd.read_parquet(out / "cell_boundaries.parquet")
    ps = result.pixel_size_um
    inside = lambda x, y: (x >= 0) & (y >= 0) & (x < result.width_px) & (y < result.height_px)  # noqa: E731
    vx = np.floor(boundary["vertex_x"].to_numpy() / ps).astype(int)
    vy = np.floor(boundary["vertex_y"].to_numpy() / ps).astype(int)
    keep = inside(vx, vy)
    cx = np.floor(cells["x_centroid"].to_numpy() / ps).astype(int)
    cy = np.floor(cells["y_centroid"].to_numpy() / ps).astype(int)
    centre = inside(cx, cy)
    assert np.median(membrane[vy[keep], vx[keep]]) > 3 * np.median(membrane[cy[centre], cx[centre]])
    assert np.median(dapi[cy[centre], cx[centre]]) > 5 * np.median(dapi[vy[keep], vx[keep]])

    # the z-stack: max projection is the focus image; each plane is in focus somewhere else
    with tifffile.TiffFile(out / "morphology.ome.tif") as tif:
        series = tif.series[0]
        assert series.axes == "ZYX" and series.shape == (3, result.height_px, result.width_px)
        assert len(series.levels) >= 3 and 'PhysicalSizeZ="3.0"' in tif.ome_metadata
        zstack = series.asarray()
    np.testing.assert_array_equal(zstack.max(axis=0), dapi)
    truth = pd.read_parquet(out / GROUND_TRUTH_TABLE)
    assert set(truth["focal_plane"]) == {0, 1, 2}
    for plane in range(3):
        own = (truth["focal_plane"] == plane).to_numpy() & centre
        other = (truth["focal_plane"] != plane).to_numpy() & centre
        np.testing.assert_array_equal(zstack[plane][cy[own], cx[own]], dapi[cy[own], cx[own]])
        assert (zstack[plane][cy[other], cx[other]] <= dapi[cy[other], cx[other]]).all()
        assert np.mean(zstack[plane][cy[other], cx[other]] / dapi[cy[other], cx[other]]) < 0.85

    # the reader takes the v2 folder as one 4-channel image
    slide = pytest.importorskip("spatia.io").read_xenium(out)
    assert slide.image.channel_names == ["DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin"]
    assert slide.n_cells == 400 and slide.nucleus_boundaries is not None


# ---------------------------------------------------------------------------------------------
# through the reader, the writers, the CLI
# ---------------------------------------------------------------------------------------------

def test_read_xenium_reads_a_simulated_bundle_like_a_real_one(simulated_bundle, truth, world):
    read_xenium = pytest.importorskip("spatia.io").read_xenium
    slide = read_xenium(simulated_bundle)
    assert slide.n_cells == 3000 and len(slide.gene_names) == 300 and len(slide.control_names) == 64
    assert slide.pixel_size_um == 0.2125
    assert slide.image.level_shapes_yx[0] == (world["image"]["height_px"], world["image"]["width_px"])
    assert list(slide.cells.index) == truth["cell_id"].tolist()
    np.testing.assert_allclose(slide.cells["x_centroid_px"], truth["x_px"])
    counts, *_ = read_counts(simulated_bundle / "cell_feature_matrix.h5")
    assert (slide.counts != counts[:, :300]).nnz == 0
    assert slide.nucleus_boundaries is not None and slide.cell_boundaries is not None
    assert [p for p in slide.problems if "extend past the image edge" not in p] == []
    window = slide.image.read_window(x_px=500, y_px=400, width_px=64, height_px=48)
    full = tifffile.imread(simulated_bundle / "morphology_focus.ome.tif")
    np.testing.assert_array_equal(np.squeeze(window), full[400:448, 500:564])
    adata = slide.to_anndata()
    np.testing.assert_allclose(adata.obsm["spatial"], truth[["x_um", "y_um"]].to_numpy())


def test_writers_make_a_tiny_bundle_from_arrays(tmp_path):
    """The writers used on their own, as tests of the reader use them (here: 3 cells)."""
    rng = np.random.default_rng(0)
    ids = xenium_cell_ids(3, rng)
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[a-p]{8}-1", i) for i in ids)
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    vertices = np.stack([square + [10 * i + 2, 5] for i in range(3)])
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": vertices[:, :, 0].mean(1), "y_centroid": [7.0] * 3,
                          "transcript_counts": [3, 0, 5], "control_probe_counts": [0, 0, 1],
                          "total_counts": [3, 0, 6], "cell_area": [16.0] * 3})
    counts = sp.csr_matrix(np.array([[1, 2, 0], [0, 0, 0], [5, 0, 1]]))
    features = pd.DataFrame({"id": ["G1", "G2", "NegControlProbe_00001"], "name": ["A", "B", "NegControlProbe_00001"],
                             "feature_type": [FEATURE_GENE, FEATURE_GENE, "Negative Control Probe"]})
    image = (rng.random((300, 500)) * 1000).astype(np.uint16)
    bundle = XeniumBundle(cells=cells, cell_boundaries=boundaries_frame(ids, vertices), counts=counts,
                          features=features, focus_channels=[image], pixel_size_um=0.2125)
    written = write_xenium_bundle(tmp_path / "tiny", bundle)
    assert {"cells.parquet", "cells.csv.gz", "cell_boundaries.parquet", "cell_feature_matrix.h5",
            "morphology_focus.ome.tif", "experiment.xenium"} <= set(written)
    back, barcodes, names, _ = read_counts(written["cell_feature_matrix.h5"])
    assert barcodes == list(ids) and names == list(features["name"]) and (back != counts).nnz == 0
    assert pd.read_csv(written["cells.csv.gz"]).equals(cells)
    np.testing.assert_array_equal(tifffile.imread(written["morphology_focus.ome.tif"]), image)
    with tifffile.TiffFile(written["morphology_focus.ome.tif"]) as tif:
        assert [level.shape for level in tif.series[0].levels] == [(300, 500), (150, 250), (75, 125)]
    np.testing.assert_array_equal(downsample_2x(np.array([[1, 3, 5], [3, 5, 7]], np.uint16)), [[3, 6]])
    slide = pytest.importorskip("spatia.io").read_xenium(tmp_path / "tiny")
    assert list(slide.cells.index) == list(ids) and slide.gene_names == ["A", "B"]


def test_greedy_packing_equals_sequential_adsorption():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 60, (400, 2))
    radius = rng.uniform(1.0, 4.0, 400)
    accepted = greedy_packing(xy, radius, 0.5)
    reference: list[int] = []
    for i in range(len(xy)):  # add points one at a time, in index order
        if all(np.hypot(*(xy[i] - xy[j])) >= radius[i] + radius[j] + 0.5 for j in reference):
            reference.append(i)
    assert np.flatnonzero(accepted).tolist() == reference


def test_cli_simulate_writes_a_bundle_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_bundle"
    result = runner.invoke(app, ["simulate", str(out), "--cells", "200", "--genes", "150", "--seed", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / RUN_RECORD_NAME).read_text())
    assert record["seed"] == 4 and record["config"]["n_genes"] == 150 and record["config"]["n_cells"] == 200
    assert len(pd.read_parquet(out / GROUND_TRUTH_TABLE)) == 200
    again = runner.invoke(app, ["simulate", str(out), "--cells", "200"])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["simulate", str(tmp_path / "bad"), "--genes", "10"])
    assert bad.exit_code == 2 and "--genes" in bad.output and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_cells": 10}, "at least 50"),
        ({"n_genes": 40}, "designed programs"),
        ({"layout": "v9"}, "layout"),
        ({"z_planes": -1}, "z_planes"),
        ({"cells_per_mm2": 0.0}, "cells_per_mm2"),
        ({"transitions": default_transitions()[:1] + (
            TransitionSpec("bad", "x", "Epi_FOXA1+", "tcm_CD4+T", {}, MorphologyShift()),)}, "crosses lineages"),
        ({"states": default_states() + (StateSpec("orphan", "t", "t_cell", None),)}, "no morphology"),
        ({"transitions": (replace(default_transitions()[0], base_strength=-0.5),) + default_transitions()[1:]},
         "non-negative strengths"),
        ({"transitions": (replace(default_transitions()[0], niche_domain="ocean"),) + default_transitions()[1:]},
         "unknown niche_domain"),
    ],
)
def test_invalid_configs_raise_config_error(change, message):
    config = replace(SimulationConfig(), **change)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_config_files_and_options_go_through_the_shared_loader(tmp_path):
    """Unknown keys and wrong types are refused by `spatia.config.load_config`, and the rules
    between fields (`SimulationConfig.validate`) run on what it built."""
    from spatia.config import load_config

    path = tmp_path / "sim.yaml"
    path.write_text("n_cells: 400\nlayout: v2\n")
    config = load_config(SimulationConfig, path, overrides={"z_planes": 2, "n_genes": None})
    assert (config.n_cells, config.layout, config.z_planes, config.n_genes) == (400, "v2", 2, 300)
    with pytest.raises(ConfigError, match="unknown key 'cells'"):
        load_config(SimulationConfig, {"cells": 400})
    with pytest.raises(ConfigError, match="n_cells"):
        load_config(SimulationConfig, {"n_cells": "many"})
    with pytest.raises(ConfigError, match="at least 50 cells"):
        load_config(SimulationConfig, overrides={"n_cells": 10})


def test_transition_targets_are_derived_from_their_controls():
    config = SimulationConfig()
    states = {s.name: s for s in resolve_states(config)}
    for t in config.transitions:
        control, target = states[t.control], states[t.target]
        assert target.lineage == control.lineage and t.name in control.control_of and t.name in target.target_of
        assert target.morphology == t.morphology_shift.apply(control.morphology)
        for gene, lfc in t.de_log2fc.items():
            assert target.program[gene] - control.program.get(gene, 0.0) == pytest.approx(lfc)
        assert {g for g in set(target.program) | set(control.program)
                if target.program.get(g, 0) != control.program.get(g, 0)} == set(t.de_log2fc)


def test_too_dense_tissue_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cells_per_mm2"):
        simulate_bundle(tmp_path / "dense", SimulationConfig(n_cells=100, cells_per_mm2=60_000), seed=0)
    assert not (tmp_path / "dense").exists()
