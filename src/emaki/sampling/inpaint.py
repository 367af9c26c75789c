"""Inpainting as a denoiser wrapper: keep the known latent where the mask says so.

With an ordinary (4-channel) model, inpainting replaces the model's x0 estimate by the known
image latent outside the mask at every evaluation (A1111's ``CFGDenoiser`` does this; Lugmayr et
al. 2022 "RePaint" resample the known region the same way, with noise). For a deterministic
first-order sampler this keeps the unmasked region on exactly the path ``x0 + sigma * n`` of
its initial noise ``n`` -- the same path diffusers' inpaint pipeline re-noises to after each step
-- while the masked region is generated in agreement with it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from emaki.sampling.denoisers import Denoiser


class MaskedDenoiser:
    """``D(x) = keep * known + (1 - keep) * inner(x)``; ``keep`` [1 or B, 1 or C, h, w] in [0, 1]."""

    def __init__(self, inner: Denoiser, known: Tensor, keep: Tensor) -> None:
        self.inner = inner
        self.known = known
        self.keep = keep

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        denoised = self.inner(x, sigma, cond)
        keep = self.keep.to(denoised.device, denoised.dtype)
        return keep * self.known.to(denoised) + (1 - keep) * denoised
