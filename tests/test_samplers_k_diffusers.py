"""Side by side with diffusers: Euler a, Heun, DPM2, DPM2 a, LMS, DDIM, PLMS, DDPM and LCM.

Same tiny UNet, conditioning, initial noise and evaluation points on both sides; stochastic
samplers get :class:`side_by_side.GeneratorNoise`, seeded like the generator ``run_diffusers``
passes to ``step()``. Every diffusers scheduler here draws one noise tensor of the latent's shape
per noisy step, in step order, and emaki's samplers draw one per step with ``sigma_next > 0``:
the draws line up (where diffusers also draws on the last step, that draw is multiplied by 0).

Each case first asserts that the emaki schedule reproduces the scheduler's noise levels, then
that the final latents agree to ``TOL``. diffusers' VP schedulers (DDIM, PNDM, DDPM, LCM) step in
``x_VP = x_VE / sqrt(1 + sigma^2)``; their noise levels are read off ``alphas_cumprod`` at their
timesteps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from torch import Tensor

from emaki.sampling.denoisers import DiscreteSchedule

from side_by_side import (
    BETA_CONFIG,
    GeneratorNoise,
    alphas_cumprod,
    context,
    emaki_sigmas,
    run_diffusers,
    run_emaki,
    start_noise,
    tiny_unet,
)

TOL = 1e-4
STEPS = 8
SHAPE = (2, 4, 8, 8)  # start_noise()'s shape: the shape of every noise draw


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _compare(
    unet: Any,
    scheduler: Any,
    sampler: str,
    sigmas: Tensor,
    *,
    stochastic: bool = False,
    prediction_type: str = "epsilon",
    **options: Any,
) -> float:
    """Run both sides; assert the evaluation points agree; return the max abs difference."""
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(scheduler, unet, ctx, noise, steps=STEPS)
    expected = _scheduler_sigmas(scheduler)
    assert torch.allclose(sigmas, expected, rtol=1e-5), (sigmas, expected)
    ours = run_emaki(
        sampler,
        sigmas,
        unet,
        ctx,
        noise,
        prediction_type=prediction_type,
        noise_sampler=GeneratorNoise(SHAPE) if stochastic else None,
        **options,
    )
    scale = float(theirs.abs().max())
    assert scale > 0.1, "degenerate comparison: latents are ~0"
    return float((ours - theirs).abs().max())


def _scheduler_sigmas(scheduler: Any) -> Tensor:
    """The distinct noise levels a diffusers scheduler steps through, ending in its last one."""
    if getattr(scheduler, "sigmas", None) is not None:
        # VE schedulers; Heun and KDPM2 list every level twice (once per stage)
        return torch.unique_consecutive(scheduler.sigmas.float())
    ac = scheduler.alphas_cumprod
    timesteps = torch.unique_consecutive(scheduler.timesteps)  # PNDM repeats one
    final = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))  # DDPM: always 1
    a = torch.cat([ac[timesteps], final.reshape(1).to(ac.dtype)])
    return ((1 - a) / a).sqrt().float()


def _assert_close(diff: float) -> None:
    assert diff < TOL, f"max abs diff {diff:.2e}"


def _unrounded(cls: type) -> type:
    """``cls`` evaluating the model at the exact timesteps of its Karras noise levels.

    With ``use_karras_sigmas`` diffusers' KDPM2 schedulers round the model timesteps of the
    main noise levels to integers (``set_timesteps``: ``...]).round()``) while they still scale
    the model input and step with the unrounded Karras sigmas; Euler, Heun and LMS do not round,
    nor do k-diffusion and A1111. The model then sees a timestep up to 0.5 away from its input's
    noise level, which moves these latents by 4e-3 to 6e-3. emaki evaluates the model where it scales
    the input, so this subclass undoes the rounding; with it the samplers agree to ~1e-5.
    """

    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.set_timesteps(self, *args, **kwargs)
        if self.config.use_karras_sigmas:
            sigmas = torch.unique_consecutive(self.sigmas)[:-1]  # the main noise levels
            exact = self._sigma_to_t(sigmas.numpy(), self.log_sigmas.cpu().numpy())
            self.timesteps[0::2] = torch.from_numpy(exact).to(self.timesteps.dtype)

    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps})


KDPM2 = _unrounded(KDPM2DiscreteScheduler)
KDPM2Ancestral = _unrounded(KDPM2AncestralDiscreteScheduler)


# --- Euler family (diffusers keeps x in VE form) ---------------------------------------------

# "trailing" (integer timesteps 999, 874, ..., 124) rather than diffusers' default "linspace":
# linspace's timesteps are fractional, and diffusers interpolates sigma linearly between grid
# points where emaki's "uniform" interpolates log-sigma (as k-diffusion and A1111 do). The two
# differ by up to 2.5e-6 relative at 8 steps, which moves the latents by up to ~1e-4 and would
# test the schedules rather than the samplers. "karras" uses the default linspace, whose ends
# (sigma(999), sigma(0)) are diffusers' Karras range.
SCHEDULES = ["trailing", "karras"]


def _ve_config(schedule: str, **config: Any) -> dict[str, Any]:
    spacing = (
        {"use_karras_sigmas": True} if schedule == "karras" else {"timestep_spacing": schedule}
    )
    return BETA_CONFIG | spacing | config


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral(unet, prediction_type: str) -> None:
    # diffusers' EulerAncestralDiscreteScheduler has no Karras option
    sched = EulerAncestralDiscreteScheduler(
        **_ve_config("trailing", prediction_type=prediction_type)
    )
    sigmas = emaki_sigmas("trailing", STEPS)
    diff = _compare(
        unet, sched, "euler_ancestral", sigmas, stochastic=True, prediction_type=prediction_type
    )
    _assert_close(diff)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_heun(unet, schedule: str) -> None:
    sched = HeunDiscreteScheduler(**_ve_config(schedule))
    _assert_close(_compare(unet, sched, "heun", emaki_sigmas(schedule, STEPS)))


def test_heun_karras_v_prediction(unet) -> None:
    sched = HeunDiscreteScheduler(**_ve_config("karras", prediction_type="v_prediction"))
    sigmas = emaki_sigmas("karras", STEPS)
    _assert_close(_compare(unet, sched, "heun", sigmas, prediction_type="v_prediction"))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpm_2(unet, schedule: str) -> None:
    sched = KDPM2(**_ve_config(schedule))
    _assert_close(_compare(unet, sched, "dpm_2", emaki_sigmas(schedule, STEPS)))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpm_2_ancestral(unet, schedule: str) -> None:
    sched = KDPM2Ancestral(**_ve_config(schedule))
    sigmas = emaki_sigmas(schedule, STEPS)
    _assert_close(_compare(unet, sched, "dpm_2_ancestral", sigmas, stochastic=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lms(unet, schedule: str) -> None:
    sched = LMSDiscreteScheduler(**_ve_config(schedule))
    _assert_close(_compare(unet, sched, "lms", emaki_sigmas(schedule, STEPS)))


def test_lms_v_prediction(unet) -> None:
    sched = LMSDiscreteScheduler(**_ve_config("trailing", prediction_type="v_prediction"))
    sigmas = emaki_sigmas("trailing", STEPS)
    _assert_close(_compare(unet, sched, "lms", sigmas, prediction_type="v_prediction"))


# --- DDIM family (diffusers keeps x in VP form) ----------------------------------------------

# SD's scheduler config says set_alpha_to_one=False: the step from the last timestep t=1 then
# goes to alphas_cumprod[0] rather than to 1, i.e. it ends at sigma(t=0) ~ 0.029, and the latent
# keeps that much noise. emaki's schedules end in sigma = 0 (the sample is denoised), which is
# set_alpha_to_one=True.
DDIM_CONFIG: dict[str, Any] = {**BETA_CONFIG, "set_alpha_to_one": True, "steps_offset": 1}


class _WithEta:
    """A DDIMScheduler whose ``step()`` gets ``eta`` (``run_diffusers`` does not pass it)."""

    def __init__(self, scheduler: DDIMScheduler, eta: float) -> None:
        self._scheduler, self._eta = scheduler, eta

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, *args: Any, generator: Any = None, **kwargs: Any) -> Any:
        return self._scheduler.step(*args, eta=self._eta, generator=generator, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim(unet, prediction_type: str) -> None:
    sched = DDIMScheduler(**DDIM_CONFIG, clip_sample=False, prediction_type=prediction_type)
    sigmas = emaki_sigmas("ddim_uniform", STEPS)
    _assert_close(_compare(unet, sched, "ddim", sigmas, prediction_type=prediction_type))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(unet, eta: float) -> None:
    sched = _WithEta(DDIMScheduler(**DDIM_CONFIG, clip_sample=False), eta)
    sigmas = emaki_sigmas("ddim_uniform", STEPS)
    _assert_close(_compare(unet, sched, "ddim", sigmas, stochastic=True, eta=eta))


def test_plms(unet) -> None:
    sched = PNDMScheduler(**DDIM_CONFIG, skip_prk_steps=True)
    _assert_close(_compare(unet, sched, "plms", emaki_sigmas("ddim_uniform", STEPS)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm(unet, prediction_type: str) -> None:
    # "leading" with steps_offset 0: timesteps 875, 750, ..., 0, then alpha_bar = 1 (sigma 0).
    sched = DDPMScheduler(**BETA_CONFIG, clip_sample=False, prediction_type=prediction_type)
    sigmas = emaki_sigmas("leading", STEPS)
    diff = _compare(unet, sched, "ddpm", sigmas, stochastic=True, prediction_type=prediction_type)
    _assert_close(diff)


@pytest.mark.parametrize("timestep_scaling", [10.0, 1e5], ids=["default", "no_boundary"])
def test_lcm(unet, timestep_scaling: float) -> None:
    # LCM's timesteps are every (50 / STEPS)-th of its 50 distillation timesteps 999, 979, ..., 19
    # (999, 879, 759, 639, 499, 379, 259, 139 for 8 steps): no emaki schedule gives them, so the
    # sigmas are built from them. diffusers also applies the consistency boundary condition
    # c_skip * x + c_out * x0, c_skip = 0.25 / ((timestep_scaling * t)^2 + 0.25) <= 1.3e-7 here;
    # emaki's LCM leaves it out. Measured: 2.7e-5 with the default scaling, 2.3e-5 with 1e5
    # (c_skip ~ 0): the boundary condition accounts for ~4e-6, the rest is float32 rounding
    # between diffusers' VP and emaki's VE arithmetic (1e-6 to 1.3e-5 in the other VP cases).
    sched = LCMScheduler(**BETA_CONFIG, timestep_scaling=timestep_scaling)
    sched.set_timesteps(STEPS)
    schedule = DiscreteSchedule(alphas_cumprod())
    sigmas = torch.cat([schedule.t_to_sigma(sched.timesteps), torch.zeros(1)])
    _assert_close(_compare(unet, sched, "lcm", sigmas, stochastic=True))
