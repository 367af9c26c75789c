"""Seeded noise on the CPU, per image, with A1111's variation seeds and seed resize.

Image ``i`` of a batch uses its own ``torch.Generator`` seeded with ``seeds[i]`` (A1111 gives
``seed, seed+1, ...``), and all later noise of that image (ancestral and SDE steps) continues the
same generator. So an image is the same whatever the batch size or the device the model runs on:
the noise is always drawn on the CPU in float32 and only then moved.

The first draw can be varied the way A1111's ``ImageRNG.first`` does it:

* **Variation seed** (``subseeds``, ``subseed_strength``): the initial noise is the spherical
  interpolation (:func:`slerp`) from the seed's noise to the variation seed's noise. Strength 0
  is exactly the seed's noise; strength 1 the variation seed's.
* **Seed resize** (``resize_from``: the latent shape the noise is "made at"): the seed's noise is
  drawn at that shape and pasted, centred, into noise of the real shape, so a composition found at
  one size keeps its layout at another. The rest of the latent (and the generator's state after
  the first draw) comes from a full-size draw of the same seed, as in A1111.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation from ``low`` (t=0) to ``high`` (t=1), per image [C, H, W].

    As A1111 (``modules/rng.py``), the vectors being interpolated are the columns along axis 1
    of each [C, H, W] noise (the H axis): the angle is computed per (channel, column) pair. That
    choice is A1111's and decides what "Variation strength 0.3" looks like, so we keep it. When
    the two noises are nearly parallel (mean cosine > 0.9995) the result is the straight line.
    """
    low_n = low / low.norm(dim=1, keepdim=True)
    high_n = high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)  # [C, W]
    if dot.mean() > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    a = (torch.sin((1.0 - t) * omega) / so).unsqueeze(1)
    b = (torch.sin(t * omega) / so).unsqueeze(1)
    return a * low + b * high


def paste_centred(target: Tensor, source: Tensor) -> Tensor:
    """``source`` [C, h, w] pasted into the centre of ``target`` [C, H, W] (cropped if larger)."""
    out = target.clone()
    dy, dx = (target.shape[1] - source.shape[1]) // 2, (target.shape[2] - source.shape[2]) // 2
    h = source.shape[1] if dy >= 0 else target.shape[1]
    w = source.shape[2] if dx >= 0 else target.shape[2]
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return out


class SeededNoise:
    """Per-image seeded Gaussian noise: ``initial()`` once, then one draw per call.

    Implements :class:`emaki.sampling.types.NoiseSampler`. ``subseeds``/``subseed_strength``
    and ``resize_from`` (a per-image shape such as ``(C, h, w)``) vary the initial draw as A1111
    does; later draws are unaffected.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        resize_from: Sequence[int] | None = None,
    ) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.shape = tuple(shape)  # per image, e.g. (C, H, W)
        self.device = torch.device(device)
        self.dtype = dtype
        self.subseeds = [int(s) for s in subseeds] if subseeds is not None else None
        self.subseed_strength = float(subseed_strength)
        self.resize_from = tuple(resize_from) if resize_from is not None else None

    def draw(self) -> Tensor:
        """One standard-normal tensor [B, *shape], image i from generator i."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device, self.dtype)

    def initial(self) -> Tensor:
        """The initial latent noise (unit variance; the caller scales it by sigma_max)."""
        varied = self.subseeds is not None and self.subseed_strength != 0
        resized = self.resize_from is not None and self.resize_from != self.shape
        if not varied and not resized:
            return self.draw()
        out = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators, strict=True)):
            made_at = self.resize_from if resized else self.shape
            assert made_at is not None
            sub = None
            if varied:
                assert self.subseeds is not None
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                sub = torch.randn(made_at, generator=torch.Generator().manual_seed(subseed))
            if resized:
                noise = torch.randn(made_at, generator=torch.Generator().manual_seed(seed))
            else:
                noise = torch.randn(self.shape, generator=gen)
            if sub is not None:
                noise = slerp(self.subseed_strength, noise, sub)
            if resized:
                noise = paste_centred(torch.randn(self.shape, generator=gen), noise)
            out.append(noise)
        return torch.stack(out).to(self.device, self.dtype)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self.draw()
