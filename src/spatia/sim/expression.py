"""Expression model of the simulator: gene panel, programs, negative-binomial counts, clusters.

Model (per cell i in state s_i and domain d_i, gene g):

    mu_ig = size_factor_i * 2 ** (state_log2[s_i, g] + niche_log2[d_i, g])
    count_ig ~ NegativeBinomial(mean mu_ig, inverse dispersion theta)   (Gamma-Poisson)

state_log2[s] = gene baseline + lineage program + state program (+ transition DE genes for a
target state, on top of its control's row) + random lineage effects on filler genes.
niche_log2[d] raises the domain's niche genes. size_factor_i is proportional to the cell's
area (um^2), scaled so the mean expected transcripts per cell is `mean_transcripts_per_cell`.
So for a transition, E[count / size_factor] of a DE gene differs between target and control
cells by exactly 2 ** log2_fold_change (niche genes are never DE genes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from spatia.sim.config import ResolvedState, SimulationConfig, designed_genes
from spatia.sim.writer import (
    FEATURE_GENE,
    FEATURE_NEGATIVE_CODEWORD,
    FEATURE_NEGATIVE_PROBE,
    FEATURE_UNASSIGNED_CODEWORD,
)

_COUNT_CHUNK = 8192


@dataclass
class ExpressionModel:
    """The designed expression world.

    genes: gene names in panel order (alphabetical, as Xenium panels are);
    features: DataFrame id, name, feature_type of all features (genes first, then controls);
    state_log2: (n_states, n_genes) log2 expected counts per unit size factor;
    niche_log2: (n_domains, n_genes) additive log2 effect of each domain;
    filler_genes: the genes no program names; lineage_filler_log2: lineage -> {gene: effect}.
    """

    genes: list[str]
    features: pd.DataFrame
    state_log2: np.ndarray
    niche_log2: np.ndarray
    filler_genes: list[str]
    lineage_filler_log2: dict[str, dict[str, float]]
    baseline_log2: dict[str, float]

    @property
    def n_genes(self) -> int:
        return len(self.genes)


def _control_features(config: SimulationConfig, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(name, feature_type) of the negative controls, named and ordered as Xenium writes them."""
    n_probe, n_code, n_unassigned = (config.n_negative_control_probes, config.n_negative_control_codewords,
                                     config.n_unassigned_codewords)
    probes = np.sort(rng.choice(np.arange(1, max(n_probe * 2, 2) + 1), n_probe, replace=False))[::-1]
    unassigned = np.sort(rng.choice(np.arange(1, max(n_unassigned * 25, 2) + 1), n_unassigned, replace=False))
    features = [(f"NegControlProbe_{p:05d}", FEATURE_NEGATIVE_PROBE) for p in probes]
    features += [(f"NegControlCodeword_{500 + c:04d}", FEATURE_NEGATIVE_CODEWORD) for c in range(n_code)]
    features += [(f"UnassignedCodeword_{u:04d}", FEATURE_UNASSIGNED_CODEWORD) for u in unassigned]
    return features


def design_expression(
    config: SimulationConfig, states: tuple[ResolvedState, ...], rng: np.random.Generator
) -> ExpressionModel:
    """Build the panel and the per-state / per-domain log2 expression tables."""
    named = designed_genes(config)
    n_filler = config.n_genes - len(named)
    fillers = [f"SIM{i:04d}" for i in range(1, n_filler + 1)]
    genes = sorted(named + fillers)
    column = {g: j for j, g in enumerate(genes)}
    baseline = rng.normal(config.baseline_log2_mean, config.baseline_log2_sd, len(genes))

    lineages = sorted({s.lineage for s in states})
    lineage_filler: dict[str, dict[str, float]] = {}
    for lineage in lineages:
        chosen = np.array(fillers, dtype=object)[rng.random(len(fillers)) < config.filler_lineage_fraction]
        effects = rng.normal(0.0, config.filler_lineage_log2_sd, len(chosen))
        lineage_filler[lineage] = {g: float(e) for g, e in zip(chosen, effects)}

    state_log2 = np.tile(baseline, (len(states), 1))
    for row, state in enumerate(states):
        for gene, effect in state.program.items():
            state_log2[row, column[gene]] += effect
        for gene, effect in lineage_filler[state.lineage].items():
            state_log2[row, column[gene]] += effect
    niche_log2 = np.zeros((len(config.domains), len(genes)))
    for row, domain in enumerate(config.domains):
        for gene in domain.niche_genes:
            niche_log2[row, column[gene]] += domain.niche_log2fc

    controls = _control_features(config, rng)
    names = genes + [name for name, _ in controls]
    ids = [f"SIMG{j + 1:011d}" for j in range(len(genes))] + [name for name, _ in controls]
    types = [FEATURE_GENE] * len(genes) + [kind for _, kind in controls]
    features = pd.DataFrame({"id": ids, "name": names, "feature_type": types})
    return ExpressionModel(
        genes=genes,
        features=features,
        state_log2=state_log2,
        niche_log2=niche_log2,
        filler_genes=fillers,
        lineage_filler_log2=lineage_filler,
        baseline_log2={g: float(b) for g, b in zip(genes, baseline)},
    )


