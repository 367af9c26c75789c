"""Latent space: the autoencoder's scaling and the pixel <-> latent conversions.

Stable Diffusion samples in the latent space of a KL autoencoder (Rombach et al. 2022) that
downsamples by 8; latents are multiplied by a scale factor (0.18215 for SD 1.x/2.x) so they have
roughly unit variance during diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class LatentFormat:
    """How a model's latents relate to pixels."""

    channels: int = 4
    scale_factor: float = 0.18215
    downsample: int = 8

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        return (self.channels, height // self.downsample, width // self.downsample)


def decode(vae: AutoencoderKL, latents: Tensor, fmt: LatentFormat) -> Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (float32)."""
    param = next(vae.parameters())
    z = (latents / fmt.scale_factor).to(param.device, param.dtype)
    return vae.decode(z).sample.float().clamp(-1, 1)


def encode(
    vae: AutoencoderKL,
    images: Tensor,
    fmt: LatentFormat,
    generator: torch.Generator | None = None,
    *,
    mean: bool = False,
) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w], scaled.

    A sample of the encoder's posterior, or with ``mean=True`` its mean (deterministic: what
    img2img uses, so that the same request gives the same image).
    """
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    z = dist.mean if mean else dist.sample(generator)
    return z.float() * fmt.scale_factor


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] -> 8-bit RGB PIL images (round half to even, as numpy)."""
    arr = ((images.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255)
    arr = arr.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arr]


def from_pil(image: Image.Image) -> Tensor:
    """An RGB PIL image -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]
