"""Seamless tiling: circular padding in every convolution of the UNet and the VAE.

An image whose networks pad circularly is periodic: its left edge continues its right edge and
its top its bottom, so it tiles without a seam (A1111's "Tiling" sets the same padding mode).
Applied to weight-sharing clones, never to the shared model.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from emaki.adapters.clone import share_clone
from emaki.models.bundle import ModelBundle


def circular(module: nn.Module) -> nn.Module:
    """A weight-sharing clone of ``module`` whose padded convolutions pad circularly."""
    clone = share_clone(module)
    for m in clone.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in _padding(m)):
            m.padding_mode = "circular"  # nn.Conv2d then pads with F.pad(mode="circular")
    return clone


def _padding(m: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(m.padding, str):
        raise ValueError(f"cannot tile a convolution with padding={m.padding!r}")
    return tuple(int(p) for p in m.padding)


def apply_tiling(bundle: ModelBundle) -> ModelBundle:
    """The bundle with circularly padded UNet and VAE clones."""
    return replace(bundle, unet=circular(bundle.unet), vae=circular(bundle.vae))