@dataclass
class SimulatedCounts:
    """counts: CSR (n_cells, n_features) int32 in the model's feature order; size_factor and
    expected_transcripts: (n_cells,) float64 (expected gene counts of each cell)."""

    counts: sparse.csr_matrix
    size_factor: np.ndarray
    expected_transcripts: np.ndarray


def simulate_counts(
    model: ExpressionModel,
    state: np.ndarray,
    domain: np.ndarray,
    cell_area_um2: np.ndarray,
    config: SimulationConfig,
    rng_for_chunk: Callable[[int], np.random.Generator],
) -> SimulatedCounts:
    """Negative-binomial gene counts and Poisson control counts for every cell."""
    n = len(state)
    area_rel = cell_area_um2 / cell_area_um2.mean()

    def unit_rows(start: int, stop: int) -> np.ndarray:  # expected counts at size factor 1
        return np.exp2(model.state_log2[state[start:stop]] + model.niche_log2[domain[start:stop]])

    # normaliser: mean over cells of the expected transcripts at size factor area_rel
    totals = np.empty(n)
    for start in range(0, n, _COUNT_CHUNK):
        stop = min(start + _COUNT_CHUNK, n)
        totals[start:stop] = unit_rows(start, stop).sum(axis=1)
    scale = config.mean_transcripts_per_cell / float(np.mean(totals * area_rel))
    size_factor = scale * area_rel
    n_controls = len(model.features) - model.n_genes
    control_rate = config.control_counts_per_cell / max(n_controls, 1)
    theta = config.nb_inverse_dispersion
    blocks = []
    for chunk, start in enumerate(range(0, n, _COUNT_CHUNK)):
        stop = min(start + _COUNT_CHUNK, n)
        rng = rng_for_chunk(chunk)
        mu = unit_rows(start, stop) * size_factor[start:stop, None]
        rate = rng.gamma(theta, mu / theta)
        genes = rng.poisson(rate).astype(np.int32)
        controls = rng.poisson(control_rate * area_rel[start:stop, None], (stop - start, n_controls)).astype(np.int32)
        blocks.append(sparse.csr_matrix(np.hstack([genes, controls])))
    counts = sparse.vstack(blocks, format="csr").astype(np.int32)
    counts.sort_indices()
    return SimulatedCounts(counts=counts, size_factor=size_factor, expected_transcripts=totals * size_factor)


def assign_clusters(
    cell_type: np.ndarray, transcript_counts: np.ndarray, n_types: int, config: SimulationConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Graph-clustering-like labels (int64, 1-based; 0 = no cluster) from the true cell type.

    Each type maps to a random cluster number; `cluster_label_noise` of the clustered cells get
    another random cluster; the `unclustered_fraction` of cells with the fewest transcripts
    get none, as 10x leaves low-count cells out of its clustering.
    """
    n = len(cell_type)
    cluster_of_type = rng.permutation(n_types) + 1
    cluster = cluster_of_type[cell_type].astype(np.int64)
    noisy = rng.random(n) < config.cluster_label_noise
    if n_types > 1:
        shift = rng.integers(1, n_types, n)  # a different cluster, uniformly
        cluster = np.where(noisy, (cluster - 1 + shift) % n_types + 1, cluster)
    n_out = int(round(config.unclustered_fraction * n))
    if n_out:
        lowest = np.argsort(transcript_counts, kind="stable")[:n_out]
        cluster[lowest] = 0
    return cluster
