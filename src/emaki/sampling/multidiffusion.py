"""MultiDiffusion (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled
Image Generation") as a denoiser wrapper.

A latent larger than the model's window is covered by overlapping windows; the model denoises
each window, and the fused estimate is, per pixel, the weighted average of the windows' (and
prompts') estimates that cover it -- the closed-form minimiser of Bar-Tal's eq. 3 with
per-window weights W_i (eq. 5): ``D = sum_i W_i * D_i / sum_i W_i``. Because the wrapper is
itself a denoiser, any sampler and any guidance run unchanged, and one global latent means
overlapping windows always agree after every step.

Region prompts (Bar-Tal sec. 4.2): each region has its own conditioning and a latent-size mask.
A region's estimates are weighted by its mask; the background prompt gets ``1 - max(masks)``,
so inside a region's mask the region's prompt decides and the image stays one image at the
seams. Windows that a region's mask does not touch are not evaluated for that region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser

Window = tuple[int, int, int, int]  #: (top, left, height, width) in latent pixels


def windows(
    height: int, width: int, window: tuple[int, int], stride: tuple[int, int]
) -> list[Window]:
    """Windows of size ``window`` covering a ``height`` x ``width`` latent, every ``stride``;
    the last row and column are flush with the edges, so every pixel is covered."""
    wh, ww = min(window[0], height), min(window[1], width)
    sh, sw = stride
    if sh <= 0 or sw <= 0 or sh > wh or sw > ww:
        raise InvalidRequestError(
            f"the stride {stride} must be positive and at most the window {(wh, ww)}"
        )
    tops = list(range(0, height - wh + 1, sh))
    lefts = list(range(0, width - ww + 1, sw))
    if tops[-1] != height - wh:
        tops.append(height - wh)
    if lefts[-1] != width - ww:
        lefts.append(width - ww)
    return [(t, left, wh, ww) for t in tops for left in lefts]


@dataclass(frozen=True)
class Region:
    """A region prompt: the conditioning the inner denoiser takes, and a latent mask [H, W]."""

    cond: Any
    mask: Tensor


def box_mask(box: tuple[int, int, int, int], height: int, width: int, down: int) -> Tensor:
    """A latent-size [H, W] mask from a pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise InvalidRequestError(f"a region box is (x0, y0, x1, y1) with x0 < x1, y0 < y1: {box}")
    mask = torch.zeros(height, width)
    mask[y0 // down : -(-y1 // down), x0 // down : -(-x1 // down)] = 1.0
    if not mask.any():
        raise InvalidRequestError(f"the region box {box} lies outside the image")
    return mask


class MultiDiffusion:
    """``D(x) = sum over windows and prompts of W * D_window / sum of W`` (Bar-Tal eq. 5)."""

    def __init__(
        self,
        inner: Denoiser,
        *,
        window: tuple[int, int],
        stride: tuple[int, int],
        regions: Sequence[Region] = (),
        max_batch: int = 4,
    ) -> None:
        self.inner = inner
        self.window = window
        self.stride = stride
        self.regions = tuple(regions)
        self.max_batch = max(1, max_batch)

    def on_step(self, info: Any) -> None:
        hook = getattr(self.inner, "on_step", None)
        if hook is not None:
            hook(info)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        b, _, h, w = x.shape  # x: [B, C, H, W]
        wins = windows(h, w, self.window, self.stride)
        for r in self.regions:
            if tuple(r.mask.shape) != (h, w):
                raise InvalidRequestError(
                    f"a region mask is {tuple(r.mask.shape)}, the latent is {(h, w)}"
                )
        masks = [r.mask.to(x.device, x.dtype) for r in self.regions]
        background = torch.ones(h, w, device=x.device, dtype=x.dtype)
        if masks:
            background = (1 - torch.stack(masks).amax(0)).clamp(min=0)
        value = torch.zeros_like(x)
        count = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
        jobs = [(cond, background)] + [(r.cond, m) for r, m in zip(self.regions, masks)]
        for c, weight in jobs:
            active = [win for win in wins if bool(_crop(weight, win).any())]
            for start in range(0, len(active), self.max_batch):
                group = active[start : start + self.max_batch]
                crops = torch.cat([_crop(x, win) for win in group])  # [n*B, C, wh, ww]
                out = self.inner(crops, sigma.repeat(len(group)), c)
                for k, win in enumerate(group):
                    t, left, wh, ww = win
                    wgt = _crop(weight, win)[None, None]
                    value[:, :, t : t + wh, left : left + ww] += out[k * b : (k + 1) * b] * wgt
                    count[:, :, t : t + wh, left : left + ww] += wgt
        return value / count.clamp(min=1e-8)


def _crop(t: Tensor, win: Window) -> Tensor:
    top, left, h, w = win
    return t[..., top : top + h, left : left + w]
