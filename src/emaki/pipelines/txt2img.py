"""txt2img: prompt -> adapters -> conditioning -> guided denoiser -> sampler -> decode -> images.

This module only wires the stages together, in numbered steps; each stage lives in its own
module (prompt grammar, adapters, text encoding, sampling, latents, infotext).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from emaki import __version__
from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.infotext import format_infotext
from emaki.latents import LatentFormat, decode, to_pil
from emaki.models.bundle import ModelBundle
from emaki.prompts.encode import EncodedPrompt, ScheduledGuidance, encode_prompts
from emaki.prompts.grammar import ExtraNetworkCall, extract_extra_networks, strip_comments
from emaki.request import GenerationRequest
from emaki.sampling.brownian import BrownianNoise
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser
from emaki.sampling.noise import SeededNoise
from emaki.sampling.registry import SamplerSpec, resolve_sampler
from emaki.sampling.schedules import ScheduleSpec, get_schedule
from emaki.sampling.types import NoiseSampler, StepCallback, StepInfo
from emaki.text.encoder import TextEncoder

if TYPE_CHECKING:
    from emaki.adapters.embeddings import EmbeddingLibrary


@dataclass(frozen=True)
class GenerationResult:
    """Images of a job with their infotext and seeds; ``request`` has the concrete seed."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    request: GenerationRequest


@dataclass(frozen=True)
class Adapters:
    """The adapters a prompt asks for, resolved to files: what makes the job's model."""

    loras: tuple[tuple[Any, float, float], ...] = ()  #: (LoraFile, text mult, unet mult)
    hypernetworks: tuple[tuple[Any, float], ...] = ()  #: (Hypernetwork, mult)
    vae: Path | None = None  #: a VAE file that replaces the model's for this request

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            tuple((f.hash, te, un) for f, te, un in self.loras),
            tuple((h.hash, m) for h, m in self.hypernetworks),
            str(self.vae) if self.vae is not None else None,
        )


@dataclass(frozen=True)
class Resolved:
    """A validated request with names resolved: sampler, schedule, size, prompt, adapters."""

    request: GenerationRequest
    sampler: SamplerSpec
    schedule: ScheduleSpec
    width: int
    height: int
    options: dict[str, Any]
    prompt: str = ""  #: the prompt without comments and extra-network tags
    negative_prompt: str = ""
    adapters: Adapters = Adapters()


#: Progress: called with (step info, index of the model call in the job, number of calls).
ProgressCallback = Callable[[StepInfo, int, int], None]


