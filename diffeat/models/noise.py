"""The forward diffusion process used to noise images before the U-Net sees them.

ADM's linear schedule (betas 1e-4 ... 0.02 over 1000 steps), the one the paper's
model was trained with and the default of models without a scheduler config; other
models' schedules come from their config (``diffeat.models.schedules``). The
cumulative products are computed in float64 (as guided-diffusion does) so that x_t
matches guided-diffusion's ``q_sample`` exactly; the noised image itself is float32.

Noise is drawn per sample from a generator seeded by (seed, sample id, t, draw),
so a sample's features never depend on batch size, order, device, resume or
which machine computed them.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

#: Recorded in the store so a change of the rule changes every feature's identity.
NOISE_RULE = "eps ~ N(0, I) from torch.Generator(cpu).manual_seed(sha256('diffeat-noise-v1|seed|id|t|draw')[:8])"


@lru_cache(maxsize=8)
def alphas_cumprod(
    num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Return ᾱ_t for t = 0 ... num_steps-1 of the linear beta schedule, in float64."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    out = np.cumprod(1.0 - betas)
    out.setflags(write=False)
    return out


def check_timestep(t: int, num_steps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """Return ``t`` if it is a valid timestep, else raise a ``DiffeatError`` with the range."""
    from diffeat.errors import DiffeatError

    if not isinstance(t, (int, np.integer)) or not 0 <= int(t) < num_steps:
        raise DiffeatError(f"--t {t} is out of range: timesteps are integers 0..{num_steps - 1}")
    return int(t)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Noise ``x0`` (in [-1, 1]) to timestep ``t``: √ᾱ_t·x0 + √(1-ᾱ_t)·ε.

    ``t`` is an int or a tensor with one timestep per sample (leading dim of ``x0``).
    The coefficients are computed in float64 and applied in float32.
    """
    ac = alphas_cumprod()
    if isinstance(t, torch.Tensor):
        idx = t.detach().cpu().long().numpy()
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = torch.from_numpy(np.sqrt(ac[idx])).to(torch.float32).view(shape).to(x0.device)
        b = torch.from_numpy(np.sqrt(1.0 - ac[idx])).to(torch.float32).view(shape).to(x0.device)
    else:
        a = float(np.sqrt(ac[int(t)]))
        b = float(np.sqrt(1.0 - ac[int(t)]))
    return (a * x0.float() + b * eps.float()).float()


def noise_seed(seed: int, sample_id: str, t: int, draw: int = 0) -> int:
    """The 63-bit generator seed for one sample's noise at one timestep (and draw)."""
    key = f"diffeat-noise-v1|{seed}|{sample_id}|{t}|{draw}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def sample_noise(
    sample_id: str, t: int, shape: tuple[int, ...], *, seed: int = 0, draw: int = 0
) -> torch.Tensor:
    """Draw one sample's ε (float32, on the CPU) for timestep ``t``, reproducibly."""
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(seed, sample_id, t, draw))
    return torch.randn(shape, generator=gen, dtype=torch.float32)
