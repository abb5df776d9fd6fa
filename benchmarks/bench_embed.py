"""Benchmark `spatia embed`: cells/s end to end, and the model forward alone.

Simulates a Xenium bundle and builds a MIST dataset (cached under --work, shared with
bench_train.py), then embeds every cell with a freshly initialised model of the config (the
speed does not depend on the weights):

- `cells_per_s`: `spatia.train.embed_model` end to end (Lightning predict, LMDB reads and
  decoding, collation, the forward, assembling the AnnData), without writing the file;
- `model_cells_per_s`: `SpatiaModel.embed` alone on pre-collated batches (whole tissue regions);
- `achieved_flops_per_s` / `fraction_of_peak`: embedding FLOPs (torch's FLOP counter) over the
  model-only time, against the best matmul FLOP/s of this device measured in the same run;
- `orientation_cost_ratio`: the model-only time with the config's `image.embed_orientations`
  (8: the mean over the crop's eight orientations) over the time of one pass (1), same batches.

Prints one JSON line. Target for tiny on the 2-core CPU: at least 200 cells/s end to end.

    .venv/bin/python benchmarks/bench_embed.py --config tiny --threads 1
    .venv/bin/python benchmarks/bench_embed.py --config base --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _sync, ensure_dataset, matmul_peak, to_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="tiny, base or a YAML file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--batch-cells", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the end-to-end run")
    parser.add_argument("--cells", type=int, default=3000, help="cells of the simulated section")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spatia_bench_train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="where the end-to-end time goes: cProfile's top functions of the first run, and a "
                             "second end-to-end run (a cost only the first pays is process warm-up)")
    args = parser.parse_args()

    from spatia.console import configure
    from spatia.mist import MultiScaleDataset
    from spatia.model import SpatiaModel, flop_counter, load_config
    from spatia.train.data import resolve_data_config
    from spatia.train import embed_model, embedding_batches
    from spatia.train.data import EmbeddingDataset
    from spatia.train.pretrain import resolve_precision

    configure(quiet=True)
    torch.set_num_threads(args.threads)
    device = args.device
    config = load_config(args.config)
    precision = resolve_precision(args.precision, "gpu" if device.startswith("cuda") else "cpu")
    preset = "cpu" if config.image.cell_size_px == 64 else "paper"
    dataset = ensure_dataset(args.work, args.cells, preset, args.seed)
    config = resolve_data_config(config, dataset)  # the token cap and pixel statistics, as pretrain does
    genes = MultiScaleDataset(dataset, split=None).genes
    torch.manual_seed(args.seed)
    model = SpatiaModel(config, genes).to(device)

    peak = matmul_peak(device, torch.float32)
    peak_bf16 = matmul_peak(device, torch.bfloat16) if device.startswith("cuda") else None

    # ---- end to end
    def end_to_end_run():
        return embed_model(dataset, model, None, batch_cells=args.batch_cells, accelerator="gpu" if device.startswith(
            "cuda") else "cpu", precision=precision, threads=args.threads, num_workers=args.workers, progress_bar=False)

    profile_report = {}
    start = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(end_to_end_run)
        end_to_end = time.perf_counter() - start
        stats = pstats.Stats(profiler)
        rows = sorted(((cum, f"{Path(file).name}:{line}({name})") for (file, line, name), (_, _, _, cum, _)
                       in stats.stats.items()), reverse=True)
        profile_report["profile_top_cumulative_s"] = [[where, round(cum, 2)] for cum, where in rows[:25]]
        start = time.perf_counter()
        end_to_end_run()
        profile_report["second_run_seconds"] = round(time.perf_counter() - start, 2)
    else:
        result = end_to_end_run()
        end_to_end = time.perf_counter() - start

    # ---- model only, on pre-collated batches
    context = MultiScaleDataset(dataset, split=None)
    plans = embedding_batches(context, np.ones(len(context.cell_index), dtype=bool), args.batch_cells)
    items = EmbeddingDataset(context, plans)
    batches = []
    for i in range(len(items)):
        batch = items[i]
        batch.pop("keep")
        batch.pop("cell_row")
        batches.append(to_device(batch, device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision.startswith("bf16") and device.startswith("cuda") \
        else contextlib.nullcontext()
    with autocast:
        model.embed(batches[0])  # warm-up
        counter = flop_counter()
        with counter:
            for batch in batches:
                model.embed(batch)
        flops = counter.get_total_flops()
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            model.embed(batch)
        _sync(device)
        model_seconds = time.perf_counter() - start
        orientations = model.config.image.embed_orientations
        model.config.image.embed_orientations = 1
        start = time.perf_counter()
        for batch in batches:
            model.embed(batch)
        _sync(device)
        one_pass_seconds = time.perf_counter() - start
        model.config.image.embed_orientations = orientations
    n_cells = sum(len(b["cell_id"]) for b in batches)
    use_peak = peak_bf16 if precision.startswith("bf16") and peak_bf16 else max(peak, matmul_peak(device, torch.float32))
    print(json.dumps({
        "benchmark": "embed",
        "config": config.name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "precision": precision,
        "threads": args.threads,
        "cells": result.n_cells,
        "batches": len(batches),
        "seconds": round(end_to_end, 2),
        "cells_per_s": round(result.n_cells / end_to_end, 1),
        "model_seconds": round(model_seconds, 3),
        "orientations": orientations,
        "model_seconds_one_orientation": round(one_pass_seconds, 3),
        "orientation_cost_ratio": round(model_seconds / one_pass_seconds, 2),
        "model_cells_per_s": round(n_cells / model_seconds, 1),
        "flops_per_cell": round(flops / n_cells),
        "achieved_flops_per_s": round(flops / model_seconds),
        "peak_flops_per_s": round(use_peak),
        "fraction_of_peak": round(flops / model_seconds / use_peak, 3),
        **({"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if device.startswith("cuda") else {}),
        **profile_report,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
