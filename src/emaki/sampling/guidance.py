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
    """The conditionings CFG combines: the prompt (one or more weighted parts) and the negative.

    ``positive`` with ``weight`` is the first part; ``more`` holds further parts of a composable
    prompt (``a cat AND a dog :0.8``), each with its weight. The negative prompt ("" if none) is
    the unconditional side.
    """

    positive: Conditioning
    negative: Conditioning
    weight: float = 1.0
    more: tuple[tuple[float, Conditioning], ...] = ()

    @property
    def parts(self) -> tuple[tuple[float, Conditioning], ...]:
        """All positive parts with their weights, the first one first."""
        return ((self.weight, self.positive), *self.more)

    @property
    def is_plain(self) -> bool:
        """One positive part of weight 1: ordinary CFG."""
        return not self.more and self.weight == 1.0

    def groups(self, batch_size: int) -> list[tuple[list[int], Conditioning]]:
        """The conditionings (parts, then the negative) grouped into batched model calls.

        Conditionings whose shapes past the batch axis agree share one call; each group is
        ``(indices, batched conditioning)`` with every member repeated to ``batch_size``.
        Computed once per batch size.
        """
        cache = self.__dict__.setdefault("_groups", {})  # frozen: cache outside the fields
        if batch_size not in cache:
            conds = [c for _, c in self.parts] + [self.negative.as_negative()]
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, c in enumerate(conds):
                by_shape.setdefault(tuple(c.context.shape[1:]), []).append(i)
            cache[batch_size] = [
                (idx, Conditioning.cat([conds[i].repeat_to(batch_size) for i in idx]))
                for idx in by_shape.values()
            ]
        return cache[batch_size]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) with a negative prompt, AND parts, rescale.

    ``D = D_neg + scale * sum_k w_k (D_k - D_neg)`` in x0 space, over the prompt's parts ``k``
    (composable diffusion, Liu et al. 2022, as A1111 combines it; one part of weight 1 is plain
    CFG). This is identical to guiding epsilon or v, since the map from model output to x0 is
    affine with the same coefficients for every term. All conditionings whose shapes match run as
    one batched model call (the usual case); prompts of different lengths make separate calls.

    ``rescale`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    eq. 15-16) rescales the guided result to the standard deviation of the positive prediction
    and mixes: ``phi * rescaled + (1 - phi) * guided``. As in that paper and in diffusers it is
    computed on the model's noise prediction; in x0 space that is the same up to the affine map,
    and we apply it to ``x - D`` (proportional to epsilon) so that it is parameterisation-free.
    With several parts the "positive prediction" is their guidance-scale-1 combination.
    """

    def __init__(self, inner: Denoiser, scale: float, rescale: float = 0.0) -> None:
        self.inner = inner
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(self, x: Tensor, sigma: Tensor, cond: GuidedCond) -> Tensor:
        b = x.shape[0]
        if self.scale == 1.0 and self.rescale == 0.0 and cond.is_plain:
            return self.inner(x, sigma, cond.positive.repeat_to(b))
        outs: list[Tensor | None] = [None] * (len(cond.parts) + 1)
        for idx, batched in cond.groups(b):
            n = len(idx)
            out = self.inner(torch.cat([x] * n), torch.cat([sigma] * n), batched)
            for i, d in zip(idx, out.chunk(n), strict=True):
                outs[i] = d
        d_neg = outs[-1]
        assert d_neg is not None
        delta = sum(w * (d - d_neg) for (w, _), d in zip(cond.parts, outs, strict=False))
        guided = d_neg + self.scale * delta
        if self.rescale > 0:
            guided = _rescale(x, d_neg + delta, guided, self.rescale)
        return guided


def _rescale(x: Tensor, d_pos: Tensor, guided: Tensor, phi: float) -> Tensor:
    dims = tuple(range(1, x.ndim))
    eps_pos, eps_cfg = x - d_pos, x - guided  # both proportional to epsilon (factor sigma)
    std_pos = eps_pos.std(dim=dims, keepdim=True)
    std_cfg = eps_cfg.std(dim=dims, keepdim=True)
    rescaled = eps_cfg * (std_pos / std_cfg)
    eps = phi * rescaled + (1 - phi) * eps_cfg
    return x - eps
