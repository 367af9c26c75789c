"""DPM-Solver++ family and UniPC samplers (Lu et al. 2022; Zhao et al. 2023), pure functions.

Same signature and conventions as :mod:`emaki.sampling.samplers`.

References: Lu et al. 2022a, "DPM-Solver" (arXiv:2206.00927); Lu et al. 2022b, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (arXiv:2211.01095); Zhao et
al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"
(arXiv:2302.04867); Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (arXiv:2206.00364). The stochastic variants follow the conventions of
Crowson's k-diffusion, which A1111 and ComfyUI use.

All of them are *exponential integrators* in data-prediction ("++") form. In emaki's
variance-exploding convention (``x = x0 + sigma * n``) the log-SNR time is ``lambda = -log sigma``
and a step from ``sigma`` to ``sigma_next`` has size ``h = log(sigma / sigma_next)``. Over one step
the probability-flow ODE ``dx/dlambda = D(x; lambda) - x`` has the exact solution

    x_next = (sigma_next / sigma) * x + integral_0^h e^(u-h) D(lambda + u) du            (ODE)

so the linear part is solved exactly and only the denoiser output ``D`` is approximated, by a
Taylor expansion built from earlier evaluations (multistep: 2M, 3M, UniPC) or from an extra
evaluation inside the step (singlestep: SDE, 2S). The SDE variants integrate the reverse SDE of
the family with the same marginals, ``dx = k (D - x) dlambda + sigma sqrt(2 eta) dW`` with
``k = 1 + eta``, whose step solution is

    x_next = (sigma_next/sigma) e^(-eta h) x + integral_0^h k e^(k(u-h)) D du
             + sigma_next sqrt(1 - e^(-2 eta h)) z                                           (SDE)

``eta = 0`` recovers the ODE; ``eta = 1`` is the usual reverse-time SDE (Song et al. 2021). Step-size
scalars are computed in Python floats (float64); tensors keep the dtype they come in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser
from emaki.sampling.samplers import ancestral_step, draw, report, require_noise
from emaki.sampling.types import NoiseSampler, StepCallback


def _sigma_in(x: Tensor, sigma: float) -> Tensor:
    """The noise level as the [B] tensor the denoiser takes."""
    return x.new_full((x.shape[0],), sigma)


def _ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """:func:`~emaki.sampling.samplers.ancestral_step` on Python floats."""
    down, up = ancestral_step(
        torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64), eta
    )
    return float(down), float(up)


def _check_choice(name: str, value: Any, accepted: Sequence[Any]) -> None:
    if value not in accepted:
        raise InvalidRequestError(
            f"{name} must be one of {', '.join(map(str, accepted))}; got {value!r}"
        )


def _check_range(
    name: str, value: float, low: float, high: float, *, low_inclusive: bool = True
) -> None:
    if not (low <= value if low_inclusive else low < value) or not value <= high:
        bracket = "[" if low_inclusive else "("
        raise InvalidRequestError(f"{name} must be in {bracket}{low}, {high}]; got {value!r}")


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. (2022b, Algorithm 2).

    D is extrapolated linearly in lambda from the current and the previous evaluation, using its
    value at the middle of the step: ``D ~ D_i + (D_i - D_{i-1}) / (2 r)``, ``r = h_{i-1} / h_i``.
    One model call per step. The first step has no history and is first order (DDIM); so is the
    step into sigma = 0, where h is infinite and the exact answer is ``x = D``.
    """
    sig = sigmas.tolist()
    prev: tuple[Tensor, float] | None = None  # (denoised, h) of the previous step
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_in(x, sigma), cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            d = denoised
            if prev is not None:
                d = denoised + (denoised - prev[0]) * (h / (2 * prev[1]))
            x = x * (sigma_next / sigma) - d * math.expm1(-h)
            prev = (denoised, h)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M): DPM-Solver++(2M) (Lu et al. 2022b) on the reverse SDE, with eta.

    diffusers' ``sde-dpmsolver++`` (eta = 1) and k-diffusion's ``dpmpp_2m_sde``.

    The (SDE) step of the module docstring with D extrapolated linearly from the previous
    evaluation, ``D(lambda + u) ~ D_i + u * (D_i - D_{i-1}) / h_{i-1}``. ``solver_type="heun"``
    integrates that line exactly: coefficient ``1 - (1 - e^(-kh)) / (kh)`` on
    ``(D_i - D_{i-1}) / r``. ``"midpoint"`` replaces it by its small-h form ``(1 - e^(-kh)) / 2``,
    which for ``eta = 0`` is exactly :func:`sample_dpmpp_2m`. Noise: one draw per step.
    """
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    _check_range("eta", eta, 0, math.inf)
    if eta > 0:
        noise = require_noise(noise, "DPM++ 2M SDE")
    sig = sigmas.tolist()
    prev: tuple[Tensor, float] | None = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_in(x, sigma), cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            kh = (1 + eta) * h
            x = x * (sigma_next / sigma * math.exp(-eta * h)) - denoised * math.expm1(-kh)
            if prev is not None:
                d1 = (denoised - prev[0]) * (h / prev[1])  # ~ h * dD/dlambda
                if solver_type == "heun":
                    x = x + d1 * (1 + math.expm1(-kh) / kh)
                else:
                    x = x - d1 * (0.5 * math.expm1(-kh))
            if eta > 0:
                z = draw(noise, sigmas[i], sigmas[i + 1], x)
                x = x + z * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
            prev = (denoised, h)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ SDE: a two-stage singlestep solver with ancestral noise (k-diffusion's
    "DPM++ SDE", after the singlestep DPM-Solver++(2S) of Lu et al. 2022b).

    Stage 1 takes a first-order ancestral step from sigma to ``sigma_s = sigma^(1-r) *
    sigma_next^r`` (the point at fraction r of the step in lambda) and evaluates D there. Stage 2
    takes a first-order ancestral step over the whole interval with
    ``D = (1 - 1/(2r)) D(sigma) + 1/(2r) D(sigma_s)``: second order in h. Two model calls per step;
    the last step, into sigma = 0, is one Euler step (``x = D``).

    The two stages draw noise over overlapping intervals, (sigma, sigma_s) and (sigma,
    sigma_next): the noise sampler should be a Brownian motion
    (:class:`emaki.sampling.brownian.BrownianNoise`) so the two draws are correlated as the
    increments of one path. Independent draws give a valid sampler of a slightly different chain.
    """
    _check_range("eta", eta, 0, math.inf)
    _check_range("r", r, 0, 1, low_inclusive=False)
    if eta > 0:
        noise = require_noise(noise, "DPM++ SDE")
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_in(x, sigma), cond)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_s = math.exp((1 - r) * math.log(sigma) + r * math.log(sigma_next))
            x_s = _ancestral_step(x, denoised, sigma, sigma_s, eta, s_noise, noise)
            denoised_s = denoiser(x_s, _sigma_in(x, sigma_s), cond)
            fac = 1 / (2 * r)
            d = denoised * (1 - fac) + denoised_s * fac
            x = _ancestral_step(x, d, sigma, sigma_next, eta, s_noise, noise)
        report(callback, i, sigmas, x, denoised)
    return x