class Pipeline:
    """A loaded model ready to generate. Holds no per-request state: one instance serves many.

    ``models`` is the models folder (:mod:`emaki.models.library`) where ``<lora:...>`` and
    ``<hypernet:...>`` tags and textual-inversion trigger words are looked up; None uses
    :func:`~emaki.models.library.models_root`. Adapted models (LoRA, hypernetworks) are
    weight-sharing clones made per adapter set and kept for the next request with the same set.
    """

    def __init__(
        self, bundle: ModelBundle, *, models: Path | None = None, allow_pickle: bool = False
    ) -> None:
        self.bundle = bundle
        self.models = models
        self.allow_pickle = allow_pickle
        self._embeddings: EmbeddingLibrary | bool | None = False  # False: not looked at yet
        self._adapted: dict[tuple[Any, ...], tuple[ModelBundle, TextEncoder]] = {}
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
        prompt, calls = extract_extra_networks(strip_comments(request.prompt))
        negative = strip_comments(request.negative_prompt)
        adapters = self.adapters(calls)
        if request.vae:
            from emaki.models.library import find_model

            vae = find_model("vae", request.vae, self.models).path
            adapters = replace(adapters, vae=vae)
        return Resolved(
            request, sampler, schedule, width, height, options, prompt, negative, adapters
        )

    def adapters(self, calls: list[ExtraNetworkCall]) -> Adapters:
        """Read the LoRA and hypernetwork files that the prompt's tags name."""
        if not calls:
            return Adapters()
        from emaki.adapters.hypernetwork import read_hypernetwork
        from emaki.adapters.lora import read_lora
        from emaki.models.library import find_model

        loras: list[tuple[Any, float, float]] = []
        hypers: list[tuple[Any, float]] = []
        for call in calls:
            if call.kind == "lora":
                entry = find_model("lora", call.name, self.models)
                te, unet = _lora_multipliers(call)
                loras.append(
                    (read_lora(entry.path, self.bundle, allow_pickle=self.allow_pickle), te, unet)
                )
            elif call.kind == "hypernet":
                entry = find_model("hypernetworks", call.name, self.models)
                mult = _number(call.positional[0] if call.positional else "1", call)
                hypers.append((read_hypernetwork(entry.path, allow_pickle=self.allow_pickle), mult))
            else:
                raise InvalidRequestError(
                    f"unknown extra network <{call.kind}:{call.name}>; emaki reads <lora:...> and "
                    "<hypernet:...>"
                )
        return Adapters(tuple(loras), tuple(hypers))

    def adapted(self, r: Resolved) -> tuple[ModelBundle, TextEncoder]:
        """Step 2: the job's model: the shared one, or a clone with the prompt's adapters."""
        key = r.adapters.key
        if key == ((), (), None):
            return self.bundle, self._text_encoder(self.bundle)
        if key not in self._adapted:
            from emaki.adapters.hypernetwork import apply_hypernetworks
            from emaki.adapters.lora import apply_loras

            bundle = self.bundle
            if r.adapters.vae is not None:
                from emaki.models.loading import load_vae_file

                vae, name, short = load_vae_file(
                    r.adapters.vae, bundle.spec, allow_pickle=self.allow_pickle,
                    dtype=bundle.vae.dtype,
                )  # fmt: skip
                vae = vae.to(bundle.vae.device).eval()
                bundle = replace(bundle, vae=vae, vae_name=name, vae_hash=short)
            bundle = apply_loras(bundle, r.adapters.loras)
            bundle = apply_hypernetworks(bundle, r.adapters.hypernetworks)
            while len(self._adapted) >= 2:  # keep the last two adapter sets
                self._adapted.pop(next(iter(self._adapted)))
            self._adapted[key] = (bundle, self._text_encoder(bundle))
        return self._adapted[key]

    def _text_encoder(self, bundle: ModelBundle) -> TextEncoder:
        embeddings = self.embedding_library()
        if embeddings is None and bundle is self.bundle:
            return self.text
        return TextEncoder(bundle.tokenizer, bundle.text_encoder, embeddings=embeddings)

    def embedding_library(self) -> EmbeddingLibrary | None:
        """The models folder's textual-inversion embeddings that fit this model (None if none)."""
        if self._embeddings is False:
            from emaki.adapters.embeddings import EmbeddingLibrary
            from emaki.models.library import models_root

            folder = (self.models or models_root()) / "embeddings"
            width = int(self.bundle.text_encoder.get_input_embeddings().weight.shape[1])
            library = None
            if folder.is_dir():
                library = EmbeddingLibrary.from_folder(
                    folder, self.bundle.tokenizer, width=width, allow_pickle=self.allow_pickle
                )
            self._embeddings = library if library is not None and library.names() else None
            if self._embeddings is not None:
                self.text = TextEncoder(
                    self.bundle.tokenizer, self.bundle.text_encoder, embeddings=self._embeddings
                )
        return self._embeddings  # type: ignore[return-value]

    def conditioning(self, r: Resolved, text: TextEncoder | None = None) -> EncodedPrompt:
        """Step 3: encode every distinct text of the prompts' schedules once (not per image)."""
        req = r.request
        return encode_prompts(
            text or self.text,
            r.prompt,
            r.negative_prompt,
            req.steps,
            clip_skip=req.clip_skip,
            emphasis=req.emphasis,
        )

    def denoiser(self, r: Resolved, bundle: ModelBundle | None = None) -> ScheduledGuidance:
        """Step 4: the model as a denoiser, wrapped in scheduled classifier-free guidance."""
        unet = (bundle or self.bundle).unet

        def apply(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            ctx = cond.context.to(x.device, x.dtype)
            return unet(x, t.to(x.device), encoder_hidden_states=ctx, return_dict=False)[0]

        inner = DiscreteDenoiser(apply, self.schedule, self.bundle.prediction_type)
        return ScheduledGuidance(
            CFGDenoiser(inner, r.request.cfg_scale, r.request.guidance_rescale)
        )

    def sigmas(self, r: Resolved) -> Tensor:
        """Step 5: the sigma schedule."""
        return r.schedule.fn(self.schedule, r.request.steps).to(torch.float32)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, *, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run a txt2img job; raising from ``progress`` interrupts it."""
        r = self.resolve(request)
        req = r.request
        bundle, text = self.adapted(r)
        encoded = self.conditioning(r, text)
        sigmas = self.sigmas(r)
        device = next(bundle.unet.parameters()).device
        shape = self.latent_format.latent_shape(r.width, r.height)
        images: list[Image.Image] = []
        seeds: list[int] = []
        for n in range(req.n_iter):
            # Step 6: per-image seeded noise on the CPU; image i of the job uses seed + i.
            batch_seeds = [req.seed + n * req.batch_size + i for i in range(req.batch_size)]
            seeded = SeededNoise(batch_seeds, shape, device=device)
            x = seeded.initial() * sigmas[0]
            noise = _sampler_noise(r.sampler, seeded, batch_seeds, shape, sigmas, device)
            denoiser = self.denoiser(r, bundle)  # a fresh step counter per model call
            callback = _call_progress(denoiser, progress, n, req.n_iter)
            with _precision(req.precision):
                # Step 7: sample, then decode the latents.
                latents = r.sampler(
                    denoiser, x, sigmas.to(device), cond=encoded.conds, noise=noise,
                    callback=callback, **r.options,
                )  # fmt: skip
                pixels = decode(bundle.vae, latents, self.latent_format)
            images.extend(to_pil(pixels))
            seeds.extend(batch_seeds)
        # Step 8: infotext for each image.
        infotexts = [self.infotext(r, seed, encoded, bundle) for seed in seeds]
        return GenerationResult(images, infotexts, seeds, req)

    def infotext(
        self,
        r: Resolved,
        seed: int,
        encoded: EncodedPrompt | None = None,
        bundle: ModelBundle | None = None,
    ) -> str:
        """A1111-format parameters for one image of the job (``bundle``: the job's model)."""
        req = r.request
        b = bundle or self.bundle
        ti = encoded.embeddings if encoded is not None else ()
        library = self._embeddings if ti else None
        params: dict[str, object] = {
            "Steps": req.steps,
            "Sampler": r.sampler.label,
            "Schedule type": r.schedule.label,
            "CFG scale": req.cfg_scale,
            "Seed": seed,
            "Size": f"{r.width}x{r.height}",
            "Model hash": b.hash,
            "Model": b.name,
            "VAE hash": b.vae_hash,
            "VAE": b.vae_name,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "Eta": r.options.get("eta"),
            "CFG rescale": req.guidance_rescale or None,
            "Precision": req.precision if req.precision != "fp32" else None,
            "Emphasis": req.emphasis if req.emphasis != "Original" else None,
            "Lora hashes": ", ".join(f"{f.name}: {f.hash}" for f, _, _ in r.adapters.loras) or None,
            "TI hashes": ", ".join(f"{n}: {library.get(n).hash}" for n in ti) if library else None,
            "Version": f"emaki {__version__}",
        }
        prompt = strip_comments(req.prompt)
        return format_infotext(prompt, r.negative_prompt, params)


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


def _call_progress(
    denoiser: ScheduledGuidance, progress: ProgressCallback | None, n: int, total: int
) -> StepCallback:
    """The sampler's step callback: advance the prompt schedule, then report progress."""

    def callback(info: StepInfo) -> None:
        denoiser.on_step(info)
        if progress is not None:
            progress(info, n, total)

    return callback


def _number(text: str, call: ExtraNetworkCall) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(
            f"<{call.kind}:{call.name}:...> has a multiplier {text!r} that is not a number"
        ) from None


def _lora_multipliers(call: ExtraNetworkCall) -> tuple[float, float]:
    """(text encoder, UNet) multipliers: ``<lora:n:m>``, ``<lora:n:te:unet>``, ``te=``/``unet=``."""
    pos = [_number(v, call) for v in call.positional]
    te = pos[0] if pos else 1.0
    unet = pos[1] if len(pos) > 1 else te
    named = dict(call.named)
    te = _number(named["te"], call) if "te" in named else te
    unet = _number(named["unet"], call) if "unet" in named else unet
    return te, unet


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
    models: Path | None = None,
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
    return Pipeline(bundle, models=models, allow_pickle=allow_pickle)
