"""`simulate_bundle`: write one simulated section as a Xenium bundle with its ground truth.

`simulate_bundle(out_dir, config, seed)` writes a folder that reads like a 10x Xenium Onboard
Analysis output (layout v1: morphology_focus.ome.tif; v2: morphology_focus/ per-channel files;
optional morphology.ome.tif z-stack), plus the truth behind it:

- ground_truth.parquet: one row per cell (same order and cell_id as cells.parquet): domain,
  lineage, cell type, state, transition roles, the nucleus parameters actually rendered,
  positions in um and px, size factor and expected counts;
- ground_truth.json: the designed world: domains, lineages, types, states (resolved
  morphology and programs), the control -> target transitions with their DE genes (log2 fold
  changes) and morphology shifts, the gene programs and the expression model;
- spatia_run.json: the resolved configuration, seed and package versions.

The world (see `spatia.sim.config`) is a breast-tumour-like section: tumour nests in
stroma with immune aggregates and vessels, six lineages, fourteen states, and the five
transitions of the SPATIA paper's appendix D. Same config and seed give byte-identical tables
and identical image pixels.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spatia.errors import ConfigError
from spatia.sim import image
from spatia.sim.config import NucleusMorphology, ResolvedState, SimulationConfig, resolve_states
from spatia.sim.expression import ExpressionModel, assign_clusters, design_expression, simulate_counts
from spatia.sim.tissue import (
    CellLayout,
    DomainMap,
    boundary_radii,
    make_domain_map,
    place_cells,
    polygon_area,
    polygon_vertices,
)
from spatia.sim.writer import (
    FEATURE_GENE,
    FEATURE_NEGATIVE_PROBE,
    XeniumBundle,
    boundaries_frame,
    write_xenium_bundle,
    xenium_cell_ids,
)
from spatia.outputs import RUN_RECORD_NAME, atomic_output, write_run_record

__all__ = ["GROUND_TRUTH_JSON", "GROUND_TRUTH_TABLE", "SimulationResult", "simulate_bundle"]

logger = logging.getLogger(__name__)

GROUND_TRUTH_TABLE = "ground_truth.parquet"
GROUND_TRUTH_JSON = "ground_truth.json"
FOV_UM = 400.0  # cells are listed field of view by field of view, as Xenium lists them
_STREAMS = {
    "domains": 1, "placement": 2, "world": 3, "counts": 4, "ids": 5, "clusters": 6, "render": 7,
    "noise": 8, "background": 9, "stains": 10, "z": 11,
}
_STAIN_LEVELS = {"membrane": 1500.0, "rna": 900.0, "vimentin": 1400.0}
NICHE_STATE_SHARE = 0.5
"""Share of a transition's niche domain around a target cell (`niche_share`) from which the cell's
`niche_state` is "<state>|niche_high" (the stronger half of s(q)), below it "<state>|niche_low"."""


def _rng(seed: int, stream: str, *extra: int) -> np.random.Generator:
    """An independent generator per named stream (and per batch), so results do not depend on
    the order of work or on batch sizes elsewhere."""
    return np.random.default_rng([seed, _STREAMS[stream], *extra])


@dataclass
class SimulationResult:
    """What `simulate_bundle` wrote."""

    path: Path
    n_cells: int
    n_genes: int
    width_px: int
    height_px: int
    pixel_size_um: float
    layout: str
    z_planes: int
    files: list[str] = field(default_factory=list)  # paths relative to `path`
    state_counts: dict[str, int] = field(default_factory=dict)
    domain_fractions: dict[str, float] = field(default_factory=dict)


def simulate_bundle(out_dir: str | Path, config: SimulationConfig | None = None, seed: int = 0) -> SimulationResult:
    """Simulate a tissue section and write it as a Xenium bundle with ground truth.

    The folder is built under a temporary name beside `out_dir` and renamed when complete;
    an existing `out_dir` raises `OutputExistsError` before any work. Invalid settings raise
    `ConfigError`. Same `config` and `seed` give identical tables and image pixels.
    """
    config = config or SimulationConfig()
    config.validate()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed is {seed!r}; it must be a non-negative integer",
                          fix="use --seed 0 or another integer >= 0")
    seed = int(seed)
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        result = _simulate_into(tmp, config, seed)
        write_run_record(tmp, "simulate", config, seed)
    result.path = out_dir
    result.files = sorted(result.files + [RUN_RECORD_NAME])
    return result


# ---------------------------------------------------------------------------------------------

def _simulate_into(folder: Path, config: SimulationConfig, seed: int) -> SimulationResult:
    """Simulate everything and write the bundle and the ground truth into `folder`."""
    states = resolve_states(config)
    canvas, domain_map, layout = _place(config, states, seed)
    n = len(layout)
    geometry = _boundaries(layout, config)
    z_um, focal_plane = _depths(n, config, seed)

    model = design_expression(config, states, _rng(seed, "world"))
    simulated = simulate_counts(model, layout.state, layout.domain, geometry["cell_area"], config,
                                lambda chunk: _rng(seed, "counts", chunk))
    counts = simulated.counts
    feature_type = model.features["feature_type"].to_numpy()

    def summed(columns: np.ndarray | slice) -> np.ndarray:
        return np.asarray(counts[:, columns].sum(axis=1)).ravel().astype(np.int64)

    gene_counts = summed(feature_type == FEATURE_GENE)
    cell_ids = xenium_cell_ids(n, _rng(seed, "ids"))
    cells = pd.DataFrame({
        "cell_id": cell_ids,
        "x_centroid": layout.x_um.astype(np.float64),
        "y_centroid": layout.y_um.astype(np.float64),
        "transcript_counts": gene_counts,
        "control_probe_counts": summed(feature_type == FEATURE_NEGATIVE_PROBE),
        "total_counts": summed(slice(None)),
        "cell_area": geometry["cell_area"],
        "nucleus_area": geometry["nucleus_area"],
    })
    type_names = list(dict.fromkeys(s.cell_type for s in states))
    state_type = np.array([type_names.index(s.cell_type) for s in states])
    cluster = assign_clusters(state_type[layout.state], gene_counts, len(type_names), config, _rng(seed, "clusters"))
    clustered = cluster > 0

    stains = None
    if config.layout == "v2":
        stains = _cell_stains(layout, states, geometry["angles"], geometry["cell_r"], simulated.expected_transcripts,
                              geometry["cell_area"], _rng(seed, "stains"))
    channel_names, channels = _images(layout, canvas, domain_map, stains, config, seed)
    zstack = None
    if config.z_planes > 0:
        plane_map = image.focal_plane_map(layout, focal_plane, canvas)
        zstack = image.render_zstack(channels[0], plane_map, config.z_planes, config.defocus_sigma_px)

    bundle = XeniumBundle(
        cells=cells,
        cell_boundaries=boundaries_frame(cell_ids, geometry["cell_vertices"]),
        nucleus_boundaries=boundaries_frame(cell_ids, geometry["nucleus_vertices"]),
        counts=counts,
        features=model.features,
        focus_channels=channels,
        channel_names=channel_names,
        pixel_size_um=config.pixel_size_um,
        layout=config.layout,
        clusters=pd.DataFrame({"Barcode": cell_ids[clustered], "Cluster": cluster[clustered]}),
        zstack=zstack,
        z_step_um=config.z_step_um,
        tile_px=config.tile_px,
        segmentation_format=config.segmentation_format,
        experiment={
            "analysis_sw_version": "spatia-simulate",
            "source": "spatia.sim: simulated section; the truth is in ground_truth.json/.parquet",
        },
    )
    written = write_xenium_bundle(folder, bundle, uuid_seed=seed)

    truth = _ground_truth_table(layout, states, config, cell_ids, geometry["nucleus_area"], geometry["cell_area"],
                                z_um, focal_plane, simulated.size_factor, simulated.expected_transcripts,
                                gene_counts, cluster)
    truth.to_parquet(folder / GROUND_TRUTH_TABLE, engine="pyarrow", compression="snappy")
    world = _ground_truth_world(config, seed, states, model, domain_map, canvas, layout, type_names)
    (folder / GROUND_TRUTH_JSON).write_text(json.dumps(world, indent=2) + "\n")

    state_counts = np.bincount(layout.state, minlength=len(states))
    return SimulationResult(
        path=folder,
        n_cells=n,
        n_genes=model.n_genes,
        width_px=canvas.width_px,
        height_px=canvas.height_px,
        pixel_size_um=config.pixel_size_um,
        layout=config.layout,
        z_planes=config.z_planes,
        files=sorted([str(p.relative_to(folder)) for p in written.values()] + [GROUND_TRUTH_TABLE, GROUND_TRUTH_JSON]),
        state_counts={s.name: int(c) for s, c in zip(states, state_counts)},
        domain_fractions=domain_map.area_fractions(),
    )


def _place(
    config: SimulationConfig, states: tuple[ResolvedState, ...], seed: int
) -> tuple[image.Canvas, DomainMap, CellLayout]:
    """The canvas (square, sized by cells_per_mm2), its domains, and the placed cells listed
    field of view by field of view (as Xenium lists them)."""
    ps = config.pixel_size_um
    side_px = int(math.ceil(math.sqrt(config.n_cells / config.cells_per_mm2 * 1e6) / ps))
    canvas = image.Canvas(height_px=side_px, width_px=side_px, pixel_size_um=ps)
    side_um = side_px * ps
    logger.info("simulating %d cells on %d x %d px (%.0f x %.0f um)", config.n_cells, side_px, side_px, side_um,
                side_um)
    domain_map = make_domain_map(_rng(seed, "domains"), side_um, side_um, config.domains)
    layout = place_cells(_rng(seed, "placement"), config, states, domain_map, side_um, side_um)
    order = np.lexsort((layout.x_um, layout.y_um, layout.x_um // FOV_UM, layout.y_um // FOV_UM))
    return canvas, domain_map, layout.subset(order)


def _boundaries(layout: CellLayout, config: SimulationConfig) -> dict[str, np.ndarray]:
    """Nucleus and cell polygons ((n, K, 2) vertices, um), their radii (n, K) and areas (n,)."""
    angles = 2 * np.pi * np.arange(config.polygon_vertices) / config.polygon_vertices
    nucleus_r = layout.radius_at(angles)
    cell_r = boundary_radii(layout, nucleus_r, angles, config.nucleus_expansion_um)
    nucleus_vertices = polygon_vertices(layout.x_um, layout.y_um, nucleus_r, angles)
    cell_vertices = polygon_vertices(layout.x_um, layout.y_um, cell_r, angles)
    return {
        "angles": angles,
        "cell_r": cell_r,
        "nucleus_vertices": nucleus_vertices,
        "cell_vertices": cell_vertices,
        "nucleus_area": polygon_area(nucleus_vertices),
        "cell_area": polygon_area(cell_vertices),
    }


def _depths(n: int, config: SimulationConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth (um) and in-focus z plane of each cell; NaN and -1 without a z-stack."""
    if config.z_planes == 0:
        return np.full(n, np.nan), np.full(n, -1, np.int64)
    z_um = _rng(seed, "z").uniform(0.0, (config.z_planes - 1) * config.z_step_um, n)
    focal_plane = np.clip(np.rint(z_um / config.z_step_um), 0, config.z_planes - 1).astype(np.int64)
    return z_um, focal_plane


