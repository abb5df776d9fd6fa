"""Perturbation pairing: control -> target cell pairs by entropic optimal transport.

`pair_cells(adata, transitions, config) -> PairingResult` and `write_pairing(result, out_dir)`
(paper section 4.3 and appendix D); the solver is `spatia.perturb.sinkhorn`.
"""

from spatia.perturb.config import PairingConfig
from spatia.perturb.pairing import PAIR_COLUMNS, PairingResult, add_annotations, pair_cells, validate_inputs
from spatia.perturb.writing import plot_diagnostics, write_pairing
from spatia.perturb.signatures import Signatures, compute_signatures
from spatia.perturb.sinkhorn import BlockCost, SinkhornResult, SinkhornWarning, sinkhorn_log, summarize_plan
from spatia.perturb.transitions import (
    Transition,
    TransitionsFile,
    example_transitions_path,
    load_transitions,
    parse_transitions,
)

__all__ = [
    "PAIR_COLUMNS",
    "add_annotations",
    "BlockCost",
    "PairingConfig",
    "PairingResult",
    "Signatures",
    "SinkhornResult",
    "SinkhornWarning",
    "Transition",
    "TransitionsFile",
    "compute_signatures",
    "example_transitions_path",
    "load_transitions",
    "pair_cells",
    "parse_transitions",
    "plot_diagnostics",
    "sinkhorn_log",
    "summarize_plan",
    "validate_inputs",
    "write_pairing",
]
