"""DPM-Solver++ and UniPC side by side with diffusers: same tiny UNet, seed, steps, start noise.

Each case names the diffusers scheduler and configuration and the emaki sampler and sigmas that
mean the same thing, asserts that the evaluation points agree, and requires the final latents to
agree to 1e-4 (max abs). Where diffusers does something emaki's contract does not (integer-rounded
model timesteps between non-integer sigmas), the test reproduces it on the model side, so the
solver arithmetic is what is compared.

Not compared, and why:
* DPM++ 3M SDE. diffusers' order-3 ``sde-dpmsolver++`` weights the second difference by
  ``(1 - e^(-2h) - 2h) / (2h)^2 - 0.5``, which tends to -1 (not 0) as h -> 0, and its order-3
  ``dpmsolver++`` (the eta = 0 limit) uses half the exact Taylor weight; emaki uses the exact
  weight (see :func:`emaki.sampling.dpm_solvers.sample_dpmpp_3m_sde`). With that weight halved,
  plus diffusers' Taylor ("heun") order-2 warm-up and its order-2 second-to-last step below 15
  steps, the same code matches diffusers' order-3 dpmsolver++ to 2e-5: only the weight differs.
* UniPC bh1 into sigma = 0: diffusers returns NaN (``B(h) = -inf`` times 0 on the last step), so
  that case ends at ``final_sigmas_type="sigma_min"``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
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
STEPS = 10


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _check(ours: Tensor, theirs: Tensor) -> None:
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    assert scale > 0.1, "degenerate comparison: latents are ~0"
    assert diff < TOL, f"max abs diff {diff:.2e} (latent scale {scale:.2f})"


def _same_points(ours: Tensor, sched: Any) -> None:
    assert torch.allclose(ours, sched.sigmas.float(), rtol=1e-5), (ours, sched.sigmas)


def _sigmas_from_timesteps(sched: Any) -> Tensor:
    """diffusers' integer timesteps as emaki sigmas (no emaki schedule rounds to integers)."""
    ms = DiscreteSchedule(alphas_cumprod())
    return torch.cat([ms.t_to_sigma(sched.timesteps.float()), torch.zeros(1)])


class _DiffusersTimesteps:
    """The UNet called at the timestep diffusers uses for the same evaluation point.

    DPMSolverMultistep/UniPC with Karras sigmas call the model at ``round(t(sigma))`` but step
    between the unrounded sigmas; DPMSolverSinglestep casts t to int64 (truncating 998.9999997 to
    998). emaki calls the model at the exact fractional t, so the test moves diffusers'
    quantization into the model: each t is replaced by the nearest of ``timesteps``, which must
    be at most one (the quantization step) away.
    """

    def __init__(self, unet: UNet2DConditionModel, timesteps: Tensor) -> None:
        self.unet, self.timesteps = unet, timesteps.double()

    def __call__(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Any:
        dist = (t.double()[:, None] - self.timesteps[None]).abs()  # [B, steps]
        assert float(dist.min(dim=1).values.max()) < 1.001, (t, self.timesteps)
        t = self.timesteps[dist.argmin(dim=1)].to(t.dtype)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


# ---- DPMSolverMultistepScheduler: DPM++ 2M and DPM++ 2M SDE -------------------------------
#
# With final_sigmas_type="zero" diffusers always takes a first-order last step (as emaki must:
# h is infinite), whatever lower_order_final / euler_at_final say; lower_order_final (< 15 steps)
# only lowers the second-to-last step of order 3.


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_multistep_linspace(unet, prediction_type: str) -> None:
    sched = DPMSolverMultistepScheduler(
        **BETA_CONFIG, solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero",
        prediction_type=prediction_type,
    )  # fmt: skip
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=STEPS)
    sigmas = _sigmas_from_timesteps(sched)
    _same_points(sigmas, sched)
    ours = run_emaki("dpmpp_2m", sigmas, unet, ctx, noise, prediction_type=prediction_type)
    _check(ours, theirs)


def test_dpmpp_2m_matches_multistep_trailing(unet) -> None:
    sched = DPMSolverMultistepScheduler(
        **BETA_CONFIG, timestep_spacing="trailing", final_sigmas_type="zero"
    )
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=STEPS)
    sigmas = emaki_sigmas("trailing", STEPS)
    _same_points(sigmas, sched)
    _check(run_emaki("dpmpp_2m", sigmas, unet, ctx, noise), theirs)