def _images(
    layout: CellLayout, canvas: image.Canvas, domain_map: DomainMap, stains: image.CellStains | None,
    config: SimulationConfig, seed: int,
) -> tuple[list[str], list[np.ndarray]]:
    """Channel names and finished uint16 focus images (DAPI first)."""
    signals = image.render_cells(layout, canvas, lambda b: _rng(seed, "render", b), stains)
    bg_levels = np.array([d.background for d in config.domains]) * config.dapi_background_level
    background = image.background_grid(domain_map, bg_levels, _rng(seed, "background"))
    names = list(signals)
    channels = []
    for c, name in enumerate(names):
        factor = image.V2_BACKGROUND[name] if config.layout == "v2" else 1.0
        signal = signals.pop(name)  # free each float canvas once finished
        channels.append(image.finish_channel(signal, background * factor, domain_map.grid_um, canvas, config,
                                             lambda band, c=c: _rng(seed, "noise", c, band)))
    return names, channels


def _cell_stains(
    layout: CellLayout, states: tuple[ResolvedState, ...], angles: np.ndarray, cell_r: np.ndarray,
    expected_transcripts: np.ndarray, cell_area: np.ndarray, rng: np.random.Generator,
) -> image.CellStains:
    """Per-cell stain levels of the v2 channels: membrane (boundary stain), RNA density (18S,
    from the cell's expected transcripts per um^2), vimentin (from the state)."""
    n = len(layout)
    density = expected_transcripts / np.maximum(cell_area, 1e-6)
    rna = _STAIN_LEVELS["rna"] * np.clip(density / density.mean(), 0.2, 3.0)
    vimentin_state = np.array([s.vimentin for s in states])
    return image.CellStains(
        angles=angles,
        cell_r_um=cell_r,
        membrane=_STAIN_LEVELS["membrane"] * np.exp(rng.normal(0.0, 0.15, n)),
        rna=rna * np.exp(rng.normal(0.0, 0.1, n)),
        vimentin=_STAIN_LEVELS["vimentin"] * vimentin_state[layout.state] * np.exp(rng.normal(0.0, 0.2, n)),
    )


