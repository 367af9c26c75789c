"""Seeded noise on the CPU, per image.

Image ``i`` of a batch uses its own ``torch.Generator`` seeded with ``seeds[i]`` (A1111 gives
``seed, seed+1, ...``), and all later noise of that image (ancestral and SDE steps) continues the
same generator. So an image is the same whatever the batch size or the device the model runs on:
the noise is always drawn on the CPU in float32 and only then moved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class SeededNoise:
    """Per-image seeded Gaussian noise: ``initial()`` once, then one draw per call.

    Implements :class:`emaki.sampling.types.NoiseSampler`.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = tuple(shape)  # per image, e.g. (C, H, W)
        self.device = torch.device(device)
        self.dtype = dtype

    def draw(self) -> Tensor:
        """One standard-normal tensor [B, *shape], image i from generator i."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device, self.dtype)

    def initial(self) -> Tensor:
        """The initial latent noise (unit variance; the caller scales it by sigma_max)."""
        return self.draw()

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self.draw()
