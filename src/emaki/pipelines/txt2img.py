"""txt2img: prompt -> conditioning -> guided denoiser -> sampler -> latents -> decode -> images.

This module only wires the stages together, in numbered steps; each stage lives in its own
module (text encoding, sampling, latents, infotext).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from emaki import __version__
from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.infotext import format_infotext
from emaki.latents import LatentFormat, decode, to_pil
from emaki.models.bundle import ModelBundle
from emaki.request import GenerationRequest
from emaki.sampling.brownian import BrownianNoise
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.noise import SeededNoise
from emaki.sampling.registry import SamplerSpec, resolve_sampler
from emaki.sampling.schedules import ScheduleSpec, get_schedule
from emaki.sampling.types import NoiseSampler, StepCallback, StepInfo
from emaki.text.encoder import TextEncoder


@dataclass(frozen=True)
class GenerationResult:
    """Images of a job with their infotext and seeds; ``request`` has the concrete seed."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    request: GenerationRequest


@dataclass(frozen=True)
class Resolved:
    """A validated request with names resolved to registry entries."""

    request: GenerationRequest
    sampler: SamplerSpec
    schedule: ScheduleSpec
    width: int
    height: int
    options: dict[str, Any]


#: Progress: called with (step info, index of the model call in the job, number of calls).
ProgressCallback = Callable[[StepInfo, int, int], None]


class Pipeline:
    """A loaded model ready to generate. Holds no per-request state: one instance serves many."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.text = TextEncoder(bundle.tokenizer, bundle.text_encoder)
        self.schedule = DiscreteSchedule(bundle.alphas_cumprod)
        down = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
        self.latent_format = LatentFormat(
            channels=bundle.unet.config.in_channels,
            scale_factor=bundle.vae_scale_factor,
            downsample=down,
        )
        self.native_size = int(bundle.unet.config.sample_size) * down

    # -- stage wiring -------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> Resolved:
        """Step 1: validate, draw the seed, and resolve sampler and schedule names."""
        request.validate()
        request = request.with_seed()
        sampler, legacy_schedule = resolve_sampler(request.sampler)
        sched_name = request.schedule
        if sched_name.strip().lower() == "automatic":
            sched_name = legacy_schedule or sampler.default_schedule
        schedule = get_schedule(sched_name)
        options = dict(request.sampler_options)
        if request.eta is not None:
            if "eta" not in sampler.options:
                raise InvalidRequestError(f"sampler {sampler.label!r} does not take eta")
            options["eta"] = request.eta
        width = request.width or self.native_size
        height = request.height or self.native_size
        return Resolved(request, sampler, schedule, width, height, options)

    def conditioning(self, r: Resolved) -> GuidedCond:
        """Step 2: encode the prompt and the negative prompt (once each, not per image)."""
        req = r.request
        positive, negative = self.text.encode_many([req.prompt, req.negative_prompt], req.clip_skip)
        return GuidedCond(positive, negative)

    def denoiser(self, r: Resolved) -> CFGDenoiser:
        """Step 3: the model as a denoiser, wrapped in classifier-free guidance."""
        unet = self.bundle.unet

        def apply(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            ctx = cond.context.to(x.device, x.dtype)
            return unet(x, t.to(x.device), encoder_hidden_states=ctx, return_dict=False)[0]

        inner = DiscreteDenoiser(apply, self.schedule, self.bundle.prediction_type)
        return CFGDenoiser(inner, r.request.cfg_scale, r.request.guidance_rescale)

    def sigmas(self, r: Resolved) -> Tensor:
        """Step 4: the sigma schedule."""
        return r.schedule.fn(self.schedule, r.request.steps).to(torch.float32)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, *, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run a txt2img job; raising from ``progress`` interrupts it."""
        r = self.resolve(request)
        req = r.request
        cond = self.conditioning(r)
        denoiser = self.denoiser(r)
        sigmas = self.sigmas(r)
        device = next(self.bundle.unet.parameters()).device
        shape = self.latent_format.latent_shape(r.width, r.height)
        images: list[Image.Image] = []
        seeds: list[int] = []
        for n in range(req.n_iter):
            # Step 5: per-image seeded noise on the CPU; image i of the job uses seed + i.
            batch_seeds = [req.seed + n * req.batch_size + i for i in range(req.batch_size)]
            seeded = SeededNoise(batch_seeds, shape, device=device)
            x = seeded.initial() * sigmas[0]
            noise = _sampler_noise(r.sampler, seeded, batch_seeds, shape, sigmas, device)
            callback = _call_progress(progress, n, req.n_iter)
            with _precision(req.precision):
                # Step 6: sample, then decode the latents.
                latents = r.sampler(
                    denoiser, x, sigmas.to(device), cond=cond, noise=noise, callback=callback,
                    **r.options,
                )  # fmt: skip
                pixels = decode(self.bundle.vae, latents, self.latent_format)
            images.extend(to_pil(pixels))
            seeds.extend(batch_seeds)
        # Step 7: infotext for each image.
        infotexts = [self.infotext(r, seed) for seed in seeds]
        return GenerationResult(images, infotexts, seeds, req)

    def infotext(self, r: Resolved, seed: int) -> str:
        """A1111-format parameters for one image of the job."""
        req = r.request
        b = self.bundle
        params: dict[str, object] = {
            "Steps": req.steps,
            "Sampler": r.sampler.label,
            "Schedule type": r.schedule.label,
            "CFG scale": req.cfg_scale,
            "Seed": seed,
            "Size": f"{r.width}x{r.height}",
            "Model hash": b.hash,
            "Model": b.name,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "Eta": r.options.get("eta"),
            "CFG rescale": req.guidance_rescale or None,
            "Precision": req.precision if req.precision != "fp32" else None,
            "Version": f"emaki {__version__}",
        }
        return format_infotext(req.prompt, req.negative_prompt, params)


def _sampler_noise(
    sampler: SamplerSpec,
    seeded: SeededNoise,
    seeds: list[int],
    shape: tuple[int, ...],
    sigmas: Tensor,
    device: torch.device,
) -> NoiseSampler:
    """SDE samplers get one Brownian path per image; others continue the image's generator."""
    positive = sigmas[sigmas > 0]
    if not sampler.brownian or len(positive) < 2:
        return seeded
    lo, hi = float(positive.min()), float(positive.max())
    return BrownianNoise(seeds, shape, lo, hi, device=device)


def _call_progress(progress: ProgressCallback | None, n: int, total: int) -> StepCallback | None:
    if progress is None:
        return None
    return lambda info: progress(info, n, total)


@contextlib.contextmanager
def _precision(precision: str) -> Iterator[None]:
    """bf16 autocast on the CPU (uses AVX512_BF16 where the CPU has it); fp32 otherwise."""
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def load_pipeline(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    vae_path: str | Path | None = None,
    allow_pickle: bool = False,
) -> Pipeline:
    """Load a model (diffusers folder or single-file checkpoint) and return a :class:`Pipeline`.

    For faster CPU inference call :func:`emaki.runtime.tune_allocator` first, before importing
    this module (the ``emaki`` command does).
    """
    from emaki.models.loading import load_model

    bundle = load_model(
        path,
        prediction_type=prediction_type,  # type: ignore[arg-type]
        vae_path=vae_path,
        allow_pickle=allow_pickle,
    )
    return Pipeline(bundle)