def test_dpmpp_2m_karras_matches_multistep_karras(unet) -> None:
    sched = DPMSolverMultistepScheduler(
        **BETA_CONFIG, use_karras_sigmas=True, final_sigmas_type="zero"
    )
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=STEPS)
    sigmas = emaki_sigmas("karras", STEPS)
    _same_points(sigmas, sched)
    model = _DiffusersTimesteps(unet, sched.timesteps)
    _check(run_emaki("dpmpp_2m", sigmas, model, ctx, noise), theirs)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_multistep_sde(unet, solver_type: str) -> None:
    sched = DPMSolverMultistepScheduler(
        **BETA_CONFIG, algorithm_type="sde-dpmsolver++", solver_type=solver_type,
        timestep_spacing="trailing", final_sigmas_type="zero",
    )  # fmt: skip
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=STEPS, seed=3)
    sigmas = emaki_sigmas("trailing", STEPS)
    _same_points(sigmas, sched)
    ours = run_emaki(
        "dpmpp_2m_sde", sigmas, unet, ctx, noise,
        noise_sampler=GeneratorNoise(tuple(noise.shape), seed=3), solver_type=solver_type,
    )  # fmt: skip
    _check(ours, theirs)


def test_dpmpp_2m_sde_eta_0_heun_matches_multistep_ode_heun(unet) -> None:
    """eta = 0 is the ODE solver; the heun weight is diffusers' dpmsolver++ solver_type="heun"."""
    sched = DPMSolverMultistepScheduler(
        **BETA_CONFIG, solver_type="heun", timestep_spacing="trailing", final_sigmas_type="zero"
    )
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=STEPS)
    sigmas = emaki_sigmas("trailing", STEPS)
    ours = run_emaki("dpmpp_2m_sde", sigmas, unet, ctx, noise, eta=0.0, solver_type="heun")
    _check(ours, theirs)


# ---- UniPCMultistepScheduler ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "prediction_type"), [(2, "epsilon"), (2, "v_prediction"), (3, "epsilon")]
)
def test_unipc_bh2_matches_unipc(unet, order: int, prediction_type: str) -> None:
    sched = UniPCMultistepScheduler(
        **BETA_CONFIG, solver_order=order, solver_type="bh2", final_sigmas_type="zero",
        prediction_type=prediction_type,
    )  # fmt: skip
    ctx, noise = context(), start_noise()
    theirs = run_diffusers(sched, unet, ctx, noise, STEPS)[0]
    sigmas = _sigmas_from_timesteps(sched)
    _same_points(sigmas, sched)
    ours = run_emaki(
        "uni_pc", sigmas, unet, ctx, noise, prediction_type=prediction_type, order=order,
        variant="bh2",
    )  # fmt: skip
    _check(ours, theirs)


def test_unipc_bh1_matches_unipc(unet) -> None:
    sched = UniPCMultistepScheduler(
        **BETA_CONFIG, solver_type="bh1", timestep_spacing="trailing",
        final_sigmas_type="sigma_min",
    )  # fmt: skip
    ctx, noise = context(), start_noise()
    theirs = run_diffusers(sched, unet, ctx, noise, STEPS)[0]
    # The last step ends at sigma_min, not 0 (see the module docstring); emaki's sampler needs no
    # change for that, only the schedule does.
    sigmas = emaki_sigmas("trailing", STEPS)
    sigmas[-1] = sched.sigmas[-1]
    _same_points(sigmas, sched)
    _check(run_emaki("uni_pc", sigmas, unet, ctx, noise, variant="bh1"), theirs)


def test_unipc_karras_matches_unipc_karras(unet) -> None:
    sched = UniPCMultistepScheduler(**BETA_CONFIG, use_karras_sigmas=True)
    ctx, noise = context(), start_noise()
    theirs = run_diffusers(sched, unet, ctx, noise, STEPS)[0]
    sigmas = emaki_sigmas("karras", STEPS)
    _same_points(sigmas, sched)
    model = _DiffusersTimesteps(unet, sched.timesteps)
    _check(run_emaki("uni_pc", sigmas, model, ctx, noise), theirs)


