"""The noise each model was trained with: DDPM beta schedules and flow matching, from the model's scheduler config.

``--t`` is always the model's integer *training timestep* 0 … N−1 (N = ``num_train_timesteps``, 1000
for every model diffeat knows). What it means depends on the schedule:

* **DDPM** (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, or explicit ``trained_betas``):
  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with ᾱ_t = ∏_{s≤t}(1−β_s); the U-Net/transformer gets the integer t.
* **flow matching** (SD3, ``FlowMatchEulerDiscreteScheduler``): x_t = (1−σ_t)·x0 + σ_t·ε with
  σ_t = shift·s / (1 + (shift−1)·s), s = (t+1)/N. That is exactly the training grid of diffusers'
  scheduler (its ``sigmas``, highest noise first: ``sigmas[N−1−t]``): t = 999 is pure noise (σ = 1),
  t = 0 the least noisy step (σ = 0.003 for SD3's shift 3). The transformer gets σ_t·N, as the pipeline
  passes it.

ᾱ and σ are computed in float64 from the config's numbers, as guided-diffusion and the original
LDM code do (diffusers keeps float32: the two agree within 5e-7 on ᾱ, and x_t agrees with diffusers'
``add_noise``/``scale_noise`` within 1e-6, tested). Models with no scheduler config (converted ADM checkpoints, bare
``UNet2DModel`` folders) keep ADM's linear schedule, ``ADM_LINEAR``, whose description is the string
every store written before schedules were read from configs recorded, so their settings hash is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.json_files import read_json
from diffeat.models.noise import NUM_TRAIN_TIMESTEPS, alphas_cumprod

#: What ADM-family models without a scheduler config get; recorded exactly as stores have always recorded it.
ADM_LINEAR_DESCRIPTION = "linear 1e-4..0.02, 1000 steps"

#: Beta schedules diffeat reproduces (diffusers' names).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

#: Scheduler classes whose config is a flow-matching (rectified flow) training schedule.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """``squaredcos_cap_v2`` (Nichol & Dhariwal): diffusers' ``betas_for_alpha_bar(..., "cosine")`` in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                    dtype=np.float64)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (diffusers' ``rescale_zero_terminal_snr``), in float64: ᾱ of the last step becomes 0."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """One model's forward (noising) process over its N training timesteps."""

    kind: str  # "ddpm" | "flow"
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    beta_schedule: str = "linear"  # ddpm only: a name of BETA_SCHEDULES, or "trained_betas"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    rescale_zero_snr: bool = False
    shift: float = 1.0  # flow only
    source: str = "default"  # where it came from (provenance, not identity)
    _table: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    # -- the schedule -------------------------------------------------------------------------------------
    @property
    def is_adm_default(self) -> bool:
        """The linear 1e-4…0.02 / 1000 schedule that stores have always recorded as ``ADM_LINEAR_DESCRIPTION``."""
        return (self.kind == "ddpm" and self.beta_schedule == "linear" and self.beta_start == 1e-4
                and self.beta_end == 0.02 and self.num_train_timesteps == 1000 and not self.rescale_zero_snr)

    def table(self) -> np.ndarray:
        """float64 per timestep: ᾱ_t (ddpm) or σ_t (flow)."""
        if self._table is not None:
            return self._table
        n = self.num_train_timesteps
        if self.kind == "flow":
            s = np.arange(1, n + 1, dtype=np.float64) / n
            out = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        elif self.is_adm_default:
            out = alphas_cumprod()  # the very array the pixel path always used
        else:
            if self.beta_schedule == "linear":
                betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
            elif self.beta_schedule == "scaled_linear":
                betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
            elif self.beta_schedule == "squaredcos_cap_v2":
                betas = _cosine_betas(n)
            else:  # trained_betas
                betas = np.asarray(self.trained_betas, dtype=np.float64)
            if self.rescale_zero_snr:
                betas = _rescale_zero_terminal_snr(betas)
            out = np.cumprod(1.0 - betas)
        out = np.array(out, dtype=np.float64)
        out.setflags(write=False)
        object.__setattr__(self, "_table", out)
        return out

    def check_timestep(self, t: int) -> int:
        """``t`` if it is one of this model's training timesteps, else a one-line ``DiffeatError`` with the range."""
        n = self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < n:
            raise DiffeatError(f"--t {t} is out of range: this model's training timesteps are integers 0..{n - 1} "
                               f"({self.describe()})")
        return int(t)

    def coefficients(self, t: int) -> tuple[float, float]:
        """(a, b) with x_t = a·x0 + b·ε at training timestep ``t``, in float64."""
        v = float(self.table()[int(t)])
        if self.kind == "flow":
            return 1.0 - v, v
        return float(np.sqrt(v)), float(np.sqrt(1.0 - v))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t of ``x0`` with noise ``eps`` at ``t`` (an int, or one timestep per sample), float32.

        The coefficients are float64 and the arithmetic float32, exactly as ``noise.q_sample``
        (which this is, bitwise, for ``ADM_LINEAR``).
        """
        if isinstance(t, torch.Tensor):
            idx = t.detach().cpu().long().numpy()
            v = self.table()[idx]
            a, b = (1.0 - v, v) if self.kind == "flow" else (np.sqrt(v), np.sqrt(1.0 - v))
            shape = (-1,) + (1,) * (x0.dim() - 1)
            a = torch.from_numpy(np.asarray(a)).to(torch.float32).view(shape).to(x0.device)
            b = torch.from_numpy(np.asarray(b)).to(torch.float32).view(shape).to(x0.device)
        else:
            a, b = self.coefficients(int(t))
        return (a * x0.float() + b * eps.float()).float()

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for training timesteps ``t``: t itself (ddpm), σ_t·N in float32 (flow)."""
        if self.kind != "flow":
            return t
        sigmas = torch.tensor(self.table(), dtype=torch.float32, device=t.device)
        return sigmas[t.long()] * self.num_train_timesteps

    # -- identity -------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line that determines the noise values (enters the settings hash)."""
        n = self.num_train_timesteps
        if self.kind == "flow":
            return (f"flow matching x_t=(1-s)x0+s*eps, s=shift*u/(1+(shift-1)*u), u=(t+1)/{n}, shift {self.shift!r}, "
                    f"{n} steps")
        if self.is_adm_default:
            return ADM_LINEAR_DESCRIPTION
        if self.beta_schedule == "trained_betas":
            import hashlib

            digest = hashlib.sha256(np.asarray(self.trained_betas, dtype=np.float64).tobytes()).hexdigest()[:16]
            text = f"trained_betas sha256:{digest}, {n} steps"
        elif self.beta_schedule == "squaredcos_cap_v2":
            text = f"squaredcos_cap_v2, {n} steps"
        else:
            text = f"{self.beta_schedule} {self.beta_start!r}..{self.beta_end!r}, {n} steps"
        return text + (", rescaled to zero terminal SNR" if self.rescale_zero_snr else "")

    def as_dict(self) -> dict:
        """Provenance: the description, its parameters and where it came from."""
        out = {"kind": self.kind, "description": self.describe(), "num_train_timesteps": self.num_train_timesteps,
               "source": self.source}
        if self.kind == "flow":
            out["shift"] = self.shift
        else:
            out.update(beta_schedule=self.beta_schedule, beta_start=self.beta_start, beta_end=self.beta_end,
                       rescale_zero_snr=self.rescale_zero_snr)
        return out


