"""Types shared by samplers: the per-step callback and the noise source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step (for progress bars, previews and interruption)."""

    i: int  #: index of the step just taken, 0-based
    total: int  #: number of steps
    sigma: float  #: noise level the model was evaluated at
    x: Tensor  #: the sample after the step
    denoised: Tensor  #: the model's x0 estimate at this step (cheap previews use it)


#: Called after every step; raising an exception from it stops sampling (interrupt).
StepCallback = Callable[[StepInfo], None]


class NoiseSampler(Protocol):
    """Standard normal noise for the interval (sigma -> sigma_next), shaped like the sample.

    Stochastic samplers draw all their noise through this, so the noise process is a free
    choice: independent Gaussian draws per step from per-image seeded generators (the default,
    :class:`emaki.sampling.noise.SeededNoise`) or a Brownian bridge for SDE solvers.
    """

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor: ...
