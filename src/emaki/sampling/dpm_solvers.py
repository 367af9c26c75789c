"""DPM-Solver++ family and UniPC samplers (Lu et al. 2022; Zhao et al. 2023), pure functions.

Same signature and conventions as :mod:`emaki.sampling.samplers`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from emaki.sampling.denoisers import Denoiser
from emaki.sampling.types import NoiseSampler, StepCallback


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpmpp_2m")


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpmpp_2m_sde")


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpmpp_sde")


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpmpp_2s_ancestral")


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_dpmpp_3m_sde")


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Any = None,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> Tensor:
    """PLACEHOLDER: being written."""
    raise NotImplementedError("sample_unipc")
