"""Analytic diffusion problems with exact denoisers, for sampler conformance tests.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = x0 + sigma * n``, the noisy marginal is
``sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)`` and the optimal denoiser is closed-form:

    D(x, sigma) = sum_k r_k(x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k))

with ``r_k`` the posterior responsibilities. For one component the probability-flow ODE
``dx/dsigma = (x - D) / sigma`` has the exact solution
``x(sigma) = mu + (x_T - mu) * sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))``; for a mixture we
integrate it with a high-order adaptive solver in float64 (scipy, rtol 1e-12) as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in ``dim`` dimensions (all tensors float64)."""

    weights: Tensor  # [K]
    means: Tensor  # [K, dim]
    stds: Tensor  # [K]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoiser(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        """Exact E[x0 | x] at noise level sigma. x: [B, dim], sigma: [B]."""
        x64, s = x.double(), sigma.double()[:, None, None]  # [B,1,1]
        var = self.stds[None, :, None] ** 2 + s**2  # [B,K,1]
        diff = x64[:, None, :] - self.means[None]  # [B,K,dim]
        log_p = (
            self.weights.log()[None, :]
            - 0.5 * (diff**2 / var).sum(-1)
            - 0.5 * self.dim * var[..., 0].log()
        )  # [B,K]
        r = torch.softmax(log_p, dim=1)[..., None]  # [B,K,1]
        post = self.means[None] + self.stds[None, :, None] ** 2 / var * diff
        return (r * post).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def variance(self) -> Tensor:
        """Per-dimension variance of the mixture."""
        m = self.mean()
        second = (self.weights[:, None] * (self.means**2 + self.stds[:, None] ** 2)).sum(0)
        return second - m**2

    def ode_solution(self, x_start: Tensor, sigma_start: float, sigma_end: float) -> Tensor:
        """Reference solution of the probability-flow ODE from sigma_start to sigma_end."""
        if len(self.weights) == 1:
            s2 = float(self.stds[0]) ** 2
            scale = ((s2 + sigma_end**2) / (s2 + sigma_start**2)) ** 0.5
            return self.means[0] + (x_start.double() - self.means[0]) * scale
        shape = x_start.shape

        def rhs(sigma: float, y: np.ndarray) -> np.ndarray:
            xt = torch.from_numpy(y).view(shape)
            sig = torch.full((shape[0],), sigma, dtype=torch.float64)
            if sigma == 0:
                return np.zeros_like(y)
            return ((xt - self.denoiser(xt, sig)) / sigma).reshape(-1).numpy()

        sol = solve_ivp(
            rhs,
            (sigma_start, sigma_end),
            x_start.double().reshape(-1).numpy(),
            method="DOP853",
            rtol=1e-12,
            atol=1e-12,
        )
        return torch.from_numpy(sol.y[:, -1]).view(shape)


def single_gaussian(dim: int = 4) -> GaussianMixture:
    return GaussianMixture(
        weights=torch.ones(1, dtype=torch.float64),
        means=torch.linspace(-1, 1, dim, dtype=torch.float64)[None],
        stds=torch.tensor([0.5], dtype=torch.float64),
    )


def two_moons_mixture(dim: int = 2) -> GaussianMixture:
    """Three well-separated components of different widths: a non-linear, multi-modal test."""
    means = torch.zeros(3, dim, dtype=torch.float64)
    means[0, 0], means[1, 0], means[2, 1] = -2.0, 2.0, 1.5
    return GaussianMixture(
        weights=torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
        means=means,
        stds=torch.tensor([0.3, 0.6, 0.45], dtype=torch.float64),
    )


def karras_sigmas(
    steps: int, sigma_min: float = 1e-3, sigma_max: float = 20.0, rho: float = 7.0
) -> Tensor:
    """Karras schedule in float64 ending in 0, independent of emaki's schedule module."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def convergence_order(errors: list[float], steps: list[int]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    x = np.log(np.asarray(steps, dtype=np.float64))
    y = -np.log(np.asarray(errors, dtype=np.float64))
    return float(np.polyfit(x, y, 1)[0])
