"""Hires fix: the size of the second pass and the upscaling of the first pass's result.

A1111's "Hires. fix" (``StableDiffusionProcessingTxt2Img``): render at the request size, upscale
(in latent space, or decode - resize in pixels - encode), then run img2img at the larger size.
The second pass always runs exactly its step count (see
:func:`emaki.pipelines.img2img.fixed_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor

from emaki.latents import LatentFormat, decode, encode, from_pil, to_pil
from emaki.request import LATENT_UPSCALERS, HiresFix


@dataclass(frozen=True)
class HiresSize:
    """Where the second pass renders: ``upscale_to`` then crop ``truncate`` latent pixels."""

    upscale_to: tuple[int, int]  #: (width, height) the first pass is upscaled to
    truncate: tuple[int, int] = (0, 0)  #: latent columns and rows cropped, centred

    def final(self, downsample: int) -> tuple[int, int]:
        """The (width, height) of the hires image."""
        w, h = self.upscale_to
        return w - self.truncate[0] * downsample, h - self.truncate[1] * downsample


def hires_size(hires: HiresFix, width: int, height: int, downsample: int) -> HiresSize:
    """The target size by A1111's rules.

    Neither resize side set: ``scale`` times the first pass (rounded down). One side set: that
    side, the other by the aspect ratio. Both set: upscale to cover the target, then crop the
    overhang (in latent pixels) so the result is exactly ``resize_x`` x ``resize_y``.
    """
    rx, ry = hires.resize_x, hires.resize_y
    if rx == 0 and ry == 0:
        return HiresSize((_mult8(width * hires.scale), _mult8(height * hires.scale)))
    if ry == 0:
        return HiresSize((rx, _mult8(rx * height / width)))
    if rx == 0:
        return HiresSize((_mult8(ry * width / height), ry))
    if width / height < rx / ry:
        to = (rx, _mult8(rx * height / width))
    else:
        to = (_mult8(ry * width / height), ry)
    return HiresSize(to, ((to[0] - rx) // downsample, (to[1] - ry) // downsample))


def _mult8(v: float) -> int:
    """Sizes must be multiples of 8 for the autoencoder; A1111 lets the latent floor them."""
    return max(8, int(v) // 8 * 8)


def upscale_latents(
    latents: Tensor,
    hires: HiresFix,
    size: HiresSize,
    vae: AutoencoderKL,
    fmt: LatentFormat,
) -> Tensor:
    """The first pass's latents [B, C, h, w] brought to the hires latent size (then cropped)."""
    w, h = size.upscale_to
    lh, lw = h // fmt.downsample, w // fmt.downsample
    if hires.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        out = F.interpolate(latents, size=(lh, lw), mode=mode, antialias=antialias, **kwargs)
    else:
        resample = (
            Image.Resampling.NEAREST if hires.upscaler == "Nearest" else Image.Resampling.LANCZOS
        )
        images = [im.resize((w, h), resample) for im in to_pil(decode(vae, latents, fmt))]
        pixels = [from_pil(im) for im in images]
        out = encode(vae, torch.cat(pixels), fmt, mean=True)
    tx, ty = size.truncate
    if tx or ty:
        out = out[
            :, :, ty // 2 : out.shape[2] - (ty + 1) // 2, tx // 2 : out.shape[3] - (tx + 1) // 2
        ]
    return out
