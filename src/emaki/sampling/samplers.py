"""Samplers of the Euler / Heun / linear-multistep / DDIM families, as pure functions.

Every sampler has the same signature::

    sample_x(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, **options) -> Tensor

``x`` is the starting sample at ``sigmas[0]`` (for txt2img: unit noise times ``sigmas[0]``),
``sigmas`` a descending schedule ending in 0, ``denoiser(x, sigma, cond)`` the model (see
:mod:`emaki.sampling.denoisers`), ``noise`` a :class:`~emaki.sampling.types.NoiseSampler`
(required by stochastic samplers), ``callback`` receives a
:class:`~emaki.sampling.types.StepInfo` after every step. No state survives a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser, append_dims
from emaki.sampling.types import NoiseSampler, StepCallback, StepInfo


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (Karras eq. 3)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def require_noise(noise: NoiseSampler | None, sampler: str) -> NoiseSampler:
    """Stochastic samplers must be given their noise explicitly (it decides reproducibility)."""
    if noise is None:
        raise ValueError(f"the {sampler} sampler is stochastic and needs a noise sampler")
    return noise


def draw(noise: NoiseSampler, sigma: Tensor, sigma_next: Tensor, x: Tensor) -> Tensor:
    """One standard-normal draw for the step sigma -> sigma_next, in x's dtype and device.

    Noise sources draw in float32 on the CPU (for reproducibility across devices); the cast lets
    one source serve a float64 or accelerator run without promoting or moving x.
    """
    return noise(sigma, sigma_next).to(x)


def report(
    callback: StepCallback | None,
    i: int,
    sigmas: Tensor,
    x: Tensor,
    denoised: Tensor,
) -> None:
    if callback is not None:
        callback(StepInfo(i, len(sigmas) - 1, float(sigmas[i]), x, denoised))


@dataclass(frozen=True)
class Churn:
    """Stochastic churn of Karras et al. (2022), "Elucidating the Design Space...", Alg. 2.

    Before a step at ``sigma`` inside [s_tmin, s_tmax], fresh noise raises the noise level to
    ``sigma_hat = sigma * (1 + gamma)``, ``gamma = min(s_churn / steps, sqrt(2) - 1)``; the step
    then starts from ``sigma_hat``. With ``s_churn = 0`` (the default) nothing happens and no noise
    is drawn, so the sampler stays deterministic.
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        steps: int,
        noise: NoiseSampler | None,
        sampler: str,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(x at sigma_hat, sigma_hat)``."""
        gamma = (
            min(self.s_churn / steps, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
        )
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = draw(require_noise(noise, sampler), sigma, sigma_next, x) * self.s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        return x, sigma_hat


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split the step sigma -> sigma_next into a deterministic move and fresh noise.

    Returns ``(sigma_down, sigma_up)`` with ``sigma_down^2 + sigma_up^2 = sigma_next^2``: an
    ancestral sampler steps the ODE from sigma down to ``sigma_down``, then adds noise of standard
    deviation ``sigma_up``. With ``eta = 1``,

        sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2,

    the variance of the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7) written for
    ``x = x0 + sigma * n``; ``eta`` scales sigma_up exactly as it scales DDIM's sigma_t(eta)
    (Song et al. 2020, eq. 16), so ``eta = 0`` is deterministic. Values of ``eta`` above 1 are
    clamped at ``sigma_up = sigma_next`` (all of the step is noise), as in k-diffusion.
    """
    if eta < 0:
        raise InvalidRequestError(f"eta must be >= 0, got {eta}")
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_up, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2).

    With ``s_churn = 0`` (the default) it is deterministic and first order.
    """
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    for i in range(n):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1], n, noise, "Euler (with churn)")
        denoised = denoiser(x, sigma_hat * s_in, cond)
        d = to_d(x, sigma_hat * s_in, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral ("Euler a"): an Euler step to sigma_down, then fresh noise of sigma_up.

    An Euler step of the probability-flow ODE (Karras et al. 2022, eq. 3) followed by noise, with
    the split of :func:`ancestral_step`. With ``eta = 1`` (the default) each step samples the DDPM
    posterior (Ho et al. 2020) around the model's x0 estimate, so it equals :func:`sample_ddpm`
    and DDIM with ``eta = 1`` in exact arithmetic; ``eta = 0`` is Euler. First order: its
    variance is biased by O(1 / steps).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma * s_in, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + draw(require_noise(noise, "Euler a"), sigma, sigma_next, x) * s_noise * sigma_up
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 2).

    An Euler predictor to sigma_next, then the trapezoidal corrector averaging the derivatives at
    both ends: two model evaluations per step. The last step, to sigma = 0, is a plain Euler step
    (the derivative is undefined at sigma = 0). Optional churn as in :class:`Churn`.
    """
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    for i in range(n):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = churn(x, sigmas[i], sigma_next, n, noise, "Heun (with churn)")
        denoised = denoiser(x, sigma_hat * s_in, cond)
        d = to_d(x, sigma_hat * s_in, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_pred = to_d(x_pred, sigma_next * s_in, denoiser(x_pred, sigma_next * s_in, cond))
            x = x + (d + d_pred) / 2 * dt
        report(callback, i, sigmas, x, denoised)
    return x


def _log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    """The geometric mean of two noise levels, the midpoint in log-sigma."""
    return a.log().lerp(b.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2: DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Alg. 1 with r1 = 1/2) in sigma form.

    For ``x = x0 + sigma * eps`` DPM-Solver's exponential integrator with noise prediction reduces
    to Euler steps in sigma with ``eps = (x - x0) / sigma``, and its intermediate point (halfway in
    lambda = -log sigma) is the geometric mean ``sigma_mid = sqrt(sigma * sigma_next)``: an Euler
    step to sigma_mid, then the whole step with the derivative evaluated there (the midpoint
    method in log-sigma; k-diffusion's and A1111's "DPM2"). Second order, two model evaluations
    per step; the last step, to sigma = 0, is an Euler step. Optional churn as in :class:`Churn`.
    """
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    for i in range(n):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = churn(x, sigmas[i], sigma_next, n, noise, "DPM2 (with churn)")
        denoised = denoiser(x, sigma_hat * s_in, cond)
        d = to_d(x, sigma_hat * s_in, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigma_next)
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = to_d(x_mid, sigma_mid * s_in, denoiser(x_mid, sigma_mid * s_in, cond))
            x = x + d_mid * (sigma_next - sigma_hat)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2 ancestral: a DPM2 (log-sigma midpoint) step to sigma_down, then noise of sigma_up.

    The deterministic part is :func:`sample_dpm_2`'s step (Lu et al. 2022) ending at sigma_down
    instead of sigma_next; the split is :func:`ancestral_step`. A step whose sigma_down is 0 (the
    last one) is an Euler step.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        d = to_d(x, sigma * s_in, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = to_d(x_mid, sigma_mid * s_in, denoiser(x_mid, sigma_mid * s_in, cond))
            x = x + d_mid * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + draw(require_noise(noise, "DPM2 a"), sigma, sigma_next, x) * s_noise * sigma_up
        report(callback, i, sigmas, x, denoised)
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of the derivatives d_i, d_{i-1}, ... in the linear multistep step i -> i+1.

    The derivative is interpolated by the Lagrange polynomial through the last ``order`` nodes
    ``sigma_i, ..., sigma_{i-order+1}``; weight j is the exact integral of the basis polynomial of
    node ``sigma_{i-j}`` over [sigma_i, sigma_{i+1}] (an Adams–Bashforth method for variable step
    sizes). ``sigmas`` is float64; the integral is computed analytically.
    """
    nodes = sigmas[i - order + 1 : i + 1][::-1]  # sigma_i, sigma_{i-1}, ...
    weights = []
    for j in range(order):
        basis = Polynomial([1.0])
        for k, node in enumerate(nodes):
            if k != j:
                basis *= Polynomial([-node, 1.0]) / (nodes[j] - node)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
    return weights


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams–Bashforth) on the probability-flow ODE in sigma, of order ``order``.

    Reuses the derivatives of the previous ``order - 1`` steps (one model evaluation per step)
    with the variable-step weights of :func:`lms_coefficients`; the first steps, with less
    history, use as many as there are. Deterministic; k-diffusion's and A1111's "LMS".
    """
    if order < 1:
        raise InvalidRequestError(f"LMS order must be at least 1, got {order}")
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    history: list[Tensor] = []  # derivatives of the last steps, newest last
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * s_in, cond)
        history.append(to_d(x, sigma * s_in, denoised))
        if len(history) > order:
            history.pop(0)
        weights = lms_coefficients(sigmas_np, i, len(history))
        x = x + sum(w * d for w, d in zip(weights, reversed(history)))
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", eq. 12).

    In variance-preserving terms, with ``a = alpha_bar_t`` and ``a' = alpha_bar_prev``,

        x' = sqrt(a') x0 + sqrt(1 - a' - s_eta^2) eps + s_eta z,
        s_eta = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')                      (eq. 16).

    Dividing by ``sqrt(a')`` and substituting ``a = 1 / (1 + sigma^2)`` turns it into
    ``x' = x0 + sigma_down eps + sigma_up z`` with ``eps = (x - x0) / sigma`` and

        sigma_up = s_eta / sqrt(a') = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma,
        sigma_down = sqrt(sigma'^2 - sigma_up^2),

    which is :func:`ancestral_step`. So ``eta = 0`` (the default, deterministic) is exactly an
    Euler step of the probability-flow ODE, and ``eta = 1`` samples the DDPM posterior.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma * s_in, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + draw(require_noise(noise, "DDIM (eta > 0)"), sigma, sigma_next, x) * sigma_up
        report(callback, i, sigmas, x, denoised)
    return x


#: Adams–Bashforth weights for equal steps, newest derivative first (PLMS, Liu et al. 2022).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical
    Methods for Diffusion Models on Manifolds"), as CompVis and diffusers run it (no Runge–Kutta
    warm-up: diffusers' ``skip_prk_steps``).

    Each step combines the epsilon estimates ``eps = (x - x0) / sigma`` (= the ODE derivative in
    sigma) of the last steps with the fixed Adams–Bashforth weights of equal steps, orders 2, 3,
    then 4, and transfers x with DDIM's update, which in sigma space is an Euler step with that
    combined eps. The first step has no history: a pseudo improved-Euler (Heun) step with two
    model evaluations, whose second eps is not kept. The weights assume equal steps in the
    timestep index; as sigma is not linear in it, the method is second order in sigma (the
    Adams–Bashforth average of eps over the index is not its average over sigma).
    """
    s_in = x.new_ones([x.shape[0]])
    history: list[Tensor] = []  # eps of the last (up to 3) steps at their start, newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        eps = to_d(x, sigma * s_in, denoised)
        if not history and sigma_next > 0:
            x_pred = x + eps * (sigma_next - sigma)
            eps_pred = to_d(x_pred, sigma_next * s_in, denoiser(x_pred, sigma_next * s_in, cond))
            eps_step = (eps + eps_pred) / 2
        else:
            recent = [eps, *reversed(history)]  # newest first
            eps_step = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(recent)], recent))
        history = [*history[-2:], eps]
        x = x + eps_step * (sigma_next - sigma)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling of the DDPM posterior (Ho, Jain & Abbeel 2020, eqs. 6-7), "fixed_small".

    q(x_{t'} | x_t, x0) has mean ``sqrt(a') beta / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x_t``
    and variance ``(1 - a') / (1 - a) beta`` with ``beta = 1 - a / a'``. With
    ``a = 1 / (1 + sigma^2)`` and x in variance-exploding form (``x_VE = x_VP / sqrt(a)``) it is

        x' = r x + (1 - r) x0 + sigma' sqrt(1 - r) z,    r = sigma'^2 / sigma^2,

    for any pair of noise levels, so it runs on any schedule. In exact arithmetic this equals
    Euler a and DDIM with ``eta = 1``; here it is written as the posterior's convex combination.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        r = (sigma_next / sigma) ** 2
        x = denoised + r * (x - denoised)
        if sigma_next > 0:
            z = draw(require_noise(noise, "DDPM"), sigma, sigma_next, x)
            x = x + z * sigma_next * (1 - r) ** 0.5
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, "Latent
    Consistency Models", Alg. 1).

    The model's x0 estimate is taken as the sample, and, unless it is the last step, noised
    afresh to the next level: ``x = x0 + sigma_next * z``. For consistency-distilled models
    (LCM, LCM-LoRA) and few steps; with an ordinary diffusion model, whose x0 estimate is a
    posterior mean rather than a point of the data distribution, it is biased (under-dispersed)
    at any number of steps. LCM's boundary condition ``c_skip x + c_out x0`` with
    ``c_skip = 0.25 / ((10 t)^2 + 0.25)`` is not applied: ``c_skip`` is below 7e-6 at LCM's
    timesteps (t >= 19) and moves SD latents by a few 1e-6 (measured against diffusers).
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, cond)
        x = denoised
        if sigma_next > 0:
            x = x + draw(require_noise(noise, "LCM"), sigma, sigma_next, x) * sigma_next
        report(callback, i, sigmas, x, denoised)
    return x
