"""`spatia demo`: the whole pipeline on a simulated bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spatia.cli._app import QuietOption, SeedOption, app, configure_run


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist).")] = Path("demo_output"),
    cells: Annotated[int, typer.Option("--cells", help="Cells in the simulated bundle.")] = 5000,
    genes: Annotated[int, typer.Option("--genes", help="Gene panel size of the simulated bundle.")] = 300,
    pretrain_steps: Annotated[int, typer.Option("--pretrain-steps", help="Pretraining steps of the tiny model.")] = 400,
    evaluate_seeds: Annotated[int, typer.Option("--evaluate-seeds", help="Seeds per stochastic evaluation model.")] = 2,
    flow_preset: Annotated[
        str, typer.Option("--flow-preset", help="Flow step size: demo (minutes) or tiny (seconds; plumbing only).")
    ] = "demo",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Run the whole pipeline on a simulated Xenium bundle: simulate, read, build, pretrain, embed,
    evaluate, pair and flow.

    Every step writes what its own command writes, under OUT; demo_summary.json holds each step's figures.
    """
    from spatia.demo import DemoConfig, run_demo

    configure_run(quiet)
    run_demo(out, DemoConfig(n_cells=cells, n_genes=genes, pretrain_steps=pretrain_steps, evaluate_seeds=evaluate_seeds,
                                   flow_preset=flow_preset),
             seed=seed)
