"""Benchmark of the pairing solver against its peers: time, iterations, peak memory; one JSON line.

    .venv/bin/python benchmarks/bench_pair.py                    # 20,000^2 (ours + peers), 2,000^2 vs POT
    .venv/bin/python benchmarks/bench_pair.py --large 10000      # the quick mode quoted in docs/pairing.md
    .venv/bin/python benchmarks/bench_pair.py --compare 0 --large 0   # only the real section

The problem is the one `spatia pair` solves: two clouds of 50-D "PCA" points from a 12-cluster
mixture whose cluster weights differ between controls and targets, with 2-D positions (um)
clustered by the same labels on a 5 x 5 mm slide, and the default cost
C = ||x_i - y_j|| / rms + 0.1 * d_ij / 100 um, eps = 0.05 (uniform marginals).

Every solver runs in its own child process of this run (so each peak RSS is its own), one after
the other, so the ratios compare runs under the same machine load (printed before and after).
Every plan is checked the same way: its L1 column- and row-marginal errors, recomputed in
float32 from the cost and the returned potentials (`summarize_plan`).

--compare N: ours (`spatia.perturb.sinkhorn`, float32) and POT's dense
`ot.sinkhorn(..., method="sinkhorn_log")` (float64 numpy) each solve the N x N problem to the
same `--tol` (ours stops on the L1 norm of the column-marginal error, POT on its L2 norm: ours
is the stricter); plus the share of controls whose argmax agrees.
--large N: ours on the N x N problem under `--memory-mb` / `--block-mb`, and at the same size
  - POT's lazy `ot.bregman.empirical_sinkhorn(..., isLazy=True)` (log domain, cost recomputed
    in batches every iteration, float64 numpy). It only knows metric costs, so it solves the
    expression term alone (metric "euclidean" on x / rms; cheaper than ours per entry) and
    runs `--peer-iters` iterations: its figure is seconds per iteration (a full solve needs
    plain Sinkhorn's iteration count, several times ours: ours is over-relaxed).
  - geomloss `SamplesLoss("sinkhorn", p=1, blur=eps, debias=False, potentials=True,
    backend="tensorized")` with our exact cost as its `cost` function (pure PyTorch, dense
    n x m matrices; eps-scaling from the cost's diameter with `--geomloss-scaling`). It has no
    tolerance: its marginal errors are reported as measured. Skipped (with the reason) when
    geomloss is not installed (`pip install -e .[bench]`) or its three dense n x m float32
    matrices would exceed `--geomloss-max-mb`.
--real BUNDLE (default ../shared/data/xenium_bone_marrow_region1 when present): `pair_cells`
end to end on a real section, 10x graph clusters standing in for states (see `real_section`).
--device cuda: ours and geomloss on a GPU (same code; torch tensors on the device); peak GPU
memory is reported as torch.cuda.max_memory_allocated. The GPU check of issue 16:
    .venv/bin/python benchmarks/bench_pair.py --device cuda --compare 0 --real '' --peer-iters 0 \
        --memory-mb 8000 --block-mb 256 --geomloss-max-mb 40000

Peak memory is the child's ru_maxrss (the whole Python process: interpreter, numpy, torch);
"above_baseline" subtracts the RSS after imports and data generation.
"""

from __future__ import annotations

import argparse
import json
import math
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


