"""The designed world of the ground-truth tissue simulator: configuration types and defaults.

Everything the simulator draws from is declared here as plain frozen dataclasses, so a run's
resolved configuration can be written next to its outputs and read back by a person:

- `DomainSpec`: a spatial domain (tumour, stroma, immune aggregate, vessel), its layout pattern,
  which cell states live there, how it changes nucleus appearance and which niche genes it raises.
- `StateSpec`: a cell state (the finest label), its cell type and lineage, its nucleus morphology
  (`NucleusMorphology`) and its marker program (gene -> log2 effect).
- `TransitionSpec`: a designed control -> target transition within a lineage (the paper's
  appendix D: EMT, proliferation, lineage conversion, T-cell activation, angiogenesis). The
  target state's expression is the control's plus the transition's DE genes (log2 fold
  changes) and its nucleus morphology is the control's with the `MorphologyShift` applied,
  raised to a niche-dependent strength (`TransitionSpec.shift_strength`: set by the share of a
  domain in the cell's neighbourhood), so the target's morphology depends on where the cell
  lives, not only on its state.
- `SimulationConfig`: sizes, layout, image and count model parameters, and the tuples above.

`resolve_states` turns the declared states and transitions into the final per-state morphology
and programs (targets derived from controls); `SimulationConfig.validate` raises `ConfigError`
for anything inconsistent (`spatia.config.load_config` calls it, and refuses unknown keys and
wrong types).

(About 500 lines, kept as one module: most of it is the declared default world, which reads as
one specification.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from spatia.errors import ConfigError

Layout = Literal["v1", "v2"]
SegmentationFormat = Literal["parquet", "zarr", "both", "none"]
DomainPattern = Literal["matrix", "blobs", "bands"]


@dataclass(frozen=True)
class NucleusMorphology:
    """Mean nucleus appearance of one cell state (before per-cell and per-domain variation).

    radius_um: equivalent-circle radius (um); the ellipse has area pi * radius_um**2.
    elongation: major / minor axis ratio (>= 1).
    irregularity: RMS relative amplitude of the boundary harmonics 2..5 (0 = perfect ellipse).
    intensity: DAPI brightness relative to `SimulationConfig.dapi_nucleus_level`.
    texture: relative amplitude of the chromatin texture field (std / mean brightness).
    spots: mean number of bright chromocentres (Poisson).
    aligned: major axis follows the local tissue direction (fibres, vessels) instead of random.
    """

    radius_um: float
    elongation: float
    irregularity: float
    intensity: float
    texture: float
    spots: float
    aligned: bool = False


@dataclass(frozen=True)
class MorphologyShift:
    """Multiplicative change of a control state's nucleus morphology giving the target's."""

    radius_scale: float = 1.0
    elongation_scale: float = 1.0
    irregularity_scale: float = 1.0
    intensity_scale: float = 1.0
    texture_scale: float = 1.0
    spots_scale: float = 1.0

    def apply(self, base: NucleusMorphology, strength: float = 1.0) -> NucleusMorphology:
        """The shifted morphology; `strength` raises every scale to that power (0: no change)."""
        return replace(
            base,
            radius_um=base.radius_um * self.radius_scale**strength,
            elongation=max(1.0, base.elongation * self.elongation_scale**strength),
            irregularity=base.irregularity * self.irregularity_scale**strength,
            intensity=base.intensity * self.intensity_scale**strength,
            texture=base.texture * self.texture_scale**strength,
            spots=base.spots * self.spots_scale**strength,
        )


@dataclass(frozen=True)
class StateSpec:
    """A cell state. `morphology=None` marks a transition target (derived from its control)."""

    name: str
    cell_type: str
    lineage: str
    morphology: NucleusMorphology | None
    program: dict[str, float] = field(default_factory=dict)  # gene -> log2 effect over baseline
    vimentin: float = 0.0  # cytoplasmic AlphaSMA/Vimentin stain level (layout v2), 0..1


@dataclass(frozen=True)
class TransitionSpec:
    """A designed control -> target transition within one lineage.

    The niche-dependent part: a target cell whose neighbourhood (the disc of radius
    `niche_radius_um` around it) is a share q of domain `niche_domain` gets its control state's
    morphology shifted with strength

        s(q) = base_strength + (niche_strength - base_strength) * q

    (every scale of `morphology_shift` raised to the power s; s = 1 is the shift as declared,
    s = 0 none). A cell's own expression and appearance depend on its own domain only, not on q:
    what tells the strength apart is the mix of domains around the cell (its niche).
    `niche_domain=None` gives every target the full shift.
    """

    name: str
    axis: str
    control: str
    target: str
    de_log2fc: dict[str, float]  # gene -> log2 fold change target / control (per unit library)
    morphology_shift: MorphologyShift
    niche_domain: str | None = None
    niche_strength: float = 1.0     # s where the neighbourhood is all `niche_domain`
    base_strength: float = 1.0      # s where it holds none of it
    niche_radius_um: float = 60.0

    def shift_strength(self, niche_share: np.ndarray) -> np.ndarray:
        """s(q) above, for shares q in [0, 1] of `niche_domain` around the cells."""
        if self.niche_domain is None:
            return np.ones(np.shape(niche_share))
        return self.base_strength + (self.niche_strength - self.base_strength) * np.asarray(niche_share, np.float64)


@dataclass(frozen=True)
class DomainSpec:
    """A spatial domain and what it does to the cells in it.

    pattern: "matrix" fills whatever the other domains leave (exactly one domain has it);
      "blobs" paints the top `area_fraction` of a smoothed random field; "bands" paints the
      level set |field| < t of a smoothed random field (thin winding bands: vessels).
      Domains later in `SimulationConfig.domains` are painted over earlier ones.
    length_scale_um: correlation length of the domain's random field.
    density_scale: relative cell density (candidate points are thinned by it; 1 = densest).
    nucleus_*_scale: niche-dependent appearance; the same state looks different here.
    background: relative tissue autofluorescence (1 = `SimulationConfig.dapi_background_level`).
    state_weights: relative abundance of each cell state in this domain.
    niche_genes / niche_log2fc: genes raised in every cell of this domain.
    """

    name: str
    pattern: DomainPattern
    area_fraction: float
    length_scale_um: float
    density_scale: float
    nucleus_size_scale: float
    nucleus_intensity_scale: float
    nucleus_texture_scale: float
    background: float
    state_weights: dict[str, float]
    niche_genes: tuple[str, ...] = ()
    niche_log2fc: float = 2.0


@dataclass(frozen=True)
class SimulationConfig:
    """All knobs of `spatia.sim.simulate_bundle` (defaults give a breast-tumour-like section)."""

    n_cells: int = 20_000
    n_genes: int = 300
    layout: Layout = "v1"
    z_planes: int = 0  # 0: no morphology.ome.tif z-stack
    # where the segmentation is written: "parquet" (cell/nucleus_boundaries.parquet), "zarr" (only
    # cells.zarr.zip, as XOA 2.x-4.x bundles may be), "both", or "none" (no segmentation at all)
    segmentation_format: SegmentationFormat = "parquet"
    # geometry
    pixel_size_um: float = 0.2125
    cells_per_mm2: float = 9_000.0
    packing_gap_um: float = 0.3  # minimum gap between the bounding circles of two nuclei
    nucleus_expansion_um: float = 3.0  # cell boundary = nucleus expanded by this, limited by neighbours
    polygon_vertices: int = 20  # vertices per boundary polygon (the file repeats the first one)
    radius_cv: float = 0.10  # per-cell log-normal variation of the nucleus radius
    elongation_cv: float = 0.15
    intensity_cv: float = 0.10
    texture_cv: float = 0.15
    # image
    dapi_nucleus_level: float = 1800.0  # uint16 counts of a nucleus of relative intensity 1
    dapi_background_level: float = 120.0
    read_noise: float = 12.0  # sd of additive noise (counts)
    shot_noise_gain: float = 1.0  # noise variance added per count of signal
    blur_sigma_px: float = 0.8  # optical blur (0 = none)
    z_step_um: float = 3.0
    defocus_sigma_px: float = 2.0  # extra blur per plane of distance from a cell's focal plane
    tile_px: int = 256
    # expression
    mean_transcripts_per_cell: float = 100.0
    nb_inverse_dispersion: float = 4.0  # theta of the negative binomial (var = mu + mu^2 / theta)
    baseline_log2_mean: float = -4.3  # log2 expression of an unprogrammed gene per unit library
    baseline_log2_sd: float = 1.0
    filler_lineage_fraction: float = 0.2  # share of filler genes a lineage modulates
    filler_lineage_log2_sd: float = 1.0
    control_counts_per_cell: float = 0.02  # expected counts summed over all control features
    n_negative_control_probes: int = 20
    n_negative_control_codewords: int = 41
    n_unassigned_codewords: int = 3
    cluster_label_noise: float = 0.05  # share of clustered cells given a random other cluster
    unclustered_fraction: float = 0.05  # the lowest-count cells get no cluster (as in 10x output)
    # the world
    domains: tuple[DomainSpec, ...] = field(default_factory=lambda: default_domains())
    states: tuple[StateSpec, ...] = field(default_factory=lambda: default_states())
    transitions: tuple[TransitionSpec, ...] = field(default_factory=lambda: default_transitions())
    lineage_programs: dict[str, dict[str, float]] = field(default_factory=lambda: default_lineage_programs())

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent setting and how to fix it."""
        _validate(self)


