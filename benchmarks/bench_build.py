"""Benchmark `spatia build`: cells/s end to end and peak memory for a simulated slide.

Simulates a Xenium bundle (100,000 cells by default; cached under --work so reruns skip it),
builds a MIST dataset from it with the CPU preset, and prints one JSON line:

    {"cells": ..., "seconds": ..., "cells_per_s": ..., "peak_rss_total_mb": ...,
     "peak_rss_main_mb": ..., "peak_rss_worker_mb": ..., "cpu_main_s": ..., "cpu_workers_s": ..., ...}

"seconds" covers the whole build (reading the bundle, planning, rendering, writing, indexing).
Peak memory is sampled every 20 ms over the process tree (main + workers, RSS summed; and the
largest worker alone); the kernel's high-water mark of the main process is reported too. CPU
seconds (main, workers) show the work done independently of how busy the machine is;
"idle_machine_bound_cells_per_s" is the best an idle machine could do with that CPU work (the
main process's CPU time, or all CPU time over the usable cores, whichever is longer): an upper
bound, reported beside the measured figure, never instead of it.

    .venv/bin/python benchmarks/bench_build.py --cells 100000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


class TreeMemory:
    """Samples the summed RSS of this process and all its descendants (and the largest single
    descendant). The kernel's own high-water mark of a spawned worker also counts the pages it
    shared with the parent between fork and exec, so it is not used, and such children are
    skipped while sampling."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_kb = 0
        self.peak_child_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = os.getpid()
        own_cmdline = _cmdline(root)
        while not self._stop.is_set():
            pids, stack = [], [root]
            while stack:
                pid = stack.pop()
                pids.append(pid)
                # a child that still runs our command line is between fork and exec: its pages
                # are ours, not new memory
                stack += [c for c in _children(pid) if _cmdline(c) != own_cmdline]
            rss = [_rss_kb(p) for p in pids]
            self.peak_kb = max(self.peak_kb, sum(rss))
            self.peak_child_kb = max([self.peak_child_kb, *rss[1:]])
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU time of this process, and of its finished children (pool workers)."""
    self_, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return self_.ru_utime + self_.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spatia_bench_build")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from spatia.console import configure
    from spatia.sim import SimulationConfig, simulate_bundle
    from spatia.mist import BuildConfig, build_dataset

    configure(quiet=True)
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.work / f"bundle_{args.cells}_seed{args.seed}"
    simulate_s = 0.0
    if not (bundle / "cells.parquet").exists():
        started = time.perf_counter()
        simulate_bundle(bundle, SimulationConfig(n_cells=args.cells), seed=args.seed)
        simulate_s = time.perf_counter() - started
    out = args.work / f"dataset_{args.preset}_{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig.from_preset(args.preset)
    try:
        cpu_before = _cpu_seconds()
        with TreeMemory() as memory:
            started = time.perf_counter()
            summary = build_dataset([bundle], out, config, seed=args.seed, workers=args.workers)
            seconds = time.perf_counter() - started
        cpu_after = _cpu_seconds()
        cpu_main, cpu_workers = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu = cpu_main + cpu_workers
        # on an otherwise idle machine the build cannot take less than its main process's CPU
        # time, nor less than all its CPU time spread over the cores it can use
        cores = min(os.cpu_count() or 1, args.workers + 1)
        idle_bound_s = max(cpu_main, cpu / cores)
        dataset_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "build",
                "preset": args.preset,
                "workers": args.workers,
                "cells_input": args.cells,
                "cells": summary.n_cells,
                "niches": summary.n_niches,
                "tissues": summary.n_tissues,
                "seconds": round(seconds, 2),
                "cells_per_s": round(summary.n_cells / seconds, 1),
                "peak_rss_total_mb": round(memory.peak_kb / 1024, 1),
                "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_rss_worker_mb": round(memory.peak_child_kb / 1024, 1),
                "cpu_main_s": round(cpu_main, 2),
                "cpu_workers_s": round(cpu_workers, 2),
                "cells_per_cpu_s": round(summary.n_cells / cpu, 1),
                "idle_machine_bound_cells_per_s": round(summary.n_cells / idle_bound_s, 1),
                "dataset_mb": round(dataset_mb, 1),
                "simulate_s": round(simulate_s, 1),
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "python": sys.version.split()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
