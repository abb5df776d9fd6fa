"""Benchmark SPATIA pretraining: training cells/s and model FLOP/s as a fraction of this
machine's matmul peak, measured in the same run.

Simulates a Xenium bundle and builds a MIST dataset (cached under --work; the `cpu` preset for
configs with 64 px crops, `paper` for 224 px), then:

1. peak: the best dense matmul FLOP/s of this device with the same thread count (fp32; on CUDA
   also bf16), measured before and after the training loops;
2. model loop: pre-collated localised batches on the device, the real optimiser
   (`SpatiaPretrainModule.configure_optimizers`, AdamW) and gradient clipping, forward + backward
   + step, timed after warm-up steps. FLOPs per batch: matmuls and attention of the forward and
   backward pass of each batch used (`spatia.model.flop_counter`, torch's FLOP counter);
3. trainer loop: `spatia.train.pretrain` end to end (Lightning, data loading included), timed
   from the first step after warm-up to the last.

Also reported: `data_s_per_batch`, the seconds one process takes to read, decode and collate a
batch (the pre-collation above, no workers); `train_batches_per_epoch` (an epoch visits each
train region once, and the DataLoader's prefetch restarts at every epoch, so a small --cells
makes the trainer loop wait for data at each epoch start); `trainer_step_s_median` beside the
mean `trainer_step_s`; `trainer_num_workers` (--num-workers, default the config's); and on CUDA
the peak GPU memory of each loop (`torch.cuda.max_memory_allocated`, GiB):
`model_peak_gpu_mem_gib`, `trainer_peak_gpu_mem_gib`.

Prints one JSON line:

    {"config": "tiny", "device": "cpu", "precision": "32-true", "threads": 2, "cells_per_batch": ...,
     "model_step_s": ..., "model_cells_per_s": ..., "flops_per_batch": ..., "achieved_flops_per_s": ...,
     "peak_flops_per_s": ..., "fraction_of_peak": ..., "trainer_step_s": ..., "trainer_cells_per_s": ..., ...}

`fraction_of_peak` divides by the fp32 peak on CPU and by the bf16 peak under bf16-mixed on CUDA.

    .venv/bin/python benchmarks/bench_train.py --config tiny --threads 2
    .venv/bin/python benchmarks/bench_train.py --config base --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s of repeated square matmuls (the size that suits the device)."""
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        reps = 0
        _sync(device)
        start = time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            if reps % 4 == 0:
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed > seconds / 5:
                    break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ensure_dataset(work: Path, cells: int, preset: str, seed: int) -> Path:
    from spatia.sim import SimulationConfig, simulate_bundle
    from spatia.mist import BuildConfig, build_dataset

    work.mkdir(parents=True, exist_ok=True)
    bundle = work / f"bundle_{cells}_seed{seed}"
    if not bundle.exists():
        simulate_bundle(bundle, SimulationConfig(n_cells=cells), seed=seed)
    dataset = work / f"mist_{cells}_{preset}_seed{seed}"
    if not (dataset / "manifest.json").exists():
        if dataset.exists():
            shutil.rmtree(dataset)
        build_dataset([bundle], dataset, BuildConfig.from_preset(preset), seed=seed)
    return dataset


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="tiny, base or a YAML file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16-mixed on cuda, 32-true on cpu) or 32-true")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--tissues-per-batch", type=int, default=None)
    parser.add_argument("--cells-per-tissue", type=int, default=None)
    parser.add_argument("--cells", type=int, default=3000, help="cells of the simulated section")
    parser.add_argument("--stage", default="joint")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers of the trainer loop (default: the config's train.num_workers)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the end-to-end Lightning loop")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spatia_bench_train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import lightning as L

    from spatia.console import configure
    from spatia.mist import LocalizedBatchSampler, MultiScaleDataset, collate_multiscale
    from spatia.model import flop_counter, load_config
    from spatia.model.config import config_from_dict
    from spatia.train import SpatiaPretrainModule, pretrain
    from spatia.train.data import resolve_data_config
    from spatia.train.module import STAGES
    from spatia.train.pretrain import resolve_precision

    configure(quiet=True)
    torch.set_num_threads(args.threads)
    device = args.device
    config = load_config(args.config)
    data = config.to_dict()
    if args.tissues_per_batch:
        data["train"]["tissues_per_batch"] = args.tissues_per_batch
    if args.cells_per_tissue:
        data["train"]["cells_per_tissue"] = args.cells_per_tissue
    if args.num_workers is not None:
        data["train"]["num_workers"] = args.num_workers
    config = config_from_dict(data, source=config.name)
    precision = resolve_precision(args.precision, "gpu" if device.startswith("cuda") else "cpu")
    preset = "cpu" if config.image.cell_size_px == 64 else "paper"
    dataset = ensure_dataset(args.work, args.cells, preset, args.seed)
    config = resolve_data_config(config, dataset)  # the token cap and pixel statistics, as pretrain does

    # ---- batches (pre-collated) and their FLOPs
    ds = MultiScaleDataset(dataset, split="train")
    sampler = LocalizedBatchSampler(ds, config.train.tissues_per_batch, config.train.cells_per_tissue, args.seed)
    sampler.set_epoch(0)
    batches_per_epoch = sum(1 for _ in sampler)
    batches = []
    start = time.perf_counter()
    while len(batches) < args.steps + args.warmup:  # one process: reads, decoding, collation
        sampler.set_epoch(len(batches))
        batches += [collate_multiscale([ds[k] for k in keys]) for keys in sampler]
    data_seconds = (time.perf_counter() - start) / len(batches)
    batches = batches[: args.steps + args.warmup]
    levels = STAGES[args.stage].levels
    torch.manual_seed(args.seed)
    module = SpatiaPretrainModule(config, ds.genes, stage=args.stage, seed=args.seed).to(device)
    flops = []
    for i, b in enumerate(batches):  # forward + backward FLOPs of each batch, on the device
        counter = flop_counter()
        with counter:
            out = module.model(to_device(b, device), levels=levels,
                               generator=torch.Generator(device=device).manual_seed(i))
            out.losses["total"].backward()
        flops.append(int(counter.get_total_flops()))
        module.model.zero_grad(set_to_none=True)

    peak_before = {"fp32": matmul_peak(device, torch.float32)}
    if device.startswith("cuda"):
        peak_before["bf16"] = matmul_peak(device, torch.bfloat16)

    # ---- model loop
    optimizer = module.configure_optimizers()["optimizer"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision.startswith("bf16") and device.startswith("cuda") \
        else contextlib.nullcontext()
    params = module.trainable_parameters()
    device_batches = [to_device(b, device) for b in batches]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, batch in enumerate(device_batches):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            out = module.model(batch, levels=levels, generator=torch.Generator(device=device).manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip_norm)
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    memory = {}
    if cuda:
        memory["model_peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    timed = slice(args.warmup, None)
    model_seconds = sum(times[timed])
    cells = [len(b["cell_id"]) for b in batches]
    model_cells = sum(cells[timed])
    model_flops = sum(flops[timed])

    # ---- trainer loop (Lightning, data loading included)
    trainer_stats = {}
    if not args.no_trainer:
        class Timer(L.Callback):
            def __init__(self):
                self.start = None
                self.cells = 0
                self.steps = 0
                self.marks = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == args.warmup:
                    _sync(device)
                    self.start = time.perf_counter()
                if trainer.global_step >= args.warmup:
                    self.cells += len(batch["cell_id"])
                    self.steps += 1
                    self.marks.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                _sync(device)
                self.seconds = time.perf_counter() - self.start
                self.marks.append(self.start + self.seconds)

        timer = Timer()
        out_dir = args.work / f"run_{os.getpid()}"
        if cuda:
            del device_batches, out, optimizer
            module.cpu()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            pretrain(dataset, out_dir, config=config, stage=args.stage, seed=args.seed, threads=args.threads,
                     accelerator="gpu" if device.startswith("cuda") else "cpu", progress_bar=False,
                     train_overrides={"max_steps": args.warmup + args.steps, "val_batches": 0, "precision": precision,
                                      "checkpoint_every_n_steps": 10**6, "log_every_n_steps": 1},
                     callbacks=[timer])
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        trainer_stats = {"trainer_step_s": round(timer.seconds / timer.steps, 4),
                         "trainer_cells_per_s": round(timer.cells / timer.seconds, 1),
                         "trainer_step_s_median": round(float(np.median(np.diff(timer.marks))), 4),
                         "trainer_num_workers": config.train.num_workers}
        if cuda:
            memory["trainer_peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    peak_after = {"fp32": matmul_peak(device, torch.float32)}
    if device.startswith("cuda"):
        peak_after["bf16"] = matmul_peak(device, torch.bfloat16)
    peak_key = "bf16" if precision.startswith("bf16") and device.startswith("cuda") else "fp32"
    peak = max(peak_before[peak_key], peak_after[peak_key])
    achieved = model_flops / model_seconds
    print(json.dumps({
        "benchmark": "train",
        "config": config.name,
        "stage": args.stage,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "precision": precision,
        "threads": args.threads,
        "parameters": module.model.count_parameters(),
        "tissues_per_batch": config.train.tissues_per_batch,
        "cells_per_batch": round(model_cells / len(cells[timed]), 1),
        "timed_steps": len(cells[timed]),
        "model_step_s": round(model_seconds / len(cells[timed]), 4),
        "model_cells_per_s": round(model_cells / model_seconds, 1),
        "flops_per_batch": round(model_flops / len(cells[timed])),
        "achieved_flops_per_s": round(achieved),
        "peak_flops_per_s": round(peak),
        "peak_kind": f"{peak_key} matmul",
        "fraction_of_peak": round(achieved / peak, 3),
        "peak_fp32_flops_per_s": round(max(peak_before["fp32"], peak_after["fp32"])),
        "data_s_per_batch": round(data_seconds, 4),
        "train_batches_per_epoch": batches_per_epoch,
        **trainer_stats,
        **memory,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
