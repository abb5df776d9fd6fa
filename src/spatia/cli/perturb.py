"""`spatia pair`: control-to-target pairs by entropic optimal transport."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run
from spatia.console import console


@app.command("pair")
def pair_command(
    cells: Annotated[Path, typer.Argument(help="AnnData (.h5ad): raw counts, state/lineage obs columns, obsm spatial in um.")],
    transitions: Annotated[
        str, typer.Option("--transitions", "-t", help="Transitions YAML file, or a shipped example: simulated, breast_cancer.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for pairs and signatures (must not exist).")],
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="Table with a cell_id column joined into obs first (e.g. ground_truth.parquet).")
    ] = None,
    state_key: Annotated[str | None, typer.Option("--state-key", help="obs column of the cell state; default: the transitions file's, else 'state'.")] = None,
    lineage_key: Annotated[str | None, typer.Option("--lineage-key", help="obs column of the lineage; default: the transitions file's, else 'lineage'.")] = None,
    niche_key: Annotated[str | None, typer.Option("--niche-key", help="obs column of the niche type (e.g. domain); default: the transitions file's.")] = None,
    slide_key: Annotated[str | None, typer.Option("--slide-key", help="obs column of the slide; pairs never cross slides; default: the transitions file's.")] = None,
    patient_key: Annotated[str | None, typer.Option("--patient-key", help="obs column of the patient; default: the transitions file's.")] = None,
    counts_layer: Annotated[str | None, typer.Option("--counts-layer", help="Layer with raw counts; default: layers['counts'] if present, else X.")] = None,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Entropic regularisation, relative to the RMS expression distance.")] = 0.05,
    tol: Annotated[float, typer.Option("--tol", help="Stop when the L1 marginal error is below this.")] = 1e-5,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Sinkhorn iteration limit (warns when reached).")] = 5000,
    n_pcs: Annotated[int, typer.Option("--n-pcs", help="Principal components of the expression space.")] = 50,
    theta_min: Annotated[int, typer.Option("--theta-min", help="Minimum cells per state within the lineage.")] = 50,
    spatial_weight: Annotated[float, typer.Option("--spatial-weight", help="Weight of the spatial cost term (0: off).")] = 0.1,
    spatial_scale_um: Annotated[float, typer.Option("--spatial-scale-um", help="Distance that costs spatial-weight (um).")] = 100.0,
    max_distance_um: Annotated[float | None, typer.Option("--max-distance-um", help="Never pair cells farther apart (um).")] = None,
    same_niche: Annotated[bool, typer.Option("--same-niche", help="Pair only within the same niche type.", metavar="")] = False,
    pair_noise: Annotated[float, typer.Option("--pair-noise", help="Fraction of pairs whose targets are swapped (Table 5 ablation).")] = 0.0,
    float64: Annotated[bool, typer.Option("--float64", help="Sinkhorn in float64 instead of float32.", metavar="")] = False,
    memory_mb: Annotated[float, typer.Option("--memory-mb", help="Memory budget of each OT problem's cost blocks (MB).")] = 1600.0,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Pair control and target cells of each transition by entropic optimal transport.

    Writes OUT/pairs.parquet (x_ctrl_id, x_tgt_id, state_A, state_B, cell_type, niche_ctrl,
    niche_tgt, transition_tag, task_name, patient_id, slide_id, spatial_distance_um,
    match_score, noise_swapped), signatures.parquet and .npz (Delta g per transition and gene),
    pairing_config.json, diagnostics.json, diagnostics.png and the run record spatia_run.json.
    """
    from spatia import stages
    from spatia.config import load_config
    from spatia.perturb import PairingConfig

    configure_run(quiet)
    config = load_config(PairingConfig, overrides={
        "state_key": state_key, "lineage_key": lineage_key, "niche_key": niche_key, "slide_key": slide_key,
        "patient_key": patient_key, "counts_layer": counts_layer, "epsilon": epsilon, "tol": tol, "max_iter": max_iter,
        "n_pcs": n_pcs, "theta_min": theta_min, "spatial_weight": spatial_weight, "spatial_scale_um": spatial_scale_um,
        "max_distance_um": max_distance_um, "same_niche": same_niche, "pair_noise": pair_noise, "seed": seed,
        "dtype": "float64" if float64 else "float32", "memory_mb": memory_mb})
    result = stages.pair(cells, out, config, transitions=transitions, annotations=annotations)
    for name, row in result.detail.summary().items():
        console.print(
            f"{name}: {row['n_pairs']:,} pairs ({row['n_ctrl_unmatched']} controls unpaired), "
            f"distinct targets {row['distinct_target_share'] or 0:.2f}, "
            f"max marginal error {row['max_marginal_error'] or 0:.1e}"
            + ("" if row["all_converged"] in (True, None) else " [NOT CONVERGED]"),
            highlight=False,
        )
    console.print(f"wrote {out}: {len(result.detail.pairs):,} pairs", highlight=False)