# ---------------------------------------------------------------------------------------------
# Defaults: a breast-tumour-like section with the paper's appendix-D transitions.
# ---------------------------------------------------------------------------------------------

def default_lineage_programs() -> dict[str, dict[str, float]]:
    """Genes shared by every state of a lineage (log2 effect over baseline)."""
    return {
        "epithelial": {"EPCAM": 3.0, "KRT8": 3.5, "KRT18": 3.0, "KRT19": 2.5, "CDH1": 3.0, "CLDN4": 2.5, "ELF3": 2.0},
        "t_cell": {"CD3E": 3.5, "CD3D": 3.0, "CD2": 2.5, "TRAC": 3.0, "LCK": 2.5, "CD247": 2.0},
        "endothelial": {"PECAM1": 3.5, "VWF": 3.0, "CDH5": 3.0, "EMCN": 2.5, "TIE1": 2.0},
        "fibroblast": {"COL1A1": 3.5, "COL1A2": 3.0, "DCN": 3.0, "LUM": 3.0, "PDGFRA": 2.5, "FBLN1": 2.0},
        "myeloid": {"CD68": 3.5, "CD14": 3.0, "LYZ": 3.5, "CSF1R": 2.5, "AIF1": 2.5, "FCGR3A": 2.0},
        "b_cell": {"MS4A1": 3.5, "CD79A": 3.5, "CD79B": 3.0, "CD19": 2.5, "PAX5": 2.5, "BANK1": 2.0},
    }


