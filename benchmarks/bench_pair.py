"""Benchmark of the pairing solver: time and peak memory, ours against POT, one JSON line.

    .venv/bin/python benchmarks/bench_pair.py                      # 5,000^2 (ours vs POT) and 20,000^2 (ours)
    .venv/bin/python benchmarks/bench_pair.py --compare 1000 --large 4000   # a quick smoke run
    .venv/bin/python benchmarks/bench_pair.py --compare 0 --large 0          # only the real section

The problem is the one `spatia pair` solves: two clouds of 50-D "PCA" points from a 12-cluster
mixture whose cluster weights differ between controls and targets, with 2-D positions (um)
clustered by the same labels on a 5 x 5 mm slide, and the default cost
C = ||x_i - y_j|| / rms + 0.1 * d_ij / 100 um, eps = 0.05 (uniform marginals).

--compare N: ours (`spatia.perturb.sinkhorn`, float32, blockwise, over-relaxed) and POT's
`ot.sinkhorn(..., method="sinkhorn_log")` (float64 numpy, on the same dense cost) each solve
the N x N problem to the same `--tol`, in separate child processes of this run (so each one's
peak RSS is its own). The tolerance means the same number for both but ours is stricter: ours
stops on the L1 norm of the column-marginal error, POT on its L2 norm (L1 >= L2), and ours
tests every plan it returns. Each child reports its solve time (ours includes computing the
cost from the coordinates; POT's excludes building its dense matrix), iterations, the final
L1 marginal error measured the same way for both, and the row-wise argmax (compared here).
--large N: ours only, N x N under the default 1,024 MB cost budget (never the whole matrix).

--real BUNDLE (default ../shared/data/xenium_bone_marrow_region1 when present): `pair_cells`
end to end on a real section, 10x graph clusters standing in for states (see `real_section`).

Peak memory is the child's ru_maxrss (the whole Python process: interpreter, numpy, torch);
"above_baseline" subtracts the RSS after imports and data generation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

SPATIAL_WEIGHT = 0.1
SPATIAL_SCALE_UM = 100.0


def make_problem(n: int, m: int, seed: int = 0, d: int = 50, k: int = 12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 1.5
    spots = rng.uniform(0, 5000, (k, 2))

    def cloud(size: int, weights: np.ndarray):
        label = rng.choice(k, size, p=weights)
        return centers[label] + rng.normal(size=(size, d)), spots[label] + rng.normal(size=(size, 2)) * 600

    x, px = cloud(n, rng.dirichlet(np.full(k, 2.0)))
    y, py = cloud(m, rng.dirichlet(np.full(k, 2.0)))
    return x.astype(np.float32), y.astype(np.float32), px, py


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _l1_col_error(col_mass: np.ndarray) -> float:
    return float(np.abs(col_mass - 1.0 / len(col_mass)).sum())


def worker_ours(n: int, eps: float, tol: float, max_iter: int, memory_mb: float) -> dict:
    import torch

    from spatia.perturb.sinkhorn import BlockCost, sinkhorn_log, summarize_plan

    x, y, px, py = make_problem(n, n)
    baseline = _rss_mb()
    start = time.perf_counter()
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=SPATIAL_WEIGHT, spatial_scale_um=SPATIAL_SCALE_UM,
                     dtype=torch.float32, memory_mb=memory_mb)
    result = sinkhorn_log(cost, eps, tol=tol, max_iter=max_iter)
    solve_s = time.perf_counter() - start
    summary = summarize_plan(cost, result)
    total_s = time.perf_counter() - start
    return {
        "solve_s": round(solve_s, 2),
        "solve_and_assign_s": round(total_s, 2),
        "iterations": result.n_iter,
        "s_per_iteration": round(solve_s / max(result.n_iter, 1), 4),
        "omega": round(result.omega, 3),
        "converged": result.converged,
        "marginal_error_l1": _l1_col_error(summary.col_mass),
        "cost_blocks": cost.n_blocks,
        "cached_blocks": cost.n_cached_blocks,
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
        "torch_threads": torch.get_num_threads(),
        "argmax": summary.target.tolist(),
    }


def worker_pot(n: int, eps: float, tol: float, max_iter: int) -> dict:
    import warnings

    import ot
    import torch

    from spatia.perturb.sinkhorn import BlockCost

    x, y, px, py = make_problem(n, n)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=SPATIAL_WEIGHT, spatial_scale_um=SPATIAL_SCALE_UM,
                     dtype=torch.float64).dense()
    a, b = np.full(n, 1.0 / n), np.full(n, 1.0 / n)
    baseline = _rss_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", stopThr=tol, numItermax=max_iter, log=True)
    solve_s = time.perf_counter() - start
    return {
        "solve_s": round(solve_s, 2),
        "iterations": int(log["niter"]) + 1,
        "s_per_iteration": round(solve_s / (int(log["niter"]) + 1), 4),
        "converged": bool(log["err"][-1] < tol),
        "stop_error_l2": float(log["err"][-1]),
        "marginal_error_l1": _l1_col_error(plan.sum(0)),
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
        "argmax": plan.argmax(1).tolist(),
    }


def real_section(bundle: str, seed: int = 0) -> dict:
    """`pair_cells` end to end on a real Xenium section, graph clusters standing in for states.

    The section has no annotated transitions: the three largest pairs of 10x graph clusters
    (1 -> 3, 2 -> 4, 5 -> 6) are paired as if they were transitions of one lineage, to time the
    whole pipeline (reading excluded) on real, sparse counts.
    """
    from spatia.io.xenium import read_xenium
    from spatia.perturb import PairingConfig, Transition, pair_cells

    adata = read_xenium(bundle).to_anndata()
    adata.obs["lineage"] = "all"
    adata.obs["cluster"] = adata.obs["gene_expression_graphclust"].astype("string")
    transitions = [Transition(f"c{a}_to_c{b}", "clusters", str(a), str(b), "all") for a, b in ((1, 3), (2, 4), (5, 6))]
    start = time.perf_counter()
    result = pair_cells(adata, transitions, PairingConfig(state_key="cluster", seed=seed))
    seconds = time.perf_counter() - start
    d = result.diagnostics
    return {
        "bundle": os.path.basename(bundle.rstrip("/")),
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "pair_cells_s": round(seconds, 2),
        "pairs": len(result.pairs),
        "problems": [
            {"transition": r.transition_tag, "n_ctrl": r.n_ctrl, "n_tgt": r.n_tgt, "iterations": r.n_iter,
             "marginal_error_l1": r.marginal_error, "converged": bool(r.converged), "seconds": round(r.seconds, 3),
             "distinct_target_share": round(r.distinct_target_share, 3),
             "median_distance_um": round(r.median_spatial_distance_um, 1)}
            for r in d.itertuples()
        ],
    }


def _child(kind: str, args: argparse.Namespace, n: int) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--eps", str(args.eps), "--tol",
               str(args.tol), "--max-iter", str(args.max_iter), "--memory-mb", str(args.memory_mb)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=int, default=5000, help="size of the ours-vs-POT problem (0: skip)")
    parser.add_argument("--large", type=int, default=20000, help="size of the ours-only problem (0: skip)")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--memory-mb", type=float, default=1024.0)
    default_real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                "xenium_bone_marrow_region1")
    parser.add_argument("--real", default=default_real if os.path.isdir(default_real) else "",
                        help="a real Xenium bundle to pair end to end ('' to skip)")
    parser.add_argument("--worker", choices=("ours", "pot"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "ours":
        print(json.dumps(worker_ours(args.n, args.eps, args.tol, args.max_iter, args.memory_mb)))
        return
    if args.worker == "pot":
        print(json.dumps(worker_pot(args.n, args.eps, args.tol, args.max_iter)))
        return

    report: dict = {
        "benchmark": "pair", "eps": args.eps, "tol": args.tol, "spatial_weight": SPATIAL_WEIGHT,
        "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }
    if args.compare:
        ours = _child("ours", args, args.compare)
        pot = _child("pot", args, args.compare)
        agreement = float(np.mean(np.asarray(ours.pop("argmax")) == np.asarray(pot.pop("argmax"))))
        report[f"compare_{args.compare}"] = {
            "ours": ours,
            "pot_sinkhorn_log": pot,
            "speedup_solve": round(pot["solve_s"] / ours["solve_s"], 2),
            "speedup_per_iteration": round(pot["s_per_iteration"] / ours["s_per_iteration"], 2),
            "peak_rss_ratio_pot_over_ours": round(pot["peak_rss_mb"] / ours["peak_rss_mb"], 2),
            "argmax_agreement": round(agreement, 4),
        }
    if args.large:
        large = _child("ours", args, args.large)
        large.pop("argmax")
        large["full_cost_matrix_mb"] = round(args.large * args.large * 4 / 2**20, 1)
        report[f"large_{args.large}"] = large
    if args.real:
        report["real"] = real_section(args.real)
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
