"""Denoisers: discrete-time diffusion models seen as ``denoiser(x, sigma, cond) -> denoised``.

Every sampler in emaki talks to a model through one contract (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", the "D(x; sigma)" of eq. 2): given a noisy
sample ``x = x0 + sigma * n`` in variance-*exploding* form, return the model's estimate of ``x0``.
Parameterisation (epsilon, v, x0) and the mapping from continuous sigma to the model's discrete
timestep live only here, so samplers never branch on prediction type.

A Stable-Diffusion UNet is trained in variance-*preserving* form ``x_t = sqrt(a) x0 + sqrt(1-a) n``
with ``a = alphas_cumprod[t]``. Dividing by ``sqrt(a)`` gives the VE form with
``sigma = sqrt((1 - a) / a)``, so the model input is ``x * c_in`` with ``c_in = 1/sqrt(sigma^2+1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]

#: A raw network: ``model(x_in, t, cond) -> output`` where ``x_in`` is the VP-scaled input and
#: ``t`` a float tensor of timesteps, shape [B].
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


class Denoiser(Protocol):
    """The one contract between models and samplers: ``x0 = denoiser(x, sigma, cond)``.

    ``x`` has shape [B, C, H, W] (or any [B, ...]), ``sigma`` shape [B]; the result has x's shape.
    """

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a [B] tensor to [B, 1, 1, ...] so it broadcasts against an ``ndim`` tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class DiscreteSchedule:
    """The noise levels of a model trained on discrete timesteps 0..T-1, in sigma space.

    Holds ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` (ascending in t) and
    converts between continuous sigma and fractional timesteps by linear interpolation in
    log-sigma (as k-diffusion, A1111 and ComfyUI do). Values are kept in float32, like the
    models' own schedules, so that a timestep on the grid maps to exactly that integer.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = alphas_cumprod.detach().to("cpu", torch.float32)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac) ** 0.5  # [T], ascending
        self.log_sigmas = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep(s) for sigma(s), clamped to [0, T-1]."""
        log_sigma = sigma.to(torch.float32).cpu().log()
        dists = log_sigma - self.log_sigmas[:, None]  # [T, N]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.num_timesteps - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape).to(sigma.device)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma(s) at fractional timestep(s), interpolating log-sigma linearly."""
        t = t.to(torch.float32).cpu()
        low_idx = t.floor().long().clamp(0, self.num_timesteps - 1)
        high_idx = t.ceil().long().clamp(0, self.num_timesteps - 1)
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


class DiscreteDenoiser:
    """Wraps a discrete-time VP model (epsilon-, v- or x0-prediction) as a :class:`Denoiser`.

    epsilon: ``D = x - sigma * eps``                                  (Ho et al. 2020)
    v:       ``D = x / (sigma^2+1) - v * sigma / sqrt(sigma^2+1)``     (Salimans & Ho 2022)
    sample:  ``D = model output``
    """

    def __init__(
        self,
        model: ModelFn,
        schedule: DiscreteSchedule,
        prediction_type: PredictionType = "epsilon",
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        s = append_dims(sigma.to(x.dtype), x.ndim)
        c_in = (s**2 + 1) ** -0.5
        t = self.schedule.sigma_to_t(sigma)
        out = self.model(x * c_in, t, cond)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x * c_in**2 - out * s * c_in
        return out


def thresholded(
    denoiser: Denoiser, percentile: float = 0.995, max_threshold: float = float("inf")
) -> Denoiser:
    """Dynamic thresholding of the x0 estimate (Saharia et al. 2022, Imagen, section 2.3).

    For pixel-space models with data in [-1, 1]: per sample, ``s`` is the ``percentile``
    quantile of ``|x0|``, clamped to [1, max_threshold]; x0 is clamped to [-s, s] and divided by
    s. With s = 1 this is plain clipping. It prevents saturated images at high guidance.
    Latent-space models should not use it (latents are not bounded to [-1, 1]).
    """

    def wrapped(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        x0 = denoiser(x, sigma, cond)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, percentile, dim=1).clamp(1.0, max_threshold).to(x0.dtype)
        s = append_dims(s, x0.ndim)
        return x0.clamp(-s, s) / s

    return wrapped