def _ground_truth_table(
    layout: CellLayout, states: tuple[ResolvedState, ...], config: SimulationConfig, cell_ids: np.ndarray,
    nucleus_polygon_area: np.ndarray, cell_area: np.ndarray, z_um: np.ndarray, focal_plane: np.ndarray,
    size_factor: np.ndarray, expected: np.ndarray, transcript_counts: np.ndarray, cluster: np.ndarray,
) -> pd.DataFrame:
    ps = config.pixel_size_um
    state = layout.state
    names = np.array([s.name for s in states], dtype=object)
    control_of = np.array([";".join(s.control_of) for s in states], dtype=object)
    target_of = np.array([";".join(s.target_of) for s in states], dtype=object)
    sqrt_e = np.sqrt(layout.elongation)
    table = {
        "cell_id": cell_ids,
        "x_um": layout.x_um,
        "y_um": layout.y_um,
        "x_px": layout.x_um / ps,
        "y_px": layout.y_um / ps,
        "domain": np.array([d.name for d in config.domains], dtype=object)[layout.domain],
        "lineage": np.array([s.lineage for s in states], dtype=object)[state],
        "cell_type": np.array([s.cell_type for s in states], dtype=object)[state],
        "state": names[state],
        "is_transition_control": (control_of != "")[state],
        "is_transition_target": (target_of != "")[state],
        "control_of": control_of[state],
        "target_of": target_of[state],
        "cluster": cluster,
        "nucleus_radius_um": layout.radius_um,
        "nucleus_elongation": layout.elongation,
        "nucleus_semi_major_um": layout.radius_um * sqrt_e,
        "nucleus_semi_minor_um": layout.radius_um / sqrt_e,
        "nucleus_orientation_rad": layout.orientation_rad,
        "nucleus_irregularity": np.sqrt(np.sum(layout.harmonic_amp**2, axis=1) / 2),
    }
    for h in range(layout.harmonic_amp.shape[1]):
        table[f"nucleus_harmonic_amp_{h + 2}"] = layout.harmonic_amp[:, h]
        table[f"nucleus_harmonic_phase_{h + 2}"] = layout.harmonic_phase[:, h]
    table.update({
        "nucleus_area_um2": layout.area_um2,
        "nucleus_polygon_area_um2": nucleus_polygon_area,
        "nucleus_bounding_radius_um": layout.bounding_um,
        "nucleus_intensity": layout.intensity,
        "nucleus_texture": layout.texture,
        "nucleus_spot_count": layout.spot_count,
        "niche_share": layout.niche_share,
        "morphology_shift_strength": layout.shift_strength,
        "niche_state": niche_state_labels(names[state], layout.niche_share),
        "cell_area_um2": cell_area,
        "z_um": z_um,
        "focal_plane": focal_plane,
        "size_factor": size_factor,
        "expected_transcripts": expected,
        "transcript_counts": transcript_counts,
    })
    return pd.DataFrame(table)