def default_states() -> tuple[StateSpec, ...]:
    """Cell states; transition targets carry `morphology=None` and are derived from controls."""
    M = NucleusMorphology
    return (
        StateSpec("Epi_FOXA1+", "luminal_epithelial", "epithelial", M(3.2, 1.3, 0.05, 1.0, 0.20, 3.0),
                  {"FOXA1": 4.0, "ESR1": 3.0, "GATA3": 3.5, "PGR": 2.5, "TFF1": 3.0, "AGR2": 3.0, "AR": 2.0,
                   "ANKRD30A": 2.5}),
        StateSpec("EMT-Epi1_CEACAM6+", "emt_epithelial", "epithelial", None, vimentin=0.6),
        StateSpec("Epi_CENPF+", "proliferative_epithelial", "epithelial", None),
        StateSpec("mgEpi_KRT14+", "basal_epithelial", "epithelial", None, vimentin=0.2),
        StateSpec("tcm_CD4+T", "cd4_tcm", "t_cell", M(2.2, 1.08, 0.03, 1.35, 0.30, 4.0),
                  {"CD4": 3.5, "CCR7": 3.0, "SELL": 3.0, "IL7R": 3.0, "TCF7": 2.5, "LEF1": 2.5}),
        StateSpec("eff_CD8+T1", "cd8_effector", "t_cell", None),
        StateSpec("EC_CAVIN2+", "endothelial_quiescent", "endothelial", M(2.3, 2.4, 0.04, 0.9, 0.12, 1.0, True),
                  {"CAVIN2": 3.5, "AQP1": 3.0, "ACKR1": 3.0, "SELP": 2.0}, vimentin=0.5),
        StateSpec("EC_CLEC14A+", "endothelial_angiogenic", "endothelial", None, vimentin=0.5),
        StateSpec("Fib_PI16+", "fibroblast", "fibroblast", M(2.4, 2.8, 0.04, 0.95, 0.12, 1.0, True),
                  {"PI16": 3.0, "DPT": 3.0, "CFD": 2.5, "SFRP2": 2.5}, vimentin=0.7),
        StateSpec("CAF_POSTN+", "fibroblast", "fibroblast", M(2.7, 2.2, 0.06, 0.9, 0.18, 2.0, True),
                  {"POSTN": 3.5, "FAP": 3.0, "TAGLN": 2.5, "MMP11": 3.0, "COL11A1": 3.0, "ACTA2": 2.0},
                  vimentin=1.0),
        StateSpec("Mac_IL1B+", "macrophage", "myeloid", M(2.8, 1.35, 0.12, 0.85, 0.22, 2.0),
                  {"IL1B": 3.0, "TNF": 2.0, "CD86": 2.5, "CXCL8": 2.5, "S100A8": 2.0}, vimentin=0.3),
        StateSpec("Mac_SPP1+", "macrophage", "myeloid", M(3.0, 1.3, 0.14, 0.8, 0.25, 2.0),
                  {"SPP1": 3.5, "CD163": 3.0, "MRC1": 3.0, "APOE": 3.0, "C1QA": 3.0, "C1QC": 2.5}, vimentin=0.3),
        StateSpec("B_TCL1A+", "b_cell", "b_cell", M(2.1, 1.05, 0.03, 1.45, 0.32, 5.0),
                  {"TCL1A": 3.0, "IGHD": 3.0, "FCER2": 2.5, "IGHM": 2.5}),
        StateSpec("B_CD83+", "b_cell", "b_cell", M(2.5, 1.12, 0.05, 1.2, 0.28, 4.0),
                  {"CD83": 3.0, "CD69": 2.5, "MYC": 2.0, "NFKB1": 2.0}),
    )


