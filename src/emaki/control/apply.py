"""How ControlNets join sampling: a UNet wrapper that adds their residuals, step by step.

A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") sees the same noisy latent, timestep and text as the UNet, plus a control image (the
"hint"), and returns one tensor per UNet skip connection and one for the middle block; the UNet
adds them to its own (paper eq. 2-4: ``y_c = F(x) + Z(F(x + Z(c)))``, the zero convolutions Z
making an untrained ControlNet a no-op). :class:`ControlledUNet` is emaki's raw model function
``apply(x_in, t, cond) -> output`` for :class:`~emaki.sampling.denoisers.DiscreteDenoiser`, so
guidance, samplers and schedules stay unaware of it.

The behaviour follows diffusers' ``StableDiffusionControlNetPipeline``, which the tests compare
against step for step:

* ``conditioning_scale`` multiplies a unit's residuals; several units' residuals are summed.
* ``start`` / ``end`` (fractions of the steps): the unit acts at step ``i`` of ``N`` unless
  ``i / N < start`` or ``(i + 1) / N > end``. The step advances through :meth:`ControlledUNet.on_step`,
  called from the sampler's step callback.
* Guess mode ("ControlNet is more important" in A1111's terms): the ControlNet runs only on the
  conditional rows of a classifier-free-guidance batch, the unconditional rows get no residuals,
  and the residuals are scaled from 0.1 at the first skip connection to 1 at the middle block
  (``logspace(-1, 0, n + 1)``), so the control steers the coarse layout more than the detail.
  ControlNets with ``global_pool_conditions`` (the shuffle model) always run this way, as in
  diffusers.
* Soft injection (sd-webui-controlnet's "My prompt is more important"): both sides get the
  residuals, scaled by ``0.825 ** (n - 1 - k)`` at the ``k``-th of ``n`` (the middle block last, at
  full weight), so that the prompt keeps more say over the fine detail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.imageops.resize import resize_image
from emaki.sampling.multidiffusion import Window, crop_window
from emaki.sampling.types import StepInfo

#: Residuals of one call: one tensor per UNet skip connection, and the middle block's.
Residuals = tuple[list[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet with its control image and how strongly and when it acts.

    ``hint`` is the control image as a float tensor [1, C, H, W] in [0, 1] (C is the model's
    ``conditioning_channels``, 3 for every released ControlNet) at the *image* size: 8x the
    latent size for SD's ControlNets. :func:`hint_from_image` makes one from a PIL image.
    """

    model: ControlNetModel
    hint: Tensor
    conditioning_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    soft: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.conditioning_scale):
            raise InvalidRequestError(
                f"ControlNet weight must be a finite number, got {self.conditioning_scale}"
            )
        if not 0.0 <= self.start < self.end <= 1.0:
            raise InvalidRequestError(
                "ControlNet start and end must satisfy 0 <= start < end <= 1, got "
                f"start={self.start}, end={self.end}"
            )
        channels = int(self.model.config.conditioning_channels)
        hint = self.hint
        if not isinstance(hint, Tensor) or hint.ndim != 4 or hint.shape[:2] != (1, channels):
            shape = tuple(hint.shape) if isinstance(hint, Tensor) else type(hint).__name__
            raise InvalidRequestError(
                f"ControlNet control image must be a tensor [1, {channels}, H, W], got {shape}"
            )
        if not hint.is_floating_point() or hint.min() < 0 or hint.max() > 1:
            raise InvalidRequestError(
                "ControlNet control image must be floating point with values in [0, 1]"
            )

    @property
    def effective_guess_mode(self) -> bool:
        """Guess mode as asked, or forced by a global-pooling (shuffle) ControlNet."""
        return self.guess_mode or bool(self.model.config.global_pool_conditions)

    def active_at(self, step: int, total: int) -> bool:
        """Whether the unit acts at step ``step`` (0-based) of ``total`` (diffusers' rule)."""
        return not (step / total < self.start or (step + 1) / total > self.end)

    def residuals(
        self, x_in: Tensor, t: Tensor, cond: Conditioning, window: Window | None = None
    ) -> Residuals | None:
        """This unit's scaled residuals for a batch, or None when no row gets any.

        ``x_in`` [B, 4, h, w] is the UNet's input, ``t`` [B] its timesteps, ``cond`` the batch's
        conditioning (``negative_rows()`` marks CFG's unconditional rows). ``window`` (latent
        pixels) says which part of the whole latent ``x_in`` is (MultiDiffusion): the hint,
        made for the whole image, is cropped to it.
        """
        b = x_in.shape[0]
        hint = _checked_hint(self, x_in, window)
        rows = None  # None: every row
        if self.effective_guess_mode:
            negative = cond.negative_rows().to(x_in.device)
            if bool(negative.all()):
                return None
            if bool(negative.any()):
                rows = (~negative).nonzero().squeeze(1)
        x, tt, ctx = x_in, t, cond.context
        if rows is not None:
            x, tt, ctx = x_in[rows], t[rows], ctx[rows.to(ctx.device)]
        dtype = self.model.dtype
        down, mid = self.model(
            x.to(dtype),
            tt.to(x_in.device),
            encoder_hidden_states=ctx.to(x_in.device, dtype),
            controlnet_cond=hint.expand(x.shape[0], -1, -1, -1),
            conditioning_scale=1.0,  # scaled below, where guess mode's ramp is visible
            guess_mode=False,
            return_dict=False,
        )
        scales = [self.conditioning_scale] * (len(down) + 1)
        if self.effective_guess_mode and not self.model.config.global_pool_conditions:
            ramp = torch.logspace(-1, 0, len(down) + 1, device=x_in.device)  # 0.1 .. 1
            scales = list((ramp * self.conditioning_scale).unbind())
        elif self.soft:
            n = len(scales)
            scales = [self.conditioning_scale * 0.825 ** (n - 1 - k) for k in range(n)]
        down = [d * s for d, s in zip(down, scales, strict=False)]
        mid = mid * scales[-1]
        if rows is not None:  # the unconditional rows get zeros: no control on that side
            down = [_scatter_rows(d, rows, b) for d in down]
            mid = _scatter_rows(mid, rows, b)
        return [d.to(x_in.dtype) for d in down], mid.to(x_in.dtype)


