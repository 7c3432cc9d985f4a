#!/usr/bin/env python
"""Train the built-in ``digits-ddpm`` model: a small DDPM on the digits TRAIN split, on a CPU.

The network is ``diffeat.models.loading.ARCHITECTURES["digits-ddpm"]`` (a diffusers
``UNet2DModel``, 3 levels, 1.19M parameters, 8 px: the digits' native resolution). It is
trained as in DDPM (Ho et al. 2020): epsilon prediction, MSE, t uniform in 0..999 of the
linear schedule (betas 1e-4..0.02), noised with ``diffeat.models.noise.q_sample``, so
training and feature extraction share one schedule. Only ``digits`` ``train`` images are
seen; the test split stays unseen for the probes. The saved weights are an exponential
moving average of the trained ones (EMA), as DDPM does.

Everything is seeded (``--seed``): the same command on the same torch build and thread
count gives the same weights. Usage::

    python scripts/train_digits_ddpm.py                       # writes diffeat/weights/digits-ddpm
    python scripts/train_digits_ddpm.py --steps 50 --out /tmp/m --samples /tmp/s.png   # smoke run

After training it draws ``--num-samples`` images by ancestral DDPM sampling (``--sample-steps``,
default 1000)
and writes them as a PNG grid (``--samples``), next to real training digits for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults reproduce the shipped weights)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "diffeat" / "weights" / "digits-ddpm",
                   help="model folder to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a small model gains nothing from more, and spins on a busy machine)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--samples", type=Path, default=REPO / "docs" / "img" / "digits-ddpm-samples.png",
                   help="PNG grid of generated samples (left) and real train digits (right)")
    p.add_argument("--num-samples", type=int, default=64, help="generated samples to draw (0: none)")
    p.add_argument("--sample-steps", type=int, default=1000, help="sampling steps (1000: plain DDPM)")
    return p.parse_args(argv)


def train_images(resolution: int) -> torch.Tensor:
    """The digits train split as a float32 (N, 3, R, R) tensor in [-1, 1], preprocessed as extraction does."""
    from diffeat.data import open_dataset, preprocess

    table = open_dataset("digits").samples("train")
    return torch.from_numpy(np.stack([preprocess(table.load_image(i), resolution) for i in range(len(table))]))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to 5% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace):
    """Train and return (EMA model, seconds, final smoothed loss)."""
    from diffeat.models.loading import ARCHITECTURES, build_random
    from diffeat.models.noise import NUM_TRAIN_TIMESTEPS, q_sample

    torch.manual_seed(args.seed)
    model = build_random("digits-ddpm", seed=args.seed)
    ema = build_random("digits-ddpm", seed=args.seed)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    resolution = ARCHITECTURES["digits-ddpm"]["sample_size"]
    x_all = train_images(resolution)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits-ddpm: {n_params:,} parameters, {len(x_all)} train images at {resolution} px, "
          f"{args.steps} steps x batch {args.batch_size}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    smooth, start = None, time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch_size,), generator=gen)
        eps = torch.randn(x_all[idx].shape, generator=gen)
        x_t = q_sample(x_all[idx], eps, t)
        loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            # Warm the EMA up (as in many DDPM codebases) so short runs still average sensibly.
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{args.steps}  loss {smooth:.4f}  {elapsed:.0f}s "
                  f"({elapsed / (step + 1):.2f}s/step)", flush=True)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
    return ema.eval(), time.perf_counter() - start, smooth


@torch.no_grad()
def ddpm_sample(unet, n: int, resolution: int, seed: int, steps: int = 1000) -> torch.Tensor:
    """Ancestral DDPM sampling (x0 clipped to [-1, 1]); returns (n, 3, R, R) in [-1, 1].

    ``steps`` < 1000 samples on an evenly spaced subsequence of the timesteps with the
    betas recomputed from ᾱ (respacing, Nichol & Dhariwal 2021); 1000 is plain DDPM.
    """
    from diffeat.models.noise import NUM_TRAIN_TIMESTEPS, alphas_cumprod

    ts = np.unique(np.round(np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)).astype(int))
    ab = alphas_cumprod()[ts]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1.0 - ab / ab_prev
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, resolution, resolution), generator=gen)
    for i in range(len(ts) - 1, -1, -1):
        eps = unet(x, torch.full((n,), int(ts[i]), dtype=torch.long)).sample
        x0 = ((x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])).clamp(-1, 1)
        # Posterior q(x_prev | x_t, x0) (DDPM eq. 7).
        c0 = math.sqrt(ab_prev[i]) * betas[i] / (1 - ab[i])
        ct = math.sqrt(1 - betas[i]) * (1 - ab_prev[i]) / (1 - ab[i])
        x = c0 * x0 + ct * x
        if i > 0:
            var = betas[i] * (1 - ab_prev[i]) / (1 - ab[i])
            x = x + math.sqrt(var) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def save_grid(generated: torch.Tensor, real: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Write generated (left) and real (right) images as one PNG, each image upscaled ``scale``× (nearest)."""
    from PIL import Image

    def grid(x: torch.Tensor) -> np.ndarray:
        n = x.shape[0]
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        r = x.shape[-1]
        pad = 1
        out = np.full((rows * (r + pad) + pad, cols * (r + pad) + pad), 128, dtype=np.uint8)
        imgs = ((x[:, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        for i, img in enumerate(imgs):
            y0, x0 = pad + (i // cols) * (r + pad), pad + (i % cols) * (r + pad)
            out[y0:y0 + r, x0:x0 + r] = img
        return out

    a, b = grid(generated), grid(real)
    gap = np.full((a.shape[0], 4), 255, dtype=np.uint8)
    both = np.concatenate([a, gap, b], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(both).resize((both.shape[1] * scale, both.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    """Train, save the model folder, write the sample grid; print what was done."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, seconds, loss = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    from diffeat import __version__
    from diffeat.models.loading import weights_sha256

    record = {
        "trained_by": "scripts/train_digits_ddpm.py",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "samples", "sample_steps", "num_samples")},
        "data": "digits train split (1,437 images), preprocessed at 8 px",
        "objective": "DDPM epsilon prediction, MSE, t ~ U{0..999}, linear betas 1e-4..0.02 (diffeat.models.noise)",
        "train_seconds": round(seconds, 1),
        "final_loss_smoothed": round(loss, 5),
        "weights_sha256": weights_sha256(model),
        "torch": torch.__version__,
        "threads": args.threads,
        "diffeat": __version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({seconds:.0f}s of training, smoothed loss {loss:.4f})", flush=True)
    if args.num_samples > 0:
        start = time.perf_counter()
        res = model.config.sample_size
        samples = ddpm_sample(model, args.num_samples, res, args.seed + 1, args.sample_steps)
        real = train_images(res)[: args.num_samples]
        save_grid(samples, real, args.samples)
        print(f"wrote {args.samples} ({args.num_samples} samples, {time.perf_counter() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
