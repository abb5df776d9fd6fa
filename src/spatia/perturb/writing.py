"""Writing a pairing: pairs.parquet, signatures, pairing_config.json, diagnostics (JSON and PNG) and the
report (`spatia.perturb.report`)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatia.outputs import atomic_output, write_json
from spatia.perturb.pairing import CONFIG_FILE, DIAGNOSTICS_FILE, PAIRS_FILE, PLOT_FILE, PairingResult
from spatia.perturb.report import write_report


def write_pairing(result: PairingResult, out_dir: str | Path, adata=None) -> Path:
    """Write a new folder `out_dir` with the pairs, signatures, resolved config, diagnostics and report.

    pairs.parquet, signatures.parquet, signatures.npz, pairing_config.json (config +
    transitions), diagnostics.json (summary per transition + one row per problem),
    diagnostics.png, and the report: report.md, report.html, signature_genes.png and, when
    `adata` (the paired AnnData, for the positions of all cells) is given, pairs_map.png.
    Built under a temporary name and renamed when complete; an existing `out_dir` raises
    `OutputExistsError`.
    """
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        result.pairs.to_parquet(tmp / PAIRS_FILE, index=False)
        result.signatures.write(tmp)
        write_json(tmp / CONFIG_FILE, {
            "config": asdict(result.config),
            "transitions": [asdict(t) for t in result.transitions],
            "n_pcs_used": result.n_pcs_used,
            "target_sum": result.target_sum,
        })
        write_json(tmp / DIAGNOSTICS_FILE, {
            "n_pairs": len(result.pairs),
            "n_cells_without_counts": result.n_cells_without_counts,
            "transitions": result.summary(),
            "problems": _records(result.diagnostics),
        })
        plot_diagnostics(result, tmp / PLOT_FILE)
        write_report(result, tmp, adata)
    return out_dir


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-ready dicts (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def plot_diagnostics(result: PairingResult, path: str | Path) -> Path:
    """PNG with, per transition: match scores, control-target distances and target usage."""
    from matplotlib.figure import Figure  # no pyplot, so no backend switch in the user's session

    pairs = result.pairs
    names = [t.name for t in result.transitions]
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for name in names:
        p = pairs[pairs["transition_tag"] == name]
        if len(p) == 0:
            continue
        axes[0].hist(p["match_score"].to_numpy(), bins=30, range=(0, 1), histtype="step", label=name)
        axes[1].hist(p["spatial_distance_um"].to_numpy(), bins=30, histtype="step", label=name)
        uses = p["x_tgt_id"].value_counts().to_numpy()
        axes[2].hist(uses, bins=np.arange(1, uses.max() + 2) - 0.5, histtype="step", label=name)
    axes[0].set(title="match score P_ij / a_i of each pair", xlabel="match score", ylabel="pairs")
    axes[1].set(title="control-target distance", xlabel="um", ylabel="pairs")
    axes[2].set(title="controls per used target", xlabel="controls", ylabel="targets")
    summary = result.summary()
    lines = [f"{n}: {s['n_pairs']} pairs, distinct targets {(s['distinct_target_share'] or 0):.2f}, "
             f"max marginal err {(s['max_marginal_error'] or 0):.1e}" for n, s in summary.items()]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, family="monospace", va="bottom")
    axes[0].legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * len(lines), 1, 1))
    fig.savefig(path, dpi=110, format="png")
    return Path(path)