def _cpu_s() -> float:
    """CPU seconds of this process so far (all threads): less sensitive than wall time to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cost(n: int, args: argparse.Namespace, **kwargs):
    import torch

    from spatia.perturb.sinkhorn import BlockCost

    x, y, px, py = make_problem(n, n)
    return BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=SPATIAL_WEIGHT, spatial_scale_um=SPATIAL_SCALE_UM,
                     dtype=kwargs.pop("dtype", torch.float32), **kwargs)


def _plan_check(n: int, args: argparse.Namespace, f: np.ndarray, g: np.ndarray) -> dict:
    """L1 column/row marginal errors and the argmax of the plan exp((f + g - C) / eps), from the cost."""
    from spatia.perturb.sinkhorn import SinkhornResult, summarize_plan

    cost = _cost(n, args, memory_mb=256.0)
    result = SinkhornResult(f=np.asarray(f, np.float64), g=np.asarray(g, np.float64), eps=args.eps, tol=args.tol,
                            n_iter=0, marginal_error=float("nan"), converged=False, omega=1.0, dtype="float32",
                            blocks=cost.n_blocks, cached_blocks=0)
    summary = summarize_plan(cost, result)
    return {"marginal_error_l1": _l1(summary.col_mass), "row_marginal_error_l1": _l1(summary.row_mass),
            "argmax": summary.target}


def _l1(mass: np.ndarray) -> float:
    return float(np.abs(mass - 1.0 / len(mass)).sum())


def worker_ours(n: int, args: argparse.Namespace) -> dict:
    import torch

    from spatia.perturb.sinkhorn import sinkhorn_log, summarize_plan

    device = torch.device(args.device)
    make_problem(n, n)
    baseline = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    cost = _cost(n, args, memory_mb=args.memory_mb, block_mb=args.block_mb, device=device)
    result = sinkhorn_log(cost, args.eps, tol=args.tol, max_iter=args.max_iter)
    if device.type == "cuda":
        torch.cuda.synchronize()
    solve_s, solve_cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    summary = summarize_plan(cost, result)
    total_s = time.perf_counter() - start
    out = {
        "device": str(device),
        "solve_s": round(solve_s, 2),
        "solve_cpu_s": round(solve_cpu_s, 1),
        "solve_and_assign_s": round(total_s, 2),
        "iterations": result.n_iter,
        "s_per_iteration": round(solve_s / max(result.n_iter, 1), 4),
        "kernel_absorptions": result.absorptions,
        "omega": round(result.omega, 3),
        "converged": result.converged,
        "marginal_error_l1": _l1(summary.col_mass),
        "row_marginal_error_l1": _l1(summary.row_mass),
        "memory_mb": args.memory_mb,
        "block_mb": args.block_mb,
        "cost_blocks": cost.n_blocks,
        "cached_blocks": cost.n_cached_blocks,
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
        "torch_threads": torch.get_num_threads(),
        "argmax": summary.target.tolist(),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def worker_pot(n: int, args: argparse.Namespace) -> dict:
    import warnings

    import ot
    import torch

    cost = _cost(n, args, dtype=torch.float64).dense()
    a, b = np.full(n, 1.0 / n), np.full(n, 1.0 / n)
    baseline = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.sinkhorn(a, b, cost, args.eps, method="sinkhorn_log", stopThr=args.tol,
                                numItermax=args.max_iter, log=True)
    solve_s = time.perf_counter() - start
    return {
        "solve_s": round(solve_s, 2),
        "solve_cpu_s": round(_cpu_s() - cpu, 1),
        "iterations": int(log["niter"]) + 1,
        "s_per_iteration": round(solve_s / (int(log["niter"]) + 1), 4),
        "converged": bool(log["err"][-1] < args.tol),
        "stop_error_l2": float(log["err"][-1]),
        "marginal_error_l1": _l1(plan.sum(0)),
        "row_marginal_error_l1": _l1(plan.sum(1)),
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
        "argmax": plan.argmax(1).tolist(),
    }


def worker_pot_lazy(n: int, args: argparse.Namespace) -> dict:
    """POT's lazy log-domain Sinkhorn on the expression term of the cost, `--peer-iters` iterations."""
    import warnings

    import ot

    from spatia.perturb.sinkhorn import rms_distance

    x, y, _, _ = make_problem(n, n)
    scale = rms_distance(x, y)
    xs, ys = x.astype(np.float64) / scale, y.astype(np.float64) / scale
    baseline = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, log = ot.bregman.empirical_sinkhorn(xs, ys, args.eps, metric="euclidean", numIterMax=args.peer_iters,
                                                  stopThr=args.tol, isLazy=True, batchSize=args.pot_batch, log=True)
    seconds = time.perf_counter() - start
    iterations = int(log["niter"]) + 1
    return {
        "cost": "expression term only: ||x_i - y_j|| / rms (POT's lazy solver takes a metric, not a cost)",
        "seconds": round(seconds, 2),
        "cpu_s": round(_cpu_s() - cpu, 1),
        "iterations_run": iterations,
        "s_per_iteration": round(seconds / iterations, 4),
        "batch_size": args.pot_batch,
        "last_error_l1_rows": float(log["err"][-1]) if log["err"] else None,
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
    }


