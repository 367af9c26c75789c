"""Sigma schedules: pure functions returning a descending 1-D sigma tensor that ends in 0.

A schedule chooses *where* the sampler evaluates the model; the sampler chooses *how* it steps.
Any sampler works with any schedule. Every function has the signature
``schedule(model_schedule, steps, **options) -> Tensor[steps + 1]``.

Names follow the A1111 web UI (1.10 "Schedule type") and ComfyUI; diffusers' timestep spacings
(``leading``, ``trailing``, ``linspace``) are available too, so an emaki run can reproduce a
diffusers scheduler's evaluation points exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import DiscreteSchedule

ScheduleFn = Callable[..., Tensor]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float32), sigmas.new_zeros(1, dtype=torch.float32)])


def _sigmas_at(ms: DiscreteSchedule, timesteps: Tensor) -> Tensor:
    return _append_zero(ms.t_to_sigma(timesteps.to(torch.float32)))


def uniform(ms: DiscreteSchedule, steps: int) -> Tensor:
    """The model's own spacing: ``steps`` timesteps evenly spaced from T-1 down to 0.

    A1111 "Automatic"/"Uniform" for k-diffusion samplers, ComfyUI "normal", diffusers
    ``timestep_spacing="linspace"`` (which interpolates sigma linearly rather than log-linearly
    between grid points; the difference is below 1e-5 relative).
    """
    t = torch.linspace(ms.num_timesteps - 1, 0, steps)
    return _sigmas_at(ms, t)


def sgm_uniform(ms: DiscreteSchedule, steps: int) -> Tensor:
    """``steps + 1`` evenly spaced timesteps from T-1 to 0, dropping the last (SGM / SD-Turbo).

    ComfyUI and A1111 "SGM Uniform".
    """
    t = torch.linspace(ms.num_timesteps - 1, 0, steps + 1)[:-1]
    return _sigmas_at(ms, t)


def simple(ms: DiscreteSchedule, steps: int) -> Tensor:
    """Every (T/steps)-th grid sigma counted down from the top (ComfyUI/A1111 "Simple")."""
    stride = ms.num_timesteps / steps
    idx = torch.tensor([ms.num_timesteps - 1 - int(i * stride) for i in range(steps)])
    return _append_zero(ms.sigmas[idx])


def ddim_uniform(ms: DiscreteSchedule, steps: int) -> Tensor:
    """DDIM's uniform discretisation: timesteps 1, 1+c, 1+2c, ... with c = T // steps.

    CompVis/A1111 DDIM and PLMS (``ddim_discretize="uniform"``), ComfyUI "ddim_uniform",
    equivalent to diffusers ``timestep_spacing="leading"`` with ``steps_offset=1``.
    """
    return leading(ms, steps, offset=1)


def leading(ms: DiscreteSchedule, steps: int, offset: int = 0) -> Tensor:
    """diffusers ``timestep_spacing="leading"``: ``t_i = i * (T // steps) + offset``, descending."""
    ratio = ms.num_timesteps // steps
    if ratio < 1:
        raise InvalidRequestError(
            f"{steps} steps exceed the model's {ms.num_timesteps} timesteps for this schedule"
        )
    t = (torch.arange(steps, dtype=torch.float64) * ratio).round() + offset
    return _sigmas_at(ms, t.flip(0).clamp(max=ms.num_timesteps - 1))


def trailing(ms: DiscreteSchedule, steps: int) -> Tensor:
    """diffusers ``timestep_spacing="trailing"`` (Lin et al. 2023): ``round(T - i*T/steps) - 1``."""
    ratio = ms.num_timesteps / steps
    t = torch.tensor([round(ms.num_timesteps - i * ratio) - 1 for i in range(steps)])
    return _sigmas_at(ms, t)


def karras(
    ms: DiscreteSchedule,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Karras et al. (2022), eq. 5: sigmas evenly spaced in ``sigma^(1/rho)``, rho = 7."""
    lo = ms.sigma_min if sigma_min is None else sigma_min
    hi = ms.sigma_max if sigma_max is None else sigma_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = lo ** (1 / rho), hi ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(
    ms: DiscreteSchedule,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Sigmas evenly spaced in log-sigma (k-diffusion ``get_sigmas_exponential``)."""
    lo = ms.sigma_min if sigma_min is None else sigma_min
    hi = ms.sigma_max if sigma_max is None else sigma_max
    return _append_zero(
        torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp()
    )


def polyexponential(
    ms: DiscreteSchedule,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 1.0,
) -> Tensor:
    """Polynomial in log-sigma (k-diffusion ``get_sigmas_polyexponential``); rho=1 is exponential."""
    lo = ms.sigma_min if sigma_min is None else sigma_min
    hi = ms.sigma_max if sigma_max is None else sigma_max
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp())


def kl_optimal(ms: DiscreteSchedule, steps: int) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", eq. 16): arctan-uniform."""
    lo, hi = ms.sigma_min, ms.sigma_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    a_min, a_max = math.atan(lo), math.atan(hi)
    return _append_zero(torch.tan(ramp * a_min + (1 - ramp) * a_max))


@dataclass(frozen=True)
class ScheduleSpec:
    """A registered schedule: its canonical (A1111) label, ComfyUI name and the function."""

    label: str
    name: str
    fn: ScheduleFn
    aliases: tuple[str, ...] = ()


SCHEDULES: tuple[ScheduleSpec, ...] = (
    ScheduleSpec("Uniform", "uniform", uniform, ("automatic", "normal", "linspace")),
    ScheduleSpec("Karras", "karras", karras),
    ScheduleSpec("Exponential", "exponential", exponential),
    ScheduleSpec("Polyexponential", "polyexponential", polyexponential),
    ScheduleSpec("SGM Uniform", "sgm_uniform", sgm_uniform),
    ScheduleSpec("KL Optimal", "kl_optimal", kl_optimal),
    ScheduleSpec("Simple", "simple", simple),
    ScheduleSpec("DDIM", "ddim_uniform", ddim_uniform, ("ddim",)),
    ScheduleSpec("Leading", "leading", leading),
    ScheduleSpec("Trailing", "trailing", trailing),
)


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def get_schedule(name: str) -> ScheduleSpec:
    """Look up a schedule by A1111 label, ComfyUI name or alias (case-insensitive)."""
    k = _key(name)
    for spec in SCHEDULES:
        if k in {_key(spec.label), spec.name, *(_key(a) for a in spec.aliases)}:
            return spec
    accepted = ", ".join(spec.name for spec in SCHEDULES)
    raise InvalidRequestError(f"unknown schedule {name!r}; accepted: {accepted}")


def make_sigmas(ms: DiscreteSchedule, name: str, steps: int, **options: float) -> Tensor:
    """Sigmas for ``steps`` steps of the named schedule; always ``steps + 1`` values ending in 0."""
    if steps < 1:
        raise InvalidRequestError(f"steps must be at least 1, got {steps}")
    sigmas = get_schedule(name).fn(ms, steps, **options)
    return sigmas.to(torch.float32)