def niche_state_labels(state_names: np.ndarray, niche_share: np.ndarray) -> np.ndarray:
    """The simulator's niche-dependent state of each cell, a label that needs the cell's context:
    for a cell in a niche-dependent transition's target state, its state and whether the disc of
    `niche_radius_um` (60 um by default) around it holds at least `NICHE_STATE_SHARE` of the
    transition's niche domain ("Epi_CENPF+|niche_high": s(q) in the upper half of its range, a
    strong morphology shift) or less ("Epi_CENPF+|niche_low", a weak one); None for every other
    cell (`niche_share` NaN). The cell's own expression depends on its own domain only, so it can
    only guess the half from that domain; its nucleus (the shift) and its niche can tell it."""
    share = np.asarray(niche_share, dtype=np.float64)
    half = np.where(share >= NICHE_STATE_SHARE, "|niche_high", "|niche_low")
    labels = np.char.add(np.asarray(state_names, dtype=str), half).astype(object)
    labels[np.isnan(share)] = None
    return labels


def _morphology_dict(m: NucleusMorphology) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(m).items()}


def _ground_truth_world(
    config: SimulationConfig, seed: int, states: tuple[ResolvedState, ...], model: ExpressionModel,
    domain_map: DomainMap, canvas: image.Canvas, layout: CellLayout, type_names: list[str],
) -> dict:
    by_name = {s.name: s for s in states}
    state_counts = np.bincount(layout.state, minlength=len(states))
    domain_counts = np.bincount(layout.domain, minlength=len(config.domains))
    fractions = domain_map.area_fractions()
    lineages: dict[str, list[str]] = {}
    for s in states:
        lineages.setdefault(s.lineage, [])
        if s.cell_type not in lineages[s.lineage]:
            lineages[s.lineage].append(s.cell_type)
    transitions = []
    for t in config.transitions:
        control, target = by_name[t.control], by_name[t.target]
        transitions.append({
            "name": t.name,
            "axis": t.axis,
            "lineage": control.lineage,
            "control": t.control,
            "target": t.target,
            "control_cell_type": control.cell_type,
            "target_cell_type": target.cell_type,
            "n_control": int(state_counts[states.index(control)]),
            "n_target": int(state_counts[states.index(target)]),
            "de_genes": [
                {"gene": g, "log2_fold_change": float(v), "direction": "up" if v > 0 else "down"}
                for g, v in t.de_log2fc.items()
            ],
            "morphology_shift": asdict(t.morphology_shift),
            "niche_dependence": {
                "formula": "target morphology = control morphology * scale ** s per feature; s = base_strength + "
                           "(niche_strength - base_strength) * q, q = share of niche_domain within niche_radius_um "
                           "of the cell; per cell in ground_truth.parquet (niche_share, morphology_shift_strength)",
                "niche_domain": t.niche_domain, "niche_strength": t.niche_strength,
                "base_strength": t.base_strength, "niche_radius_um": t.niche_radius_um,
            },
            "control_morphology": _morphology_dict(control.morphology),
            "target_morphology": _morphology_dict(target.morphology),
        })
    return {
        "description": "Designed world of a spatia simulated Xenium bundle (spatia.sim).",
        "seed": seed,
        "image": {
            "width_px": canvas.width_px, "height_px": canvas.height_px, "pixel_size_um": canvas.pixel_size_um,
            "width_um": canvas.width_px * canvas.pixel_size_um, "height_um": canvas.height_px * canvas.pixel_size_um,
            "pixel_convention": "x_px = x_um / pixel_size_um; pixel column j covers x_px in [j, j + 1)",
            "layout": config.layout, "z_planes": config.z_planes,
        },
        "n_cells": len(layout),
        "domains": [
            {
                "name": d.name, "pattern": d.pattern, "area_fraction": round(fractions[d.name], 6),
                "n_cells": int(domain_counts[i]), "nucleus_size_scale": d.nucleus_size_scale,
                "nucleus_intensity_scale": d.nucleus_intensity_scale,
                "nucleus_texture_scale": d.nucleus_texture_scale, "density_scale": d.density_scale,
                "niche_genes": list(d.niche_genes), "niche_log2fc": d.niche_log2fc,
                "state_weights": d.state_weights,
            }
            for i, d in enumerate(config.domains)
        ],
        "lineages": lineages,
        "cell_types": {
            name: {"lineage": next(s.lineage for s in states if s.cell_type == name),
                   "states": [s.name for s in states if s.cell_type == name]}
            for name in type_names
        },
        "states": {
            s.name: {
                "cell_type": s.cell_type, "lineage": s.lineage, "n_cells": int(state_counts[i]),
                "morphology": _morphology_dict(s.morphology), "vimentin": s.vimentin,
                "control_of": list(s.control_of), "target_of": list(s.target_of),
            }
            for i, s in enumerate(states)
        },
        "transitions": transitions,
        "gene_programs": {
            "lineage": config.lineage_programs,
            "state": {s.name: s.program for s in config.states},
            "transition_de": {t.name: t.de_log2fc for t in config.transitions},
            "niche": {d.name: {g: d.niche_log2fc for g in d.niche_genes} for d in config.domains},
            "lineage_filler": model.lineage_filler_log2,
        },
        "expression_model": {
            "formula": "count ~ NB(mean = size_factor * 2 ** (state_log2[state, gene] + niche_log2[domain, gene]), "
                       "theta)",
            "theta": config.nb_inverse_dispersion,
            "mean_transcripts_per_cell": config.mean_transcripts_per_cell,
            "size_factor": "proportional to cell_area_um2; per cell in ground_truth.parquet",
            "genes": model.genes,
            "filler_genes": model.filler_genes,
            "baseline_log2": model.baseline_log2,
            "state_log2": {s.name: [round(float(v), 6) for v in model.state_log2[i]] for i, s in enumerate(states)},
        },
    }