def worker_geomloss(n: int, args: argparse.Namespace) -> dict:
    """geomloss's tensorized Sinkhorn (eps-scaling) on our exact cost; potentials checked like ours."""
    import torch
    from geomloss import SamplesLoss

    from spatia.perturb.sinkhorn import rms_distance

    x, y, px, py = make_problem(n, n)
    scale = rms_distance(x, y)
    d = x.shape[1]
    shift = x.mean(axis=0)
    origin = px.mean(axis=0)
    device = torch.device(args.device)
    xs = torch.as_tensor(np.hstack([(x - shift) / scale, px - origin]), dtype=torch.float32, device=device)
    ys = torch.as_tensor(np.hstack([(y - shift) / scale, py - origin]), dtype=torch.float32, device=device)

    def cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, M, D) -> (B, N, M)
        out = torch.cdist(a[..., :d], b[..., :d])
        return out.add_(torch.cdist(a[..., d:], b[..., d:]), alpha=SPATIAL_WEIGHT / SPATIAL_SCALE_UM)

    diameter = float(cost(xs[None], ys[None]).max()) if n <= 4000 else args.geomloss_diameter
    loss = SamplesLoss("sinkhorn", p=1, blur=args.eps, scaling=args.geomloss_scaling, diameter=diameter, cost=cost,
                       debias=False, potentials=True, backend="tensorized")
    baseline = _rss_mb()
    start, cpu = time.perf_counter(), _cpu_s()
    f_pot, g_pot = loss(xs, ys)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # geomloss's plan is a_i b_j exp((F_i + G_j - C_ij) / eps): ours with f = F + eps log a, g = G + eps log b
    f = f_pot.detach().double().cpu().numpy().ravel() - args.eps * np.log(n)
    g = g_pot.detach().double().cpu().numpy().ravel() - args.eps * np.log(n)
    steps = math.ceil(math.log(diameter / args.eps) / -math.log(args.geomloss_scaling)) + 2
    out = {
        "cost": "ours (custom cost function)",
        "device": str(device),
        "seconds": round(seconds, 2),
        "cpu_s": round(_cpu_s() - cpu, 1),
        "scaling": args.geomloss_scaling,
        "diameter": round(diameter, 3),
        "eps_steps_about": steps,
        "peak_rss_mb": round(_rss_mb(), 1),
        "peak_rss_above_baseline_mb": round(_rss_mb() - baseline, 1),
    }
    out.update(_plan_check(n, args, f, g))
    out["argmax"] = out["argmax"].tolist()
    return out


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


WORKERS = {"ours": worker_ours, "pot": worker_pot, "pot_lazy": worker_pot_lazy, "geomloss": worker_geomloss}
_FORWARDED = ("eps", "tol", "max_iter", "memory_mb", "block_mb", "device", "peer_iters", "pot_batch",
              "geomloss_scaling", "geomloss_diameter")


def _child(kind: str, args: argparse.Namespace, n: int) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--n", str(n)]
    for name in _FORWARDED:
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(a: list, b: list) -> float:
    return round(float(np.mean(np.asarray(a) == np.asarray(b))), 4)


