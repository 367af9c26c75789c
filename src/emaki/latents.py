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


def fit_rgb_factors(vae: AutoencoderKL, fmt: LatentFormat, size: int = 64) -> Tensor:
    """A linear latent -> RGB map for cheap previews, fitted to this autoencoder: [C + 1, 3].

    Published previews use fixed factors per model family (for SD 1.x latents); emaki fits them
    instead, so that any VAE, including its own, gets a preview: a few flat colours and colour
    gradients are encoded and least squares maps each latent pixel to the mean colour of the
    pixels it covers. No extra model, one small encoder pass at first use.
    """
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(12, 3, 1, 1, generator=g) * 2 - 1
    ramp = torch.linspace(-1, 1, size)
    images = torch.cat(
        [
            colours.expand(-1, 3, size, size),
            torch.stack(
                [
                    ramp[None, :].expand(size, size),
                    ramp[:, None].expand(size, size),
                    -ramp[None, :].expand(size, size),
                ]
            )[None],
        ]
    )
    with torch.no_grad():
        z = encode(vae, images, fmt, mean=True)  # [N, C, h, w]
    target = torch.nn.functional.adaptive_avg_pool2d(images, z.shape[-2:])  # [N, 3, h, w]
    x = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x.double(), y.double()).solution.float()


def preview_image(latent: Tensor, factors: Tensor) -> Image.Image:
    """One latent [C, h, w] as a small RGB image through :func:`fit_rgb_factors`' map."""
    c = latent.shape[0]
    flat = latent.detach().float().cpu().reshape(c, -1).T  # [hw, C]
    rgb = torch.cat([flat, torch.ones_like(flat[:, :1])], 1) @ factors  # [hw, 3]
    rgb = rgb.T.reshape(3, *latent.shape[1:])
    return to_pil(rgb[None].clamp(-1, 1))[0]