def default_transitions() -> tuple[TransitionSpec, ...]:
    """The paper's appendix-D transitions, each with DE genes and a nucleus morphology shift."""
    return (
        TransitionSpec(
            "EMT_transition", "tumor_progression", "Epi_FOXA1+", "EMT-Epi1_CEACAM6+",
            {"CEACAM6": 4.0, "VIM": 3.5, "ZEB1": 2.5, "SNAI2": 2.5, "FN1": 3.0, "TWIST1": 2.0, "MMP2": 2.0,
             "SPARC": 2.5, "FOXA1": -2.5, "CDH1": -2.5, "ESR1": -2.0, "GATA3": -2.0, "CLDN4": -1.5},
            MorphologyShift(elongation_scale=1.6, irregularity_scale=1.8, intensity_scale=0.8),
            niche_domain="stroma", niche_strength=1.8, base_strength=0.3,  # EMT where stroma surrounds
        ),
        TransitionSpec(
            "proliferation_activation", "tumor_progression", "Epi_FOXA1+", "Epi_CENPF+",
            {"CENPF": 4.0, "MKI67": 3.5, "TOP2A": 3.5, "CCNB1": 3.0, "BIRC5": 3.0, "CDK1": 2.5, "UBE2C": 3.0,
             "PGR": -2.0, "TFF1": -1.5, "FOXA1": -1.0},
            MorphologyShift(radius_scale=1.25, elongation_scale=0.9, intensity_scale=1.35, texture_scale=1.8,
                            spots_scale=2.5),
            niche_domain="tumour", niche_strength=1.6, base_strength=0.4,  # in tumour-rich niches
        ),
        TransitionSpec(
            "lineage_conversion", "tumor_progression", "Epi_FOXA1+", "mgEpi_KRT14+",
            {"KRT14": 4.0, "KRT5": 3.5, "KRT17": 3.0, "TP63": 3.0, "KRT6B": 2.5, "MYLK": 2.0,
             "FOXA1": -3.0, "ESR1": -2.5, "KRT8": -2.0, "AGR2": -2.5, "PGR": -2.0},
            MorphologyShift(radius_scale=0.82, elongation_scale=1.25, intensity_scale=1.25, texture_scale=1.3),
            niche_domain="stroma", niche_strength=1.6, base_strength=0.4,
        ),
        TransitionSpec(
            "T_cell_activation", "immune_infiltration", "tcm_CD4+T", "eff_CD8+T1",
            {"CD8A": 4.0, "CD8B": 3.5, "GZMB": 3.5, "GZMK": 3.0, "PRF1": 3.0, "NKG7": 3.0, "IFNG": 2.5,
             "CCL5": 3.0, "CD4": -3.5, "CCR7": -3.0, "SELL": -2.5, "IL7R": -2.0, "TCF7": -2.0, "LEF1": -2.0},
            MorphologyShift(radius_scale=1.3, elongation_scale=1.1, intensity_scale=0.72, texture_scale=0.55,
                            spots_scale=0.5),
            niche_domain="tumour", niche_strength=1.6, base_strength=0.4,  # activated near tumour
        ),
        TransitionSpec(
            "angiogenesis_activation", "immune_infiltration", "EC_CAVIN2+", "EC_CLEC14A+",
            {"CLEC14A": 4.0, "ESM1": 3.5, "KDR": 3.0, "ANGPT2": 3.0, "APLN": 3.0, "PLVAP": 2.5, "COL4A1": 2.5,
             "CAVIN2": -3.0, "AQP1": -2.5, "ACKR1": -3.0, "SELP": -2.0},
            MorphologyShift(radius_scale=1.22, elongation_scale=0.7, texture_scale=1.7),
            niche_domain="tumour", niche_strength=1.5, base_strength=0.5,  # tumour-driven
        ),
    )


