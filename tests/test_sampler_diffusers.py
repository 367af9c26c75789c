"""Side by side with diffusers: same tiny UNet, seed, steps and initial noise -> same latents.

Each case names the diffusers scheduler and its configuration, and the emaki sampler and
schedule that mean the same thing. Max abs difference of the final latents must be < 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from side_by_side import (
    BETA_CONFIG,
    context,
    emaki_sigmas,
    run_diffusers,
    run_emaki,
    start_noise,
    tiny_unet,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    assert scale > 0.1, "degenerate comparison: latents are ~0"
    assert diff < TOL, f"max abs diff {diff:.2e} (latent scale {scale:.2f})"


@pytest.mark.parametrize(
    ("spacing", "schedule"),
    [("leading", "ddim_uniform"), ("trailing", "trailing"), ("linspace", "uniform")],
)
def test_euler_matches_diffusers(unet, spacing: str, schedule: str) -> None:
    sched = EulerDiscreteScheduler(**BETA_CONFIG, timestep_spacing=spacing, steps_offset=1)
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=10)
    sigmas = emaki_sigmas(schedule, 10)
    assert torch.allclose(sigmas[:-1], sched.sigmas[:-1].float(), rtol=1e-5), (sigmas, sched.sigmas)
    ours = run_emaki("euler", sigmas, unet, ctx, noise)
    _check(ours, theirs)


def test_euler_karras_matches_diffusers(unet) -> None:
    sched = EulerDiscreteScheduler(**BETA_CONFIG, use_karras_sigmas=True)
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=10)
    ours = run_emaki("euler", emaki_sigmas("karras", 10), unet, ctx, noise)
    _check(ours, theirs)
