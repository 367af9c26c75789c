"""Run emaki samplers and diffusers schedulers side by side on the same tiny UNet.

diffusers is an independent implementation of most samplers. Both sides get the same model,
the same conditioning, the same evaluation points and the same starting latent; stochastic
schedulers get the same noise, drawn from identically seeded generators in the same order.

diffusers' "Euler-family" schedulers keep the sample in variance-exploding form (as emaki does);
its DDIM/PNDM/DDPM/DPM-Solver/UniPC/LCM schedulers keep it in variance-preserving form,
``x_vp = x_ve / sqrt(1 + sigma^2)``. :func:`run_diffusers` returns VE latents either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.registry import get_sampler
from emaki.sampling.schedules import make_sigmas

BETA_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

VE_SCHEDULERS = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverSDEScheduler",
}


def tiny_unet(seed: int = 0, prediction_type: str = "epsilon") -> UNet2DConditionModel:
    """A tiny SD-architecture UNet with random weights (scaled up so outputs are not ~0)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


def alphas_cumprod() -> Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def model_fn(unet: UNet2DConditionModel) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return unet(x, t, encoder_hidden_states=cond.context).sample

    return fn


def context(batch: int = 2, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, 32, generator=g)


def start_noise(batch: int = 2, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g)


@torch.no_grad()
def run_diffusers(
    scheduler: Any,
    unet: UNet2DConditionModel,
    ctx: Tensor,
    noise: Tensor,
    steps: int,
    seed: int = 3,
) -> tuple[Tensor, Tensor]:
    """Sample with a diffusers scheduler; returns (final VE latents, sigmas used as sigma[0])."""
    scheduler.set_timesteps(steps)
    sigma0 = _first_sigma(scheduler)
    ve = type(scheduler).__name__ in VE_SCHEDULERS
    x = noise * sigma0 if ve else noise * sigma0 / (1 + sigma0**2) ** 0.5
    g = torch.Generator().manual_seed(seed)
    # UniPCMultistep's and DPMSolverSDE's step() take no generator.
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": g} if takes_generator else {}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = unet(inp, t, encoder_hidden_states=ctx).sample
        x = scheduler.step(out, t, x, **extra).prev_sample
    sigmas = getattr(scheduler, "sigmas", None)
    if not ve and sigmas is not None:  # VP -> VE; a no-op when the schedule ends at sigma = 0
        x = x * (1 + float(sigmas[-1]) ** 2) ** 0.5
    return x, torch.tensor(sigma0)


def _first_sigma(scheduler: Any) -> float:
    if hasattr(scheduler, "sigmas") and scheduler.sigmas is not None:
        return float(scheduler.sigmas[0])
    ac = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    return float(((1 - ac) / ac) ** 0.5)


class GeneratorNoise:
    """A NoiseSampler drawing from one generator, in the order diffusers' schedulers draw."""

    def __init__(self, shape: tuple[int, ...], seed: int = 3) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.shape = shape

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(self.shape, generator=self.g)


@torch.no_grad()
def run_emaki(
    sampler: str,
    sigmas: Tensor,
    unet: UNet2DConditionModel,
    ctx: Tensor,
    noise: Tensor,
    prediction_type: str = "epsilon",
    noise_sampler: Any = None,
    **options: Any,
) -> Tensor:
    """Sample with an emaki sampler from ``noise * sigma_max`` (VE), like run_diffusers."""
    denoiser = DiscreteDenoiser(model_fn(unet), DiscreteSchedule(alphas_cumprod()), prediction_type)
    spec = get_sampler(sampler)
    x = noise * sigmas[0]
    return spec(denoiser, x, sigmas, cond=Conditioning(ctx), noise=noise_sampler, **options)


def emaki_sigmas(schedule: str, steps: int, **options: float) -> Tensor:
    return make_sigmas(DiscreteSchedule(alphas_cumprod()), schedule, steps, **options)
