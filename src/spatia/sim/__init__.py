"""Ground-truth tissue simulator: Xenium-like bundles whose biology is known by design.

Entry point: `simulate_bundle(out_dir, config, seed) -> SimulationResult` (or `spatia simulate`).
The package writes bundles; reading them is `spatia.io`'s job (the simulator never reads).

Modules, by job:
- `config`: `SimulationConfig` and the designed world (domains, lineages, states, transitions);
- `tissue`: the domain map, cell placement and boundary shapes;
- `expression`: gene programs, the count model and clusterings;
- `image`: rendering the morphology channels and the z-stack;
- `writer`: the Xenium file formats (usable alone to write small or damaged test bundles);
- `segmentation`: the segmentation as ``cells.zarr.zip`` (XOA 2.x-4.x), when asked for;
- `bundle`: `simulate_bundle`, which ties them together and writes the ground truth.
See docs/simulator.md.
"""

from spatia.sim.bundle import GROUND_TRUTH_JSON, GROUND_TRUTH_TABLE, SimulationResult, simulate_bundle
from spatia.sim.config import (
    DomainSpec,
    MorphologyShift,
    NucleusMorphology,
    SimulationConfig,
    StateSpec,
    TransitionSpec,
    default_domains,
    default_lineage_programs,
    default_states,
    default_transitions,
)

__all__ = [
    "DomainSpec",
    "MorphologyShift",
    "NucleusMorphology",
    "SimulationConfig",
    "SimulationResult",
    "StateSpec",
    "TransitionSpec",
    "default_domains",
    "default_lineage_programs",
    "default_states",
    "default_transitions",
    "simulate_bundle",
    "GROUND_TRUTH_TABLE",
    "GROUND_TRUTH_JSON",
]
