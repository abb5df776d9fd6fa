"""Benchmark the morphometry input of z_cell (`fusion.morphometry_residual`): what it costs.

Times one training step (masked forward with losses, backward, AdamW step) of a freshly
initialised model on a synthetic batch, with the morphometry input on and off (the same config
otherwise, the morphometry target on in both), and `morphometry_measures` of the batch alone.
Reports medians over `--steps` timed steps after warm-up, and the ratio of the step with the
input to the step without it (the cost a user pays for it). On CUDA it also embeds a small
batch (one tissue of 16 cells) on the CPU and on the GPU in float32 and reports the largest
difference of `z` (the CUDA path gives the same embedding).

Prints one JSON line. Needs only torch and spatia.model (no dataset):

    .venv/bin/python benchmarks/bench_morphometry.py --config tiny --threads 1
    python benchmarks/bench_morphometry.py --config base --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _sync, to_device  # noqa: E402


def _median_seconds(fn, device: str, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="tiny, base or a YAML file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--tissues", type=int, default=2, help="tissue regions per batch")
    parser.add_argument("--cells-per-tissue", type=int, default=64)
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from spatia.model import BatchSizes, SpatiaModel, load_config, synthetic_batch, synthetic_gene_symbols
    from spatia.model.morphometry import morphometry_measures

    torch.set_num_threads(args.threads)
    device = args.device
    base = load_config(args.config)
    sizes = BatchSizes(n_tissues=args.tissues, cells_per_tissue=args.cells_per_tissue, n_genes=args.genes)
    batch = to_device(synthetic_batch(base, sizes, seed=0), device)
    genes = synthetic_gene_symbols(args.genes)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())

    def step_time(morphometry_residual: bool) -> float:
        config = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion,
                                                                      morphometry_residual=morphometry_residual))
        torch.manual_seed(0)
        model = SpatiaModel(config, genes).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator(device=device).manual_seed(0)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(batch, generator=generator).losses["total"]
            loss.backward()
            optimizer.step()

        return _median_seconds(step, device, args.steps, args.warmup)

    with_input = step_time(True)
    without_input = step_time(False)
    measures_alone = _median_seconds(lambda: morphometry_measures(batch["cell_image"], batch["cell_mask"]),
                                     device, args.steps, args.warmup)
    n_cells = int(batch["cell_image"].shape[0])
    result = {
        "benchmark": "morphometry_input", "config": args.config, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "precision": args.precision, "threads": args.threads, "cells_per_batch": n_cells,
        "step_s_with_input": round(with_input, 5), "step_s_without_input": round(without_input, 5),
        "step_ratio_with_to_without": round(with_input / without_input, 4),
        "measures_s": round(measures_alone, 5),
        "measures_share_of_step": round(measures_alone / with_input, 4),
        "cells_per_s_with_input": round(n_cells / with_input, 1),
    }
    if device.startswith("cuda"):  # the same weights embed the same small batch on both devices (float32)
        torch.manual_seed(0)
        model = SpatiaModel(base, genes)
        small = synthetic_batch(base, BatchSizes(n_tissues=1, cells_per_tissue=16, n_genes=args.genes), seed=1)
        z_cpu = model.embed(small).z
        z_cuda = model.to(device).embed(to_device(small, device)).z.cpu()
        result["embed_max_abs_diff_cpu_vs_cuda"] = float((z_cpu - z_cuda).abs().max())
        result["embed_max_abs_z"] = float(z_cpu.abs().max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
