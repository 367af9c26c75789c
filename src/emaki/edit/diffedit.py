"""DiffEdit's automatic mask: where do two prompts make the model predict different noise?

Couairon, Verbeek, Schwenk & Cord (2022), "DiffEdit: Diffusion-based semantic image editing with
mask guidance" (ICLR 2023), section 3.1. The image latent ``z`` is noised to a mid level,
``x_k = z + sigma * n_k`` for ``n_k ~ N(0, I)``, k = 1..K (K = 10 in the paper), and the model
predicts the noise under the source prompt (describing the image) and the target prompt
(describing the edit), each with classifier-free guidance. Where the prompts disagree is what the
edit must change::

    map = mean_k mean_channels | eps(x_k; target) - eps(x_k; source) |            [B, h, w]
    m   = clamp(map, 0, r * mean(map)) / (r * mean(map)) > 0.5

with ``r`` diffusers' ``mask_thresholding_ratio`` (default 3) and 0.5 the paper's threshold, as
in diffusers' ``StableDiffusionDiffEditPipeline.generate_mask``. Normalising by ``r`` times the
*mean* (rather than the maximum) keeps one outlier from emptying the mask.

In emaki the model is a denoiser ``D(x, sigma, cond) -> x0``, and
``eps(x) = (x - D(x)) / sigma``, so ``|eps_t - eps_s| = |D_t - D_s| / sigma`` exactly: the map
is computed from x0 estimates and divided by sigma, which gives diffusers' map for epsilon models.
The normalisation divides out any per-level factor, so the thresholded mask is also what
diffusers gives for v-prediction models (whose raw outputs it compares: ``|v_t - v_s| =
|D_t - D_s| / (sigma c_in)``), and it does not depend on the parameterisation at all.

Two deliberate differences from diffusers (none for one image whose two prompts differ):

* the mean in the normalisation is taken per image, not over the whole batch, so an image's
  mask does not depend on what else is in the batch;
* when the two prompts change nothing (the map is zero, or at float-rounding level), the mask
  is empty; diffusers divides 0 by 0 and returns a full mask.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser, DiscreteSchedule
from emaki.sampling.guidance import GuidedCond
from emaki.sampling.schedules import ddim_uniform

#: A map whose mean is below this fraction of the mean predicted-noise magnitude is rounding
#: noise, not a semantic difference (batched and unbatched calls differ by ~1e-7 relative).
_FLOOR = 1e-5

Cond = Conditioning | GuidedCond


def diffedit_sigma(schedule: DiscreteSchedule, strength: float = 0.5, steps: int = 50) -> float:
    """The noise level diffusers' ``generate_mask`` encodes at for ``mask_encode_strength``.

    diffusers sets DDIM's ``steps`` timesteps (``leading`` spacing, offset 1: emaki's
    ``ddim_uniform``) and takes the one ``int(steps * strength)`` steps from the end: at
    ``strength = 0.5`` and 50 steps, timestep 481.
    """
    if not 0.0 < strength <= 1.0:
        raise InvalidRequestError(f"DiffEdit strength must be in (0, 1], got {strength}")
    sigmas = ddim_uniform(schedule, steps)  # [steps + 1], descending, ending in 0
    start = steps - min(int(steps * strength), steps)
    if start >= steps:
        raise InvalidRequestError(f"DiffEdit strength {strength} leaves no noise at {steps} steps")
    return float(sigmas[start])


def draw_noise(latents: Tensor, n_noise: int, seed: int) -> Tensor:
    """Standard normal noise [B, K, C, h, w] drawn as diffusers' ``generate_mask`` draws it.

    One CPU generator seeded with ``seed``, one draw of shape [B * K, C, h, w] in image-major
    order (image i's K noises are rows i*K .. i*K + K - 1), so the same seed gives diffusers'
    noise when it is handed latents (a pixel image would make it draw the VAE sample first).
    """
    b, c, h, w = latents.shape
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((b * n_noise, c, h, w), generator=g)
    return noise.view(b, n_noise, c, h, w).to(latents.device, latents.dtype)


def diffedit_map(
    denoiser: Denoiser,
    latents: Tensor,
    source: Cond,
    target: Cond,
    *,
    sigma: float,
    n_noise: int = 10,
    seed: int = 0,
    noise: Tensor | None = None,
    noises_per_call: int | None = None,
) -> Tensor:
    """The DiffEdit difference map [B, 1, h, w] (before normalisation), in noise units.

    ``denoiser`` is the guided model (e.g. a :class:`~emaki.sampling.guidance.CFGDenoiser`
    taking :class:`~emaki.sampling.guidance.GuidedCond` with the negative prompt, diffusers'
    ``guidance_scale``), or a plain one taking a :class:`~emaki.conditioning.Conditioning`.
    ``latents`` [B, C, h, w] are the clean image latents (scaled as the UNet sees them), ``sigma``
    the encoding level (see :func:`diffedit_sigma`). ``noise`` [B, K, C, h, w] replaces the
    seeded draw (:func:`draw_noise`). Source and target run as separate calls, so identical
    prompts give a map of exactly zero. ``noises_per_call`` bounds the batch of one model call
    to that many noises times B (default: all K at once).
    """
    if n_noise < 1:
        raise InvalidRequestError(f"DiffEdit needs at least one noise, got {n_noise}")
    if sigma <= 0:
        raise InvalidRequestError(f"DiffEdit needs a positive noise level, got sigma={sigma}")
    b, c, h, w = latents.shape
    if noise is None:
        noise = draw_noise(latents, n_noise, seed)
    if noise.shape != (b, n_noise, c, h, w):
        raise ValueError(f"noise must have shape {(b, n_noise, c, h, w)}, not {tuple(noise.shape)}")
    per_call = n_noise if noises_per_call is None else max(1, int(noises_per_call))
    total = latents.new_zeros(b, h, w, dtype=torch.float32)
    scale = latents.new_zeros(b, dtype=torch.float32)  # sum of mean |eps|: rounding yardstick
    for k0 in range(0, n_noise, per_call):
        k = min(per_call, n_noise - k0)
        # Noise-major rows (row j*B + i), so a B-row conditioning is tiled by concatenation.
        x = (latents[None] + sigma * noise[:, k0 : k0 + k].transpose(0, 1)).reshape(k * b, c, h, w)
        s = torch.full((k * b,), float(sigma), device=x.device, dtype=x.dtype)
        d_source = denoiser(x, s, _tile(source, k))  # [k*B, C, h, w]
        d_target = denoiser(x, s, _tile(target, k))
        diff = ((d_target - d_source).abs().float() / sigma).view(k, b, c, h, w)
        total += diff.sum(dim=0).mean(dim=1)  # sum over noises, mean over channels: [B, h, w]
        eps = (x - d_source).abs().float() / sigma
        scale += eps.view(k, b, -1).mean(dim=2).sum(dim=0)  # [B]
    out = (total / n_noise)[:, None]  # [B, 1, h, w]
    # Per image: where the prompts change nothing beyond rounding, the map is zero.
    real = out.mean(dim=(1, 2, 3)) > _FLOOR * scale / n_noise  # [B]
    return out * real[:, None, None, None]


def threshold_map(diff_map: Tensor, ratio: float = 3.0, threshold: float = 0.5) -> Tensor:
    """Normalise a difference map per image and threshold it: float {0, 1}, same shape.

    ``clamp(map, 0, ratio * mean) / (ratio * mean) > threshold`` (diffusers'
    ``mask_thresholding_ratio`` and its fixed 0.5); an all-zero map gives an empty mask.
    """
    if ratio <= 0:
        raise InvalidRequestError(f"DiffEdit thresholding ratio must be positive, got {ratio}")
    dims = tuple(range(1, diff_map.ndim))
    magnitude = diff_map.mean(dim=dims, keepdim=True) * ratio  # [B, 1, 1, 1]
    safe = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    normalised = torch.minimum(diff_map.clamp(min=0), safe) / safe  # in [0, 1]
    return ((normalised > threshold) & (magnitude > 0)).to(torch.float32)


def diffedit_mask(
    denoiser: Denoiser,
    latents: Tensor,
    source: Cond,
    target: Cond,
    *,
    sigma: float,
    n_noise: int = 10,
    ratio: float = 3.0,
    threshold: float = 0.5,
    seed: int = 0,
    noise: Tensor | None = None,
    noises_per_call: int | None = None,
) -> Tensor:
    """DiffEdit's mask [B, 1, h, w] in {0, 1} (1 = edit) at the latent resolution.

    :func:`diffedit_map` followed by :func:`threshold_map`; arguments as there. For diffusers'
    ``generate_mask(mask_encode_strength=0.5)`` pass ``sigma=diffedit_sigma(schedule, 0.5)``.
    """
    diff_map = diffedit_map(
        denoiser, latents, source, target,
        sigma=sigma, n_noise=n_noise, seed=seed, noise=noise, noises_per_call=noises_per_call,
    )  # fmt: skip
    return threshold_map(diff_map, ratio, threshold)


def mask_to_images(mask: Tensor, size: tuple[int, int]) -> list[Image.Image]:
    """Latent masks [B, 1, h, w] -> "L" images of ``size`` (width, height), 255 = edit.

    Nearest upsampling keeps the latent cells' hard edges (emaki's inpainting blurs a mask by
    its own "mask blur"); this is the mask format :class:`emaki.request.InitImage` takes.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape [B, 1, h, w], not {tuple(mask.shape)}")
    images = []
    for m in mask[:, 0].detach().float().cpu():  # [h, w]
        arr = (m.numpy() > 0.5).astype(np.uint8) * 255
        images.append(Image.fromarray(arr, "L").resize(size, Image.Resampling.NEAREST))
    return images


def _tile(cond: Any, k: int) -> Any:
    """Repeat a conditioning's rows k times (noise-major); batch-1 ones broadcast by themselves."""
    if k == 1:
        return cond
    if isinstance(cond, GuidedCond):
        return replace(
            cond,
            positive=_tile(cond.positive, k),
            negative=_tile(cond.negative, k),
            more=tuple((w, _tile(c, k)) for w, c in cond.more),
        )
    if isinstance(cond, Conditioning):
        return cond if cond.batch_size == 1 else Conditioning.cat([cond] * k)
    raise TypeError(f"DiffEdit takes a Conditioning or GuidedCond, not {type(cond).__name__}")
