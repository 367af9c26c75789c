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

from typing import Any

import torch
from torch import Tensor

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


def report(
    callback: StepCallback | None,
    i: int,
    sigmas: Tensor,
    x: Tensor,
    denoised: Tensor,
) -> None:
    if callback is not None:
        callback(StepInfo(i, len(sigmas) - 1, float(sigmas[i]), x, denoised))


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
    for i in range(n):
        sigma = sigmas[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = require_noise(noise, "Euler (with churn)")(sigma, sigmas[i + 1]) * s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoiser(x, sigma_hat * s_in, cond)
        d = to_d(x, sigma_hat * s_in, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        report(callback, i, sigmas, x, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_euler_ancestral")


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_heun")


def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpm_2")


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpm_2_ancestral")


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_lms")


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_ddim")


def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_plms")


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_ddpm")


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_lcm")