def _ancestral_step(
    x: Tensor,
    denoised: Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    s_noise: float,
    noise: NoiseSampler | None,
) -> Tensor:
    """First-order (DDIM = DPM-Solver-1) step to sigma_down, then noise of size sigma_up."""
    down, up = _ancestral_split(sigma, sigma_next, eta)
    x = x * (down / sigma) + denoised * (1 - down / sigma)
    if up > 0 and noise is not None:
        interval = torch.tensor([sigma, sigma_next], dtype=torch.float64)
        z = draw(noise, interval[0], interval[1], x)
        x = x + z * (up * s_noise)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) with ancestral noise.

    Each step is split as in ancestral sampling into a deterministic step down to sigma_down and
    fresh noise of size sigma_up (:func:`_ancestral_split`). The deterministic part is
    DPM-Solver++(2S): a DDIM step to the lambda-midpoint ``sqrt(sigma * sigma_down)``, a model
    call there, and a first-order step over the whole interval using that midpoint value
    (exact for D linear in lambda). Two model calls per step; ``eta = 0`` is deterministic.
    """
    _check_range("eta", eta, 0, math.inf)
    if eta > 0:
        noise = require_noise(noise, "DPM++ 2S a")
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_in(x, sigma), cond)
        down, up = _ancestral_split(sigma, sigma_next, eta)
        if down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sigma * down)
            x_mid = x * (sigma_mid / sigma) + denoised * (1 - sigma_mid / sigma)
            denoised_mid = denoiser(x_mid, _sigma_in(x, sigma_mid), cond)
            x = x * (down / sigma) + denoised_mid * (1 - down / sigma)
        if up > 0:
            x = x + draw(noise, sigmas[i], sigmas[i + 1], x) * (up * s_noise)
        report(callback, i, sigmas, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
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
    """SDE-DPM-Solver++(3M): the third-order multistep member of Lu et al. (2022b), with eta.

    The (SDE) step of the module docstring with D expanded to second order around the current
    point from the last three evaluations by Newton divided differences in lambda:
    ``D(lambda+u) ~ D_0 + u D' + u^2/2 D''``, whose integral against ``k e^(k(u-h))`` gives the
    coefficients ``phi_2(kh) = 1 - (1 - e^(-kh)) / (kh)`` on ``h D'`` and
    ``phi_3(kh) = 1 - 2/(kh) + 2 (1 - e^(-kh)) / (kh)^2`` on ``h^2 D'' / 2``.

    Note: k-diffusion (and so A1111/ComfyUI "DPM++ 3M SDE") and diffusers' order-3 multistep
    DPM-Solver++ weight the ``h^2 D''/2`` term by half of phi_3, which makes their deterministic
    (eta = 0) limit second order; with the exact weight used here it is third order (measured on
    the analytic conformance problems). The first two steps use orders 1 and 2; the step into
    sigma = 0 is ``x = D``. One model call and one noise draw per step.
    """
    _check_range("eta", eta, 0, math.inf)
    if eta > 0:
        noise = require_noise(noise, "DPM++ 3M SDE")
    sig = sigmas.tolist()
    hist: list[tuple[float, Tensor]] = []  # (lambda, denoised), most recent first
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_in(x, sigma), cond)
        hist = [(-math.log(sigma), denoised), *hist[:2]]
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            kh = (1 + eta) * h
            phi_2 = 1 + math.expm1(-kh) / kh
            phi_3 = 1 - 2 / kh - 2 * math.expm1(-kh) / kh**2
            x = x * (sigma_next / sigma * math.exp(-eta * h)) - denoised * math.expm1(-kh)
            if len(hist) >= 2:
                d1, d2 = _taylor_terms(hist, h)
                x = x + d1 * phi_2
                if d2 is not None:
                    x = x + d2 * phi_3
            if eta > 0:
                z = draw(noise, sigmas[i], sigmas[i + 1], x)
                x = x + z * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        report(callback, i, sigmas, x, denoised)
    return x


def _taylor_terms(hist: list[tuple[float, Tensor]], h: float) -> tuple[Tensor, Tensor | None]:
    """``h * D'`` and ``h^2 * D'' / 2`` at hist[0] from 2 or 3 past points (Newton form).

    With points lambda_0 > lambda_1 > lambda_2 and divided differences ``f01 = (D_0 - D_1) /
    (lambda_0 - lambda_1)`` etc.: ``D' ~ f01 + (lambda_0 - lambda_1) f012`` and ``D''/2 ~ f012``.
    """
    (l0, m0), (l1, m1) = hist[0], hist[1]
    f01 = (m0 - m1) / (l0 - l1)
    if len(hist) < 3:
        return f01 * h, None
    l2, m2 = hist[2]
    f012 = (f01 - (m1 - m2) / (l1 - l2)) / (l0 - l2)
    return (f01 + f012 * (l0 - l1)) * h, f012 * h**2


# ---- UniPC ---------------------------------------------------------------------------------


def _unipc_weights(h: float, rks: list[float], variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights rho_k of UniPC's update (Zhao et al. 2023, UniP-p / UniC-p).

    For data prediction (``z = -h``) the rho solve ``sum_k rho_k r_k^(j-1) = b_j``,
    ``b_j = -j! * z phi_(j+1)(z) / B(h)`` (j = 1..K) with ``phi_j`` the exponential-integrator
    functions. ``B(h) = h`` is variant bh1, ``B(h) = 1 - e^(-h)`` variant bh2.
    """
    z = -h
    b_h = h if variant == "bh1" else -math.expm1(-h)
    g = math.expm1(z) / z - 1  # z * phi_2(z); then z * phi_(j+1)(z) by the phi recurrence
    b, fact = [], 1
    for j in range(1, len(rks) + 1):
        fact *= j
        b.append(-g * fact / b_h)
        g = g / z - 1 / (fact * (j + 1))
    r = torch.tensor(rks, dtype=torch.float64)
    powers = torch.stack([r**j for j in range(len(rks))])  # [K, K]: row j holds r_k^j
    rho = torch.linalg.solve(powers, torch.tensor(b, dtype=torch.float64))
    return b_h, rho.tolist()


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    hist: list[tuple[float, Tensor]],
    order: int,
    variant: str,
    denoised_next: Tensor | None = None,
) -> Tensor:
    """UniP-``order`` predictor from sigma to sigma_next or, given ``denoised_next`` (D at the
    predicted point), the UniC-``order`` corrector of that same step.

    ``hist`` holds (lambda, D) most recent first, hist[0] at sigma. Both are
    ``x_next = (sigma_next/sigma) x + (1 - e^(-h)) D_0 + B(h) sum_k rho_k (D_k - D_0) / r_k``
    with ``r_k = (lambda_k - lambda_0) / h``: the predictor over the ``order - 1`` past points,
    the corrector over those and the new point (r = 1).
    """
    l0, m0 = hist[0]
    if sigma_next == 0:
        return m0
    h = math.log(sigma / sigma_next)
    x_next = x * (sigma_next / sigma) - m0 * math.expm1(-h)
    points = [((lk - l0) / h, mk) for lk, mk in hist[1:order]]
    if denoised_next is not None:
        points.append((1.0, denoised_next))
    if not points:
        return x_next
    if len(points) == 1:
        # UniC-1 and UniP-2 use rho = 1/2, the h -> 0 limit of the solve, as Zhao et al.'s
        # reference code does (so UniP-2 with bh2 is exactly DPM-Solver++(2M)).
        b_h = h if variant == "bh1" else -math.expm1(-h)
        rho = [0.5]
    else:
        b_h, rho = _unipc_weights(h, [rk for rk, _ in points], variant)
    correction = sum((mk - m0) * (w / rk) for w, (rk, mk) in zip(rho, points))
    return x_next + correction * b_h


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models"), multistep, data prediction, B(h) variants bh1 / bh2.

    Each step predicts with UniP-p from the last p evaluations; the model is then called at the
    predicted point, and before the next step that evaluation corrects the prediction (UniC-p,
    which raises the order by one) and is reused as the next step's history. So UniPC costs one
    model call per step. The order warms up (1, 2, ...) over the first steps and drops at the end
    (p <= steps left), so the last step, into sigma = 0, is ``x = D``. ``order`` is 1..3.
    """
    _check_choice("order", order, (1, 2, 3))
    _check_choice("variant", variant, ("bh1", "bh2"))
    sig = sigmas.tolist()
    n = len(sig) - 1
    hist: list[tuple[float, Tensor]] = []  # (lambda, denoised), most recent first
    x_start, p_prev = x, 0
    for i in range(n):
        denoised = denoiser(x, _sigma_in(x, sig[i]), cond)
        if i > 0:
            x = _unipc_update(x_start, sig[i - 1], sig[i], hist, p_prev, variant, denoised)
        hist = [(-math.log(sig[i]), denoised), *hist[: order - 1]]
        p = min(order, i + 1, n - i)
        x_start, p_prev = x, p
        x = _unipc_update(x, sig[i], sig[i + 1], hist, p, variant)
        report(callback, i, sigmas, x, denoised)
    return x
