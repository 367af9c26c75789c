"""Brownian-motion noise for SDE samplers, seeded per image.

An SDE sampler adds, over a step from sigma to sigma_next, noise that stands for the increment of
one Brownian path W over that interval. Drawing it independently per call is fine for samplers
that draw once per step over disjoint intervals; it is wrong for samplers whose stages draw over
overlapping intervals (DPM++ SDE draws over (sigma, sigma_mid) and then over (sigma,
sigma_next)), and it makes a seed's result change completely with the step count. Here the noise
over (a, b) is ``(W(b) - W(a)) / sqrt(|b - a|)`` for one fixed path W per image, so noise over an
interval is consistent with its sub-intervals and refining the steps refines the same path
(results then converge as steps grow instead of changing). The path is built by Lévy's
Brownian-bridge construction, as in the virtual Brownian tree of Li et al. (2020, "Scalable
Gradients for Stochastic Differential Equations") that k-diffusion uses through torchsde.

**The clock is t = sigma**, as in k-diffusion's and diffusers' Brownian noise samplers, so the
joint law of a sampler's draws is the one those implementations use. W lives on
[sigma_min, sigma_max] with W(sigma_min) = 0.

Construction: a binary tree of dyadic midpoints built lazily. Node ``k`` (root 1, children 2k and
2k+1) halves its interval [l, r] and holds the Brownian-bridge value
``W(m) = (W(l) + W(r)) / 2 + sqrt((r - l) / 4) * z_k``, with ``z_k`` standard normal drawn from a
CPU generator seeded by a hash of (image seed, k); ``W(sigma_max)`` is ``sqrt(sigma_max -
sigma_min) * z_0``. A node stops splitting once ``r - l <= tol * l`` (relative resolution, so
the short steps near sigma_min are resolved as finely as the long ones near sigma_max); inside
such a leaf W is linear. W(t) is therefore a fixed function of (seed, t): independent of query
order, batch size and device.

Why not torchsde: it would be a runtime dependency standing in for about a hundred lines; its
BrownianInterval depends on the order of queries unless built as the slower "halfway tree", and
rounds query times to absolute decimal digits (coarse near small sigmas). What emaki needs is
one path per image, seeded on the CPU from the image's seed (like
:class:`emaki.sampling.noise.SeededNoise` seeds the initial noise), so that an image does not
depend on batch size or device; that is simplest done directly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _BrownianPath:
    """One image's Brownian path W on [lo, hi], evaluated lazily through the midpoint tree."""

    def __init__(
        self, seed: int, shape: tuple[int, ...], lo: float, hi: float, tol: float, cache: int
    ) -> None:
        self.key = _mix64(seed & _MASK64)  # hashed so no node reuses the raw seed's stream
        self.shape, self.lo, self.hi, self.tol = shape, lo, hi, tol
        self.generator = torch.Generator("cpu")
        self.zero = torch.zeros(shape, dtype=torch.float64)
        self.w_hi = self._normal(0) * math.sqrt(hi - lo)
        self.nodes: OrderedDict[int, Tensor] = OrderedDict()  # LRU of midpoint values
        self.points: OrderedDict[float, Tensor] = OrderedDict()  # LRU of recent W(t)
        self.cache = cache

    def _normal(self, node: int) -> Tensor:
        self.generator.manual_seed(_mix64(self.key ^ node))
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float64)

    def _midpoint(self, node: int, left: float, right: float, wl: Tensor, wr: Tensor) -> Tensor:
        w = self.nodes.get(node)
        if w is None:
            w = (wl + wr) * 0.5 + self._normal(node) * math.sqrt((right - left) / 4)
            self.nodes[node] = w
            if len(self.nodes) > self.cache:
                self.nodes.popitem(last=False)
        else:
            self.nodes.move_to_end(node)
        return w

    def __call__(self, t: float) -> Tensor:
        """W(t), float64, shape ``self.shape``."""
        w = self.points.get(t)
        if w is not None:
            return w
        left, right, wl, wr, node = self.lo, self.hi, self.zero, self.w_hi, 1
        while right - left > self.tol * left:
            m = 0.5 * (left + right)
            wm = self._midpoint(node, left, right, wl, wr)
            if t < m:
                right, wr, node = m, wm, 2 * node
            else:
                left, wl, node = m, wm, 2 * node + 1
        w = wl + (wr - wl) * ((t - left) / (right - left))
        self.points[t] = w
        if len(self.points) > 4:
            self.points.popitem(last=False)
        return w


class BrownianNoise:
    """Per-image seeded Brownian-motion noise over t = sigma in [sigma_min, sigma_max].

    Implements :class:`emaki.sampling.types.NoiseSampler`: ``noise(sigma, sigma_next)`` returns
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, shape [B, *shape], image i from
    the path of ``seeds[i]`` (see the module docstring). Queries must lie in [sigma_min,
    sigma_max]; pass the smallest positive and the largest sigma of the schedule. ``tol`` is the
    relative time resolution of the path (1e-6: a step's noise variance is exact to about
    ``tol / (relative step length)``).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        sigma_min: float,
        sigma_max: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tol: float = 1e-6,
        cache_nodes: int = 64,
    ) -> None:
        lo, hi = float(sigma_min), float(sigma_max)
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        self.paths = [_BrownianPath(int(s), tuple(shape), lo, hi, tol, cache_nodes) for s in seeds]
        self.lo, self.hi = lo, hi
        self.device = torch.device(device)
        self.dtype = dtype

    def _check(self, t: float) -> float:
        slack = 1e-6 * self.hi  # float32 schedules vs float64 midpoints
        if not self.lo - slack <= t <= self.hi + slack:
            raise ValueError(
                f"Brownian noise queried at sigma={t}, outside [{self.lo}, {self.hi}] it was built for"
            )
        return min(max(t, self.lo), self.hi)

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        a, b = self._check(float(sigma)), self._check(float(sigma_next))
        if a == b:
            return torch.zeros(
                (len(self.paths), *self.paths[0].shape), device=self.device, dtype=self.dtype
            )
        w = torch.stack([path(b) - path(a) for path in self.paths])  # [B, *shape], float64
        return (w / math.sqrt(abs(b - a))).to(self.device, self.dtype)