def _scatter_rows(values: Tensor, rows: Tensor, batch: int) -> Tensor:
    out = values.new_zeros((batch, *values.shape[1:]))
    return out.index_copy(0, rows, values)


def _checked_hint(unit: ControlUnit, x_in: Tensor, window: Window | None = None) -> Tensor:
    """The unit's hint (cropped to ``window``, latent pixels) on x's device in the model's
    dtype, after checking its size."""
    # Each strided convolution of the hint encoder halves the size: 3 of them in SD's
    # ControlNets, so the hint is 8x the latent, i.e. the image size.
    factor = 2 ** (len(unit.model.controlnet_cond_embedding.blocks) // 2)
    hint = unit.hint
    if window is not None:
        top, left, wh, ww = window
        hint = crop_window(hint, (top * factor, left * factor, wh * factor, ww * factor))
    h, w = x_in.shape[-2:]
    hh, hw = hint.shape[-2:]
    if (hh, hw) != (h * factor, w * factor):
        raise InvalidRequestError(
            f"ControlNet control image is {hw}x{hh}, but this generation needs "
            f"{w * factor}x{h * factor} ({factor}x the {w}x{h} latent); resize it to the image size"
        )
    return hint.to(x_in.device, unit.model.dtype)


class ControlledUNet:
    """A UNet with ControlNets attached, as a model function ``(x_in, t, cond) -> output``.

    Each call sums the residuals of the units active at the current step and passes them to the
    diffusers UNet as ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
    The current step is the one piece of state: it starts at 0 and :meth:`on_step` advances it,
    so make one ControlledUNet per generation (it is a cheap wrapper; models are shared, never
    modified) and call ``on_step`` from the sampler's step callback.
    """

    def __init__(
        self, unet: UNet2DConditionModel, units: Sequence[ControlUnit], total_steps: int
    ) -> None:
        if total_steps < 1:
            raise InvalidRequestError(f"steps must be at least 1, got {total_steps}")
        self.unet = unet
        self.units = tuple(units)
        self.total_steps = int(total_steps)
        self.step = 0
        self.window: Window | None = None  #: the MultiDiffusion window being evaluated

    def set_window(self, window: Window | None) -> None:
        """Say which window of the whole latent the next calls are for (None: all of it)."""
        self.window = window

    def on_step(self, info: StepInfo) -> None:
        """Advance to the step after the one the sampler just finished (``info.i``)."""
        self.step = info.i + 1

    def active_units(self) -> list[ControlUnit]:
        """The units that act at the current step."""
        return [u for u in self.units if u.active_at(self.step, self.total_steps)]

    def residuals(self, x_in: Tensor, t: Tensor, cond: Conditioning) -> Residuals | None:
        """The summed residuals of the active units, or None when none contributes."""
        total: Residuals | None = None
        for unit in self.active_units():
            part = unit.residuals(x_in, t, cond, self.window)
            if part is None:
                continue
            if total is None:
                total = part
            else:
                total = (
                    [a + b for a, b in zip(total[0], part[0], strict=True)],
                    total[1] + part[1],
                )
        return total

    def __call__(
        self, x_in: Tensor, t: Tensor, cond: Conditioning, extra: Tensor | None = None
    ) -> Tensor:
        """The UNet's output for ``x_in`` with the active units' residuals added.

        ``extra`` [B, k, h, w] is appended to the UNet's input channels only (an inpainting
        model's mask and masked-image latent): the ControlNets see the plain latent ``x_in``,
        as in diffusers' ``StableDiffusionControlNetInpaintPipeline``.
        """
        ctx = cond.context.to(x_in.device, x_in.dtype)
        t = t.to(x_in.device)
        res = self.residuals(x_in, t, cond)
        x_unet = x_in if extra is None else torch.cat([x_in, extra.to(x_in)], dim=1)
        if res is None:
            return self.unet(x_unet, t, encoder_hidden_states=ctx, return_dict=False)[0]
        down, mid = res
        return self.unet(
            x_unet,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


def hint_from_image(image: Image.Image, width: int, height: int, resize_mode: int = 0) -> Tensor:
    """A control image as a hint tensor [1, 3, height, width] in [0, 1].

    The image is brought to the generation's size with A1111's resize modes (0 just resize,
    1 crop and resize, 2 resize and fill; see :mod:`emaki.imageops.resize`) when its size
    differs. Resize control images at the size they will be used: resampling thin edge maps
    blurs them, which the ControlNet reads as weaker edges.
    """
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = resize_image(resize_mode, rgb, width, height)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
