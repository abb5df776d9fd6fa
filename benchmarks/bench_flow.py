"""Flow stage speed on CPU (tiny, synthetic tensors): training steps/s and generated images/s.

Prints one JSON line. The peer is the same network's plain forward pass: `train_vs_forward`
is training steps/s divided by forward passes/s at the same batch (about 1/3 means the backward
and optimiser cost what they should), and sampling is reported per network evaluation.

    .venv/bin/python benchmarks/bench_flow.py [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from spatia.flow.autoencoder import CropAutoencoder
    from spatia.flow.config import preset
    from spatia.flow.model import VelocityNet
    from spatia.flow.paths import bridge, contrastive_fm_loss, draw_negatives, target_velocity
    from spatia.flow.sample import integrate

    dev = torch.device(args.device)
    cfg = preset("demo").train
    ae = CropAutoencoder(cfg.autoencoder, 64).to(dev).eval()
    c, h, w = ae.latent_shape
    net = VelocityNet(cfg.model, c, 128, 5, 4).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    b = args.batch
    gen = torch.Generator().manual_seed(0)
    l0, l1 = torch.randn(b, c, h, w, generator=gen).to(dev), torch.randn(b, c, h, w, generator=gen).to(dev)
    z = torch.randn(b, 128, generator=gen).to(dev)
    trans = torch.randint(0, 5, (b,), generator=gen).to(dev)
    coords = torch.randn(b, 4, generator=gen).to(dev)
    niche = torch.randint(0, 3, (b,), generator=gen)

    def timed(fn) -> float:
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            fn()
            n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    def train_step():
        t = torch.rand(b, device=dev)
        u = target_velocity(l0, l1)
        j, has = draw_negatives(trans.cpu(), niche, gen)
        v = net(bridge(l0, l1, t), t, z, trans, coords)
        loss, _ = contrastive_fm_loss(v, u, torch.ones(b, device=dev), u_neg=u[j.to(dev)], has_neg=has.to(dev),
                                      contrastive_weight=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward():
        net(l0, torch.rand(b, device=dev), z, trans, coords)

    steps = 10

    @torch.no_grad()
    def sample():
        lat = integrate(lambda x, t: net(x, t.to(dev), z, trans, coords), l0, steps, "euler")
        ae.decode(lat)

    train_sps = timed(train_step)
    forward_ps = timed(forward)
    sample_ps = timed(sample)
    print(json.dumps({
        "device": str(dev), "threads": args.threads, "batch": b, "latent": [c, h, w],
        "train_steps_per_s": round(train_sps, 2), "forward_passes_per_s": round(forward_ps, 2),
        "train_vs_forward": round(train_sps / forward_ps, 3),
        "generated_images_per_s": round(sample_ps * b, 1), "sampling_steps": steps,
        "images_per_s_per_network_eval": round(sample_ps * b * steps, 1),
    }))


if __name__ == "__main__":
    main()
