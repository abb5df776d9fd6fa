"""Model FLOPs of one training (or embedding) batch, counted by `torch.utils.flop_counter`.

The count covers matrix multiplications and attention (what the FLOP/s-vs-peak figure is
about), measured by running the model once on a synthetic batch of the given composition.
The number of gene tokens depends on the data (nonzero genes per cell), so the synthetic
batch's expression sparsity stands in for a real one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from spatia.model.config import SpatiaConfig
from spatia.model.spatia import LEVELS, SpatiaModel
from spatia.model.synthetic import BatchSizes, synthetic_batch, synthetic_gene_symbols


def _attention_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter leaves out."""
    aten = torch.ops.aten
    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _attention_forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts attention run by the CPU kernels."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


def flops_per_batch(config: SpatiaConfig, batch_sizes: BatchSizes | None = None, *, backward: bool = True,
                    levels: Sequence[str] = LEVELS, model: SpatiaModel | None = None,
                    batch: dict | None = None, seed: int = 0) -> int:
    """FLOPs of one forward (+ backward when `backward`) pass.

    Uses `batch` when given, else a `synthetic_batch(config, batch_sizes, seed=seed)`; uses
    `model` when given (its gradients are cleared afterwards), else a fresh model on the batch's
    device. Works on any device: the masking generator is made on the batch's device. With
    `backward=False` the pass is an embedding pass (`model.embed`, no masking, no decoders).
    """
    if batch is None:
        batch = synthetic_batch(config, batch_sizes, seed=seed)
    device = batch["cell_counts"].device
    if model is None:
        model = SpatiaModel(config, synthetic_gene_symbols(batch["cell_counts"].shape[1])).to(device)
    counter = flop_counter()
    with counter:
        if backward:
            # the masking generator must live on the batch's device (a CPU one fails on CUDA)
            out = model(batch, levels=levels, generator=torch.Generator(device=device).manual_seed(seed))
            out.losses["total"].backward()
        else:
            model.embed(batch, levels=levels)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