def large(args: argparse.Namespace, n: int) -> dict:
    """Ours at n x n and the lazy / GPU-style peers at the same size, with ratios."""
    ours = _child("ours", args, n)
    argmax = ours.pop("argmax")
    out: dict = {"full_cost_matrix_mb_float32": round(n * n * 4 / 2**20, 1), "ours": ours}
    if args.peer_iters > 0:
        lazy = _child("pot_lazy", args, n)
        out["pot_empirical_sinkhorn_lazy"] = lazy
        out["per_iteration_speedup_vs_pot_lazy"] = round(lazy["s_per_iteration"] / ours["s_per_iteration"], 2)
        if "cpu_s" in lazy and "solve_cpu_s" in ours:  # CPU seconds: less sensitive to other load
            out["per_iteration_cpu_speedup_vs_pot_lazy"] = round(
                (lazy["cpu_s"] / lazy["iterations_run"]) / (ours["solve_cpu_s"] / max(ours["iterations"], 1)), 2)
    try:
        import geomloss  # noqa: F401
        dense_mb = 3 * n * n * 4 / 2**20
        skip = None if dense_mb <= args.geomloss_max_mb else (
            f"its tensorized backend holds ~3 dense n x m float32 matrices ({dense_mb:.0f} MB) "
            f"> --geomloss-max-mb {args.geomloss_max_mb:.0f}")
    except ImportError:
        skip = "geomloss is not installed (pip install -e .[bench])"
    if skip is None:
        geo = _child("geomloss", args, n)
        out["geomloss_tensorized"] = geo
        out["speedup_vs_geomloss"] = round(geo["seconds"] / ours["solve_s"], 2)
        if "cpu_s" in geo and "solve_cpu_s" in ours:
            out["cpu_speedup_vs_geomloss"] = round(geo["cpu_s"] / ours["solve_cpu_s"], 2)
        out["peak_rss_ratio_geomloss_over_ours"] = round(geo["peak_rss_mb"] / ours["peak_rss_mb"], 2)
        out["argmax_agreement_with_geomloss"] = _agreement(argmax, geo.pop("argmax"))
    else:
        out["geomloss_tensorized"] = {"skipped": skip}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=int, default=2000, help="size of the ours-vs-POT-dense problem (0: skip)")
    parser.add_argument("--large", type=int, default=20000, help="size of the large problem, ours + peers (0: skip)")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--memory-mb", type=float, default=1600.0,
                        help="ours: cost-cache budget (1,600 MB holds all of 20,000^2 with 16 MB blocks)")
    parser.add_argument("--block-mb", type=float, default=16.0)
    parser.add_argument("--device", default="cpu", help="ours and geomloss: torch device (cpu, cuda)")
    parser.add_argument("--peer-iters", type=int, default=3, help="iterations of POT's lazy solver (0: skip it)")
    parser.add_argument("--pot-batch", type=int, default=1000, help="POT lazy batch size (rows per cost block)")
    parser.add_argument("--geomloss-scaling", type=float, default=0.9)
    parser.add_argument("--geomloss-diameter", type=float, default=12.0,
                        help="upper bound of the cost for geomloss's eps-scaling above 4,000 points")
    parser.add_argument("--geomloss-max-mb", type=float, default=4096.0)
    default_real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                "xenium_bone_marrow_region1")
    parser.add_argument("--real", default=default_real if os.path.isdir(default_real) else "",
                        help="a real Xenium bundle to pair end to end ('' to skip)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.n, args)))
        return

    report: dict = {
        "benchmark": "pair", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "eps": args.eps,
        "tol": args.tol, "spatial_weight": SPATIAL_WEIGHT, "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
    }
    if args.large:
        report[f"large_{args.large}"] = large(args, args.large)
    if args.compare:
        ours = _child("ours", args, args.compare)
        pot = _child("pot", args, args.compare)
        agreement = _agreement(ours.pop("argmax"), pot.pop("argmax"))
        report[f"compare_{args.compare}"] = {
            "ours": ours,
            "pot_sinkhorn_log": pot,
            "speedup_solve": round(pot["solve_s"] / ours["solve_s"], 2),
            "cpu_speedup_solve": round(pot["solve_cpu_s"] / ours["solve_cpu_s"], 2),
            "speedup_per_iteration": round(pot["s_per_iteration"] / ours["s_per_iteration"], 2),
            "peak_rss_ratio_pot_over_ours": round(pot["peak_rss_mb"] / ours["peak_rss_mb"], 2),
            "argmax_agreement": agreement,
        }
    if args.real:
        report["real"] = real_section(args.real)
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