def default_domains() -> tuple[DomainSpec, ...]:
    """Tumour nests in stroma, with immune aggregates and winding vessels painted on top.

    State weights are tuned so every state holds >= 5% of the cells (>= ~150 at 3,000 cells).
    """
    tumour = {
        "Epi_FOXA1+": 0.20, "EMT-Epi1_CEACAM6+": 0.155, "Epi_CENPF+": 0.235, "mgEpi_KRT14+": 0.11,
        "tcm_CD4+T": 0.015, "eff_CD8+T1": 0.03, "EC_CAVIN2+": 0.01, "EC_CLEC14A+": 0.055, "Fib_PI16+": 0.005,
        "CAF_POSTN+": 0.055, "Mac_IL1B+": 0.04, "Mac_SPP1+": 0.07, "B_TCL1A+": 0.005, "B_CD83+": 0.015,
    }
    stroma = {
        "Epi_FOXA1+": 0.025, "EMT-Epi1_CEACAM6+": 0.105, "Epi_CENPF+": 0.02, "mgEpi_KRT14+": 0.035,
        "tcm_CD4+T": 0.05, "eff_CD8+T1": 0.055, "EC_CAVIN2+": 0.05, "EC_CLEC14A+": 0.03, "Fib_PI16+": 0.205,
        "CAF_POSTN+": 0.205, "Mac_IL1B+": 0.085, "Mac_SPP1+": 0.075, "B_TCL1A+": 0.025, "B_CD83+": 0.03,
    }
    immune = {
        "tcm_CD4+T": 0.20, "eff_CD8+T1": 0.19, "B_TCL1A+": 0.18, "B_CD83+": 0.20, "Mac_IL1B+": 0.09,
        "Mac_SPP1+": 0.04, "EC_CAVIN2+": 0.03, "EC_CLEC14A+": 0.025, "Fib_PI16+": 0.03, "CAF_POSTN+": 0.015,
    }
    vessel = {
        "EC_CAVIN2+": 0.39, "EC_CLEC14A+": 0.26, "Fib_PI16+": 0.08, "CAF_POSTN+": 0.05, "Mac_IL1B+": 0.07,
        "Mac_SPP1+": 0.04, "tcm_CD4+T": 0.025, "eff_CD8+T1": 0.035, "B_TCL1A+": 0.02, "B_CD83+": 0.03,
    }
    return (
        DomainSpec(
            name="tumour", pattern="blobs", area_fraction=0.40, length_scale_um=90.0, density_scale=1.0,
            nucleus_size_scale=1.08, nucleus_intensity_scale=1.05, nucleus_texture_scale=1.35, background=1.15,
            state_weights=tumour, niche_genes=("VEGFA", "CA9", "SLC2A1", "NDRG1", "ADM"),
        ),
        DomainSpec(
            name="stroma", pattern="matrix", area_fraction=0.0, length_scale_um=60.0, density_scale=0.6,
            nucleus_size_scale=0.95, nucleus_intensity_scale=0.95, nucleus_texture_scale=0.9, background=1.0,
            state_weights=stroma, niche_genes=("CXCL12", "MGP", "C7", "CFH"),
        ),
        DomainSpec(
            name="immune_aggregate", pattern="blobs", area_fraction=0.12, length_scale_um=28.0, density_scale=1.0,
            nucleus_size_scale=0.9, nucleus_intensity_scale=1.1, nucleus_texture_scale=0.8, background=0.95,
            state_weights=immune, niche_genes=("CXCL13", "CCL19", "CCL21", "LTB"),
        ),
        DomainSpec(
            name="vessel", pattern="bands", area_fraction=0.10, length_scale_um=70.0, density_scale=0.85,
            nucleus_size_scale=1.0, nucleus_intensity_scale=1.0, nucleus_texture_scale=1.0, background=0.8,
            state_weights=vessel, niche_genes=("KLF2", "KLF4", "NOS3"),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Resolution and validation
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedState:
    """A state with its final morphology and full program (lineage + state [+ DE])."""

    name: str
    cell_type: str
    lineage: str
    morphology: NucleusMorphology
    program: dict[str, float]  # gene -> log2 effect over baseline (lineage program included)
    vimentin: float
    control_of: tuple[str, ...]  # transition names this state is the control of
    target_of: tuple[str, ...]


def resolve_states(config: SimulationConfig) -> tuple[ResolvedState, ...]:
    """Final per-state morphology and programs: transition targets are derived from controls."""
    config.validate()
    declared = {s.name: s for s in config.states}
    by_target = {t.target: t for t in config.transitions}
    resolved: dict[str, ResolvedState] = {}

    def resolve(name: str) -> ResolvedState:
        if name in resolved:
            return resolved[name]
        spec = declared[name]
        if spec.morphology is not None:
            program = dict(config.lineage_programs.get(spec.lineage, {}))
            for gene, effect in spec.program.items():
                program[gene] = program.get(gene, 0.0) + effect
            morphology = spec.morphology
        else:
            transition = by_target[name]
            control = resolve(transition.control)
            program = dict(control.program)
            for gene, lfc in transition.de_log2fc.items():
                program[gene] = program.get(gene, 0.0) + lfc
            for gene, effect in spec.program.items():
                program[gene] = program.get(gene, 0.0) + effect
            morphology = transition.morphology_shift.apply(control.morphology)
        state = ResolvedState(
            name=name,
            cell_type=spec.cell_type,
            lineage=spec.lineage,
            morphology=morphology,
            program=program,
            vimentin=spec.vimentin,
            control_of=tuple(t.name for t in config.transitions if t.control == name),
            target_of=tuple(t.name for t in config.transitions if t.target == name),
        )
        resolved[name] = state
        return state

    return tuple(resolve(s.name) for s in config.states)


def designed_genes(config: SimulationConfig) -> list[str]:
    """Every gene named by a program, a transition or a domain, in first-mention order."""
    genes: dict[str, None] = {}
    for program in config.lineage_programs.values():
        genes.update(dict.fromkeys(program))
    for state in config.states:
        genes.update(dict.fromkeys(state.program))
    for transition in config.transitions:
        genes.update(dict.fromkeys(transition.de_log2fc))
    for domain in config.domains:
        genes.update(dict.fromkeys(domain.niche_genes))
    return list(genes)


def _bad(problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, fix=fix)


def _validate(config: SimulationConfig) -> None:
    """The rules of `SimulationConfig.validate`."""
    if config.n_cells < 50:
        raise _bad(f"n_cells is {config.n_cells}; the simulator needs at least 50 cells", "ask for --cells 50 or more")
    n_designed = len(designed_genes(config))
    if config.n_genes < n_designed:
        raise _bad(
            f"n_genes is {config.n_genes} but the designed programs name {n_designed} genes",
            f"ask for --genes {n_designed} or more",
        )
    if config.layout not in ("v1", "v2"):
        raise _bad(f"layout {config.layout!r} is not one of 'v1', 'v2'", "use --layout v1 or --layout v2")
    if config.segmentation_format not in ("parquet", "zarr", "both", "none"):
        raise _bad(f"segmentation_format {config.segmentation_format!r} is not one of 'parquet', 'zarr', 'both', 'none'",
                   "use segmentation_format='parquet' (or 'zarr', 'both', 'none')")
    if config.z_planes < 0 or config.z_planes > 64:
        raise _bad(f"z_planes is {config.z_planes}; it must be between 0 (no z-stack) and 64", "use --z-planes 0..64")
    positive = ("pixel_size_um", "cells_per_mm2", "mean_transcripts_per_cell", "nb_inverse_dispersion",
                "dapi_nucleus_level", "z_step_um")
    for name in positive:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise _bad(f"{name} is {value!r}; it must be a positive number", f"set {name} > 0")
    non_negative = ("packing_gap_um", "nucleus_expansion_um", "radius_cv", "elongation_cv", "intensity_cv",
                    "texture_cv", "dapi_background_level", "read_noise", "shot_noise_gain", "blur_sigma_px",
                    "defocus_sigma_px", "control_counts_per_cell", "baseline_log2_sd", "filler_lineage_log2_sd")
    for name in non_negative:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise _bad(f"{name} is {value!r}; it must be a number >= 0", f"set {name} >= 0")
    for name in ("cluster_label_noise", "unclustered_fraction", "filler_lineage_fraction"):
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise _bad(f"{name} is {value!r}; it must be in [0, 1)", f"set {name} between 0 and 1")
    if config.polygon_vertices < 6:
        raise _bad(f"polygon_vertices is {config.polygon_vertices}; at least 6 are needed", "set polygon_vertices >= 6")
    if config.tile_px % 16 or config.tile_px < 16:
        raise _bad(f"tile_px is {config.tile_px}; TIFF tiles must be a multiple of 16", "use tile_px=256")
    for name in ("n_negative_control_probes", "n_negative_control_codewords", "n_unassigned_codewords"):
        if getattr(config, name) < 0:
            raise _bad(f"{name} is negative", f"set {name} >= 0")

    states = {s.name: s for s in config.states}
    if len(states) != len(config.states):
        raise _bad("two cell states share a name", "give every StateSpec a unique name")
    for s in config.states:
        if s.morphology is not None:
            m = s.morphology
            if m.radius_um <= 0 or m.elongation < 1 or m.intensity <= 0 or min(m.irregularity, m.texture, m.spots) < 0:
                raise _bad(f"state {s.name!r} has an invalid nucleus morphology {m}",
                           "use radius_um > 0, elongation >= 1, intensity > 0 and non-negative others")
        if not 0 <= s.vimentin <= 1:
            raise _bad(f"state {s.name!r} has vimentin {s.vimentin}; it must be in [0, 1]", "set vimentin in [0, 1]")
    targets: dict[str, str] = {}
    names = set()
    for t in config.transitions:
        if t.name in names:
            raise _bad(f"two transitions are named {t.name!r}", "give every TransitionSpec a unique name")
        names.add(t.name)
        if min(t.niche_strength, t.base_strength) < 0 or t.niche_radius_um <= 0:
            raise _bad(f"transition {t.name!r} has niche_strength {t.niche_strength}, base_strength "
                       f"{t.base_strength}, niche_radius_um {t.niche_radius_um}",
                       "use non-negative strengths (0 = no shift, 1 = the shift as declared) and niche_radius_um > 0")
        if t.niche_domain is not None and t.niche_domain not in {d.name for d in config.domains}:
            raise _bad(f"transition {t.name!r} names unknown niche_domain {t.niche_domain!r}",
                       "name one of the configured domains, or None")
        for role, state in (("control", t.control), ("target", t.target)):
            if state not in states:
                raise _bad(f"transition {t.name!r} names unknown {role} state {state!r}",
                           f"add a StateSpec named {state!r} or fix the transition")
        if states[t.control].lineage != states[t.target].lineage:
            raise _bad(f"transition {t.name!r} crosses lineages ({states[t.control].lineage} -> "
                       f"{states[t.target].lineage})", "control and target must share a lineage (paper appendix D.1)")
        if t.target in targets:
            raise _bad(f"state {t.target!r} is the target of two transitions", "derive each target from one control")
        if states[t.target].morphology is not None:
            raise _bad(f"state {t.target!r} is a transition target but declares its own morphology",
                       "set morphology=None on target states; the transition's shift defines it")
        targets[t.target] = t.control
    for s in config.states:
        if s.morphology is None and s.name not in targets:
            raise _bad(f"state {s.name!r} has no morphology and is no transition's target",
                       "give it a NucleusMorphology or make it the target of a TransitionSpec")
    # a target's control chain must end in a declared morphology
    for target in targets:
        seen, node = set(), target
        while node in targets:
            if node in seen:
                raise _bad(f"transitions form a cycle through {node!r}", "remove the cycle")
            seen.add(node)
            node = targets[node]

    matrix = [d for d in config.domains if d.pattern == "matrix"]
    if len(matrix) != 1:
        raise _bad(f"{len(matrix)} domains have pattern 'matrix'; exactly one must", "mark one domain as 'matrix'")
    painted = sum(d.area_fraction for d in config.domains if d.pattern != "matrix")
    if painted >= 0.95:
        raise _bad(f"the painted domains cover {painted:.2f} of the tissue, leaving no room for the matrix domain",
                   "lower the area_fraction of the blobs/bands domains")
    domain_names = set()
    for d in config.domains:
        if d.name in domain_names:
            raise _bad(f"two domains are named {d.name!r}", "give every DomainSpec a unique name")
        domain_names.add(d.name)
        if d.pattern not in ("matrix", "blobs", "bands"):
            raise _bad(f"domain {d.name!r} has unknown pattern {d.pattern!r}", "use 'matrix', 'blobs' or 'bands'")
        if d.pattern != "matrix" and not 0 < d.area_fraction < 1:
            raise _bad(f"domain {d.name!r} has area_fraction {d.area_fraction}", "use a fraction in (0, 1)")
        if d.length_scale_um <= 0 or not 0 < d.density_scale <= 1:
            raise _bad(f"domain {d.name!r} needs length_scale_um > 0 and density_scale in (0, 1]",
                       "fix the DomainSpec")
        if min(d.nucleus_size_scale, d.nucleus_intensity_scale, d.nucleus_texture_scale) <= 0 or d.background < 0:
            raise _bad(f"domain {d.name!r} has a non-positive appearance scale", "use positive scales")
        unknown = set(d.state_weights) - set(states)
        if unknown:
            raise _bad(f"domain {d.name!r} weights unknown states {sorted(unknown)}",
                       "use names of SimulationConfig.states")
        if sum(d.state_weights.values()) <= 0 or min(d.state_weights.values()) < 0:
            raise _bad(f"domain {d.name!r} has no positive state weight", "give it at least one positive weight")