ADM_LINEAR = NoiseSchedule("ddpm", source="default: ADM's linear schedule (no scheduler config)")


def schedule_from_config(config: dict, source: str = "scheduler config") -> NoiseSchedule:
    """The training schedule a diffusers scheduler config describes (any DDPM-family scheduler, or flow matching).

    Refuses, in one line, what diffeat cannot reproduce exactly (resolution-dependent shifts, other beta
    schedules), naming the key and the supported values.
    """
    cls = config.get("_class_name", "?")
    n = int(config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
    if cls in FLOW_SCHEDULERS or "shift" in config and "beta_schedule" not in config:
        for key in ("use_dynamic_shifting", "invert_sigmas"):
            if config.get(key):
                raise ModelError(f"{source}: {cls} with {key}=true (a resolution-dependent or inverted shift, e.g. "
                                 "FLUX) is not supported; supported: flow matching with a fixed `shift`")
        if config.get("shift_terminal"):
            raise ModelError(f"{source}: {cls} with shift_terminal is not supported; supported: a fixed `shift`")
        return NoiseSchedule("flow", num_train_timesteps=n, shift=float(config.get("shift", 1.0)), source=source)
    trained = config.get("trained_betas")
    name = config.get("beta_schedule", "linear")
    if trained is not None:
        if len(trained) != n:
            raise ModelError(f"{source}: trained_betas has {len(trained)} values for {n} timesteps")
        name = "trained_betas"
    elif name not in BETA_SCHEDULES:
        raise ModelError(f"{source}: beta_schedule {name!r} is not supported; supported: "
                         f"{', '.join(BETA_SCHEDULES)}, trained_betas, or flow matching "
                         "(FlowMatchEulerDiscreteScheduler)")
    return NoiseSchedule(
        "ddpm", num_train_timesteps=n, beta_schedule=name,
        beta_start=float(config.get("beta_start", 1e-4)), beta_end=float(config.get("beta_end", 0.02)),
        trained_betas=tuple(float(b) for b in trained) if trained is not None else None,
        rescale_zero_snr=bool(config.get("rescale_betas_zero_snr", False)), source=source,
    )


def read_schedule(folder: Path, *, required: bool) -> NoiseSchedule:
    """The schedule of a pipeline folder (``scheduler/scheduler_config.json``), or ``ADM_LINEAR`` when it has none.

    ``required``: a pipeline whose family has no default schedule (latent U-Nets, transformers) must have one.
    """
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        if required:
            raise ModelError(f"{folder} has no scheduler/scheduler_config.json: the pipeline folder is missing its "
                             "`scheduler` component (diffeat noises images with the model's own training schedule)")
        return ADM_LINEAR
    config = read_json(path)
    return schedule_from_config(config, source=f"{path.parent.name}/{path.name} ({config.get('_class_name', '?')})")
