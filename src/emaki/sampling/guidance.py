"""Classifier-free guidance as a denoiser wrapper.

Guidance wraps a denoiser and returns a denoiser, so noise, guider, sampler and sigmas are four
independent choices. The wrapped denoiser takes a :class:`GuidedCond` (positive and negative
conditioning) as its ``cond``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.sampling.denoisers import Denoiser


@dataclass(frozen=True)
class GuidedCond:
    """The conditioning pair for CFG: the prompt and the negative prompt ("" if none)."""

    positive: Conditioning
    negative: Conditioning

    def batched(self, batch_size: int) -> Conditioning | None:
        """Positive and negative repeated to ``batch_size`` and concatenated, computed once.

        None when their token lengths differ (then guidance makes two model calls).
        """
        cache = self.__dict__.setdefault("_batched", {})  # frozen: cache outside the fields
        if batch_size not in cache:
            pos = self.positive.repeat_to(batch_size)
            neg = self.negative.repeat_to(batch_size)
            cache[batch_size] = Conditioning.cat([pos, neg]) if pos.can_cat(neg) else None
        return cache[batch_size]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) with a negative prompt and rescale.

    ``D = D_neg + scale * (D_pos - D_neg)`` in x0 space (identical to guiding epsilon or v, since
    the map from model output to x0 is affine with the same coefficients for both halves).
    Positive and negative run as one batched model call when their shapes match (the usual
    case), otherwise as two calls.

    ``rescale`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    eq. 15-16) rescales the guided result to the standard deviation of the positive prediction
    and mixes: ``phi * rescaled + (1 - phi) * guided``. As in that paper and in diffusers it is
    computed on the model's noise prediction; in x0 space that is the same up to the affine map,
    and we apply it to ``x - D`` (proportional to epsilon) so that it is parameterisation-free.
    """

    def __init__(self, inner: Denoiser, scale: float, rescale: float = 0.0) -> None:
        self.inner = inner
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(self, x: Tensor, sigma: Tensor, cond: GuidedCond) -> Tensor:
        pos, neg = cond.positive, cond.negative
        b = x.shape[0]
        if self.scale == 1.0 and self.rescale == 0.0:
            return self.inner(x, sigma, pos.repeat_to(b))
        both = cond.batched(b)
        if both is not None:
            out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            d_pos, d_neg = out.chunk(2)
        else:
            d_pos = self.inner(x, sigma, pos.repeat_to(b))
            d_neg = self.inner(x, sigma, neg.repeat_to(b))
        guided = d_neg + self.scale * (d_pos - d_neg)
        if self.rescale > 0:
            guided = _rescale(x, d_pos, guided, self.rescale)
        return guided


def _rescale(x: Tensor, d_pos: Tensor, guided: Tensor, phi: float) -> Tensor:
    dims = tuple(range(1, x.ndim))
    eps_pos, eps_cfg = x - d_pos, x - guided  # both proportional to epsilon (factor sigma)
    std_pos = eps_pos.std(dim=dims, keepdim=True)
    std_cfg = eps_cfg.std(dim=dims, keepdim=True)
    rescaled = eps_cfg * (std_pos / std_cfg)
    eps = phi * rescaled + (1 - phi) * eps_cfg
    return x - eps
