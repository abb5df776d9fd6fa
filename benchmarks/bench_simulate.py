"""Benchmark `spatia simulate`: wall time, peak RSS and output size for 5k, 20k and 100k cells.

Each size runs in a fresh Python process (so peak RSS is that run's own) writing into a
temporary folder that is deleted afterwards. Prints one JSON line per size:

    .venv/bin/python benchmarks/bench_simulate.py                 # 5000 20000 100000 cells
    .venv/bin/python benchmarks/bench_simulate.py --cells 5000 --layout v2 --z-planes 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(n_cells: int, layout: str, z_planes: int, seed: int) -> dict:
    from spatia.console import configure
    from spatia.sim import SimulationConfig, simulate_bundle

    configure(quiet=True)
    with tempfile.TemporaryDirectory(prefix="bench_simulate_") as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = simulate_bundle(Path(tmp) / "bundle", SimulationConfig(n_cells=n_cells, layout=layout,
                                                                        z_planes=z_planes), seed=seed)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        size = sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file())
    return {
        "benchmark": "simulate",
        "n_cells": n_cells,
        "layout": layout,
        "z_planes": z_planes,
        "image_px": [result.height_px, result.width_px],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # steadier than wall time on a shared machine
        "cells_per_second": round(n_cells / seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "output_mb": round(size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[5_000, 20_000, 100_000])
    parser.add_argument("--layout", default="v1", choices=["v1", "v2"])
    parser.add_argument("--z-planes", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.cells[0], args.layout, args.z_planes, args.seed)), flush=True)
        return
    for n in args.cells:
        command = [sys.executable, __file__, "--one", "--cells", str(n), "--layout", args.layout,
                   "--z-planes", str(args.z_planes), "--seed", str(args.seed)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(json.dumps({"benchmark": "simulate", "n_cells": n, "error": child.stderr.strip()[-2000:]}))
            continue
        print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