# ---- DPMSolverSDEScheduler: DPM++ SDE over the same Brownian tree ---------------------------


class _DiffusersBrownian:
    """A NoiseSampler over the very torchsde Brownian tree DPMSolverSDEScheduler builds.

    Same seed, interval and shape. Query times are snapped to the float32 values diffusers
    computes (``exp(-(-log sigma))`` and the float32 lambda-midpoint): they differ from emaki's
    float64 ones by an ulp, and torchsde rounds query times to 1e-6, so an ulp can select another
    node. torchsde is a dev-only dependency.
    """

    def __init__(self, sched: DPMSolverSDEScheduler, shape: tuple[int, ...], seed: int) -> None:
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        positive = sched.sigmas[sched.sigmas > 0]
        self.tree = BrownianTreeNoiseSampler(
            torch.zeros(shape), positive.min().item(), positive.max().item(), seed
        )
        points = torch.unique(sched.sigmas)
        times = []
        for i in range(len(points) - 1, 0, -1):  # descending, as diffusers' step() sees them
            t, t_next = points[i].log().neg(), points[i - 1].log().neg()
            times.append(t.neg().exp())
            if points[i - 1] > 0:
                times.append((t + (t_next - t) * 0.5).neg().exp())
        self.times = torch.stack(times)

    def _snap(self, sigma: Tensor) -> Tensor:
        i = int((self.times.double() - float(sigma)).abs().argmin())
        assert abs(float(self.times[i]) / float(sigma) - 1) < 1e-5, (sigma, self.times)
        return self.times[i]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self.tree(self._snap(sigma), self._snap(sigma_next))


# diffusers' own queries at exp(-(-log sigma_min)) fall an ulp below the tree's start.
@pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")
@pytest.mark.parametrize(("karras", "schedule"), [(False, "uniform"), (True, "karras")])
def test_dpmpp_sde_matches_dpmsolver_sde(unet, karras: bool, schedule: str) -> None:
    sched = DPMSolverSDEScheduler(**BETA_CONFIG, use_karras_sigmas=karras, noise_sampler_seed=7)
    ctx, noise = context(), start_noise()
    theirs = run_diffusers(sched, unet, ctx, noise, STEPS)[0]
    sigmas = emaki_sigmas(schedule, STEPS)
    assert torch.allclose(sigmas, torch.unique(sched.sigmas).flip(0), rtol=1e-5)
    brownian = _DiffusersBrownian(sched, tuple(noise.shape), seed=7)
    ours = run_emaki("dpmpp_sde", sigmas, unet, ctx, noise, noise_sampler=brownian)
    _check(ours, theirs)


# ---- DPMSolverSinglestepScheduler: DPM++ 2S (eta = 0) ---------------------------------------


def test_dpmpp_2s_matches_singlestep_order_2(unet) -> None:
    """Singlestep order 2 alternates a DDIM step to the next schedule point with a 2nd-order
    step over both; with log-uniform sigmas the inner point is the lambda-midpoint, which is
    DPM++ 2S over every other sigma. An odd step count ends with a first-order step into 0."""
    steps = 9
    sched = DPMSolverSinglestepScheduler(
        **BETA_CONFIG, solver_order=2, use_exponential_sigmas=True, final_sigmas_type="zero"
    )
    ctx, noise = context(), start_noise()
    theirs, _ = run_diffusers(sched, unet, ctx, noise, steps=steps)
    assert sched.order_list == [1, 2] * 4 + [1]
    sigmas = torch.cat([emaki_sigmas("exponential", steps)[:-1:2], torch.zeros(1)])
    every_other = torch.cat([sched.sigmas[:-1:2], sched.sigmas[-1:]])
    assert torch.allclose(sigmas, every_other, rtol=1e-5), (sigmas, sched.sigmas)
    midpoints = (sigmas[:-2] * sigmas[1:-1]).sqrt()
    assert torch.allclose(midpoints, sched.sigmas[1:-1:2], rtol=1e-5)
    model = _DiffusersTimesteps(unet, sched.timesteps)
    _check(run_emaki("dpmpp_2s_ancestral", sigmas, model, ctx, noise, eta=0.0), theirs)
