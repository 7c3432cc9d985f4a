"""Noise from the model's own scheduler config, against diffusers' schedulers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.noise import q_sample
from diffeat.models.schedules import (
    ADM_LINEAR,
    ADM_LINEAR_DESCRIPTION,
    read_schedule,
    schedule_from_config,
)

TIMESTEPS = (0, 1, 90, 500, 999)
DDPM_CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


def _x0_eps():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 4, 8, 8, generator=gen) * 8 - 4, torch.randn(4, 4, 8, 8, generator=gen)  # latent-sized x0


@pytest.mark.parametrize("name", list(DDPM_CONFIGS))
def test_ddpm_schedules_are_diffusers_add_noise(name):
    sched = DDPMScheduler(num_train_timesteps=1000, **DDPM_CONFIGS[name])
    ours = schedule_from_config(dict(sched.config))
    # ᾱ: diffeat keeps float64 (as guided-diffusion and the original LDM code), diffusers float32 (measured: up to
    # 4.7e-7 apart, scaled_linear near t = 110).
    np.testing.assert_allclose(ours.table(), sched.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    # x_t: diffusers' own add_noise, given its own betas' cumulative product in float64 (diffusers' float32 ᾱ
    # alone is off by up to 1.7e-6 in √(1−ᾱ) at t = 0 for the cosine schedule, measured).
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
    x0, eps = _x0_eps()
    for t in TIMESTEPS:
        want = sched.add_noise(x0.double(), eps.double(), torch.tensor([t]))
        got = ours.add_noise(x0, eps, t)
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() < 1e-6, (name, t)
        per_sample = ours.add_noise(x0, eps, torch.full((4,), t))
        assert torch.equal(per_sample, got)


def test_zero_terminal_snr_rescaling_is_diffusers():
    config = dict(DDPM_CONFIGS["scaled_linear"], rescale_betas_zero_snr=True)
    sched = DDPMScheduler(num_train_timesteps=1000, **config)
    ours = schedule_from_config(dict(sched.config))
    np.testing.assert_allclose(ours.table(), sched.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    assert ours.table()[-1] == 0.0 and ours.describe().endswith("rescaled to zero terminal SNR")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_is_diffusers_scale_noise(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ours = schedule_from_config(dict(sched.config))
    assert ours.kind == "flow"
    x0, eps = _x0_eps()
    for t in TIMESTEPS:
        step = sched.timesteps[999 - t]  # the training grid, highest noise first: --t is its index from the end
        want = sched.scale_noise(x0, step[None], eps)
        assert (ours.add_noise(x0, eps, t) - want).abs().max().item() < 1e-6, t
        # what the transformer is given: σ·1000 (diffusers computes σ in float32: within float32 rounding)
        assert ours.model_timesteps(torch.tensor([t])).item() == pytest.approx(step.item(), abs=1e-4)
    assert ours.coefficients(999) == (0.0, 1.0)  # t = 999 is pure noise


def test_adm_default_is_bitwise_todays_q_sample_and_recorded_as_ever():
    x0, eps = _x0_eps()
    for t in TIMESTEPS:
        assert torch.equal(ADM_LINEAR.add_noise(x0, eps, t), q_sample(x0, eps, t))
    ts = torch.tensor([0, 90, 500, 999])
    assert torch.equal(ADM_LINEAR.add_noise(x0, eps, ts), q_sample(x0, eps, ts))
    assert ADM_LINEAR.describe() == ADM_LINEAR_DESCRIPTION == "linear 1e-4..0.02, 1000 steps"
    # A pipeline folder whose scheduler config is that same schedule records the same string (same settings hash).
    same = schedule_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
                                 "beta_end": 0.02, "num_train_timesteps": 1000})
    assert same.describe() == ADM_LINEAR_DESCRIPTION and torch.equal(same.add_noise(x0, eps, 90), q_sample(x0, eps, 90))
    assert schedule_from_config(DDPM_CONFIGS["scaled_linear"]).describe() == "scaled_linear 0.00085..0.012, 1000 steps"


def test_read_from_a_pipeline_folder(tmp_path):
    assert read_schedule(tmp_path, required=False) is ADM_LINEAR  # no scheduler config: ADM's default
    with pytest.raises(ModelError, match="missing its `scheduler` component"):
        read_schedule(tmp_path, required=True)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", **DDPM_CONFIGS["scaled_linear"], "num_train_timesteps": 1000}))
    got = read_schedule(tmp_path, required=True)
    assert got.beta_schedule == "scaled_linear" and "PNDMScheduler" in got.source


def test_unsupported_schedules_are_refused_in_one_line():
    with pytest.raises(ModelError, match=r"beta_schedule 'sigmoid' is not supported; supported: linear, scaled_linear"):
        schedule_from_config({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"})
    with pytest.raises(ModelError, match="use_dynamic_shifting=true .* FLUX"):
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(DiffeatError, match=r"--t 1000 is out of range: .*integers 0\.\.999"):
        ADM_LINEAR.check_timestep(1000)
    with pytest.raises(DiffeatError, match=r"--t -1"):
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).check_timestep(-1)
    short = schedule_from_config({**DDPM_CONFIGS["linear"], "num_train_timesteps": 100})
    with pytest.raises(DiffeatError, match=r"integers 0\.\.99"):
        short.check_timestep(100)
