"""Noise schedule and per-sample noise, against diffusers' scheduler and a plain float64 formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffeat.errors import DiffeatError
from diffeat.models.noise import alphas_cumprod, check_timestep, q_sample, sample_noise


def test_schedule_matches_ddpm_and_known_values():
    ac = alphas_cumprod()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert np.abs(ac - sched.alphas_cumprod.double().numpy()).max() < 1e-6  # diffusers keeps float32
    assert ac.dtype == np.float64
    assert ac[90] == pytest.approx(0.9133, abs=1e-4) and ac[150] == pytest.approx(0.7859, abs=1e-4)


def test_q_sample_is_the_float64_formula():
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    eps = torch.randn(3, 3, 8, 8)
    for t in (0, 90, 999):
        a = np.sqrt(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: t + 1]))
        want = a * x0.double().numpy() + np.sqrt(1 - a * a) * eps.double().numpy()
        np.testing.assert_allclose(q_sample(x0, eps, t).numpy(), want, rtol=0, atol=1e-6)
    per_sample = q_sample(x0, eps, torch.tensor([0, 90, 999]))
    for i, t in enumerate((0, 90, 999)):
        assert torch.equal(per_sample[i], q_sample(x0[i:i + 1], eps[i:i + 1], t)[0])


def test_noise_depends_only_on_seed_id_t_and_draw():
    a = sample_noise("img-1", 90, (3, 4, 4), seed=0)
    assert torch.equal(a, sample_noise("img-1", 90, (3, 4, 4), seed=0))
    for other in (sample_noise("img-2", 90, (3, 4, 4)), sample_noise("img-1", 91, (3, 4, 4)),
                  sample_noise("img-1", 90, (3, 4, 4), seed=1), sample_noise("img-1", 90, (3, 4, 4), draw=1)):
        assert not torch.equal(a, other)


@pytest.mark.parametrize("t", [-1, 1000, 2.5])
def test_bad_timestep(t):
    with pytest.raises(DiffeatError, match=r"timesteps are integers 0\.\.999"):
        check_timestep(t)
