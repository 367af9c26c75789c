"""txt2img: prompt -> adapters -> conditioning -> guided denoiser -> sampler -> decode -> images.

This module only wires the stages together, in numbered steps; each stage lives in its own
module (prompt grammar, adapters, text encoding, sampling, latents, infotext).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
from emaki.pipelines.hires import hires_size, upscale_latents
from emaki.pipelines.img2img import (
    InitState,
    fixed_steps,
    img2img_sigmas,
    prepare_init,
    txt2img_conditioning,
)
from emaki.pipelines.params import (
    control_params,
    denoising,
    hires_params,
    init_params,
    seed_params,
    tiled_params,
)
from emaki.prompts.encode import EncodedPrompt, ScheduledGuidance, encode_prompts, stack_plain
from emaki.prompts.grammar import ExtraNetworkCall, extract_extra_networks, strip_comments
from emaki.request import GenerationRequest
from emaki.sampling.brownian import BrownianNoise
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser
from emaki.sampling.inpaint import MaskedDenoiser
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
    tiling: bool = False  #: circular padding in the UNet and VAE (seamless tiles)

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            tuple((f.hash, te, un) for f, te, un in self.loras),
            tuple((h.hash, m) for h, m in self.hypernetworks),
            str(self.vae) if self.vae is not None else None,
            self.tiling,
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
        self._controlnets: dict[str, Any] = {}  #: loaded ControlNets by file, the last four
        self._files: dict[str, tuple[tuple[int, int], Any]] = {}  #: read adapter files
        self.text = TextEncoder(bundle.tokenizer, bundle.text_encoder)
        self.schedule = DiscreteSchedule(bundle.alphas_cumprod)
        down = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
        self.latent_format = LatentFormat(
            channels=int(bundle.vae.config.latent_channels),
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
        if request.tiling:
            adapters = replace(adapters, tiling=True)
        if request.init is not None and (request.width is None or request.height is None):
            # img2img without a size: the init image's size (multiples of 8)
            w, h = request.init.image.size
            width = request.width or max(8, w // 8 * 8)
            height = request.height or max(8, h // 8 * 8)
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
                lora = self._read_cached(
                    entry.path, lambda p: read_lora(p, self.bundle, allow_pickle=self.allow_pickle)
                )
                loras.append((lora, te, unet))
            elif call.kind == "hypernet":
                entry = find_model("hypernetworks", call.name, self.models)
                mult = _number(call.positional[0] if call.positional else "1", call)
                hyper = self._read_cached(
                    entry.path, lambda p: read_hypernetwork(p, allow_pickle=self.allow_pickle)
                )
                hypers.append((hyper, mult))
            else:
                raise InvalidRequestError(
                    f"unknown extra network <{call.kind}:{call.name}>; emaki reads <lora:...> and "
                    "<hypernet:...>"
                )
        return Adapters(tuple(loras), tuple(hypers))

    def _read_cached(self, path: Path, read: Callable[[Path], Any]) -> Any:
        """``read(path)``, reused while the file's size and modification time stay the same
        (a prompt's LoRA files are read, and hashed, once rather than on every request)."""
        try:
            stat = path.stat()
        except OSError:
            return read(path)  # the reader names the problem
        key, version = str(path.resolve()), (stat.st_size, stat.st_mtime_ns)
        cached = self._files.get(key)
        if cached is None or cached[0] != version:
            while len(self._files) >= 32:
                self._files.pop(next(iter(self._files)))
            cached = self._files[key] = (version, read(path))
        return cached[1]

    def adapted(self, r: Resolved) -> tuple[ModelBundle, TextEncoder]:
        """Step 2: the job's model: the shared one, or a clone with the prompt's adapters."""
        key = r.adapters.key
        if key == ((), (), None, False):
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
            if r.adapters.tiling:
                from emaki.adapters.tiling import apply_tiling

                bundle = apply_tiling(bundle)
            while len(self._adapted) >= 2:  # keep the last two adapter sets
                self._adapted.pop(next(iter(self._adapted)))
            self._adapted[key] = (bundle, self._text_encoder(bundle))
        return self._adapted[key]

    def _text_encoder(self, bundle: ModelBundle) -> TextEncoder:
        embeddings = self.embedding_library()
        if bundle is self.bundle:  # self.text holds the embeddings once they are looked up
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

    def conditioning(
        self,
        r: Resolved,
        text: TextEncoder | None = None,
        *,
        prompts: tuple[str, str] | None = None,
        steps: int | None = None,
    ) -> EncodedPrompt:
        """Step 3: encode every distinct text of the prompts' schedules once (not per image).

        ``prompts`` (positive, negative) and ``steps`` replace the request's (hires pass).
        """
        req = r.request
        prompt, negative = prompts or (r.prompt, r.negative_prompt)
        return encode_prompts(
            text or self.text,
            prompt,
            negative,
            steps or req.steps,
            clip_skip=req.clip_skip,
            emphasis=req.emphasis,
        )

    def denoiser(
        self,
        r: Resolved,
        bundle: ModelBundle | None = None,
        *,
        concat: Tensor | None = None,
        cfg_scale: float | None = None,
        control: Sequence[Any] = (),
        steps: int = 0,
    ) -> ScheduledGuidance:
        """Step 4: the model as a denoiser, wrapped in scheduled classifier-free guidance.

        ``concat`` [1, k, h, w] is appended to the UNet input's channels (inpainting models).
        ``control``: :class:`~emaki.control.ControlUnit`\\ s whose residuals the UNet adds, with
        their start/end windows counted over ``steps`` sampler steps.
        """
        unet = (bundle or self.bundle).unet
        capture = None
        if r.request.sag_scale > 0:  # a fresh capturing clone per call: it holds the last map
            from emaki.sampling.sag import capture_self_attention

            unet, capture = capture_self_attention(unet)
        model: Any = unet
        listeners: tuple[Callable[[StepInfo], None], ...] = ()
        windows: tuple[Callable[[Any], None], ...] = ()
        if control:
            from emaki.control import ControlledUNet

            model = ControlledUNet(unet, control, steps)
            listeners = (model.on_step,)
            windows = (model.set_window,)

        def apply(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            extra = None
            if concat is not None:
                extra = concat.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            if model is not unet:  # ControlNets see the 4-channel latent, the UNet all 9
                return model(x, t, cond, extra)
            if extra is not None:
                x = torch.cat([x, extra], dim=1)
            ctx = cond.context.to(x.device, x.dtype)
            return unet(x, t.to(x.device), encoder_hidden_states=ctx, return_dict=False)[0]

        inner = DiscreteDenoiser(apply, self.schedule, self.bundle.prediction_type)
        scale = r.request.cfg_scale if cfg_scale is None else cfg_scale
        guidance: Any = CFGDenoiser(inner, scale, r.request.guidance_rescale)
        if capture is not None:
            from emaki.sampling.sag import SelfAttentionGuidance

            guidance = SelfAttentionGuidance(
                inner, capture, scale, r.request.sag_scale, r.request.guidance_rescale
            )
        return ScheduledGuidance(guidance, listeners, windows)

    def control_units(
        self,
        r: Resolved,
        bundle: ModelBundle,
        width: int,
        height: int,
        init: InitState | None = None,
    ) -> list[Any]:
        """Step 4b (ControlNet): each unit's model and its control image at ``width`` x ``height``:
        the input resized by the unit's resize mode, then run through its preprocessor.

        With "only masked" inpainting (``init.region`` set) the input is first brought to the
        init image's size and cut to the same region as the init image, so that the control
        lines up with the crop being generated (as sd-webui-controlnet and diffusers'
        ``padding_mask_crop`` do)."""
        req = r.request
        if not req.control:
            return []
        from emaki.control import ControlUnit, hint_from_image, preprocess
        from emaki.imageops.resize import resize_image

        region = init.region if init is not None else None
        base = init.base if init is not None else None
        units = []
        for u in req.control:
            image = u.image.convert("RGB")
            if region is not None and base is not None:
                if image.size != base.size:
                    image = resize_image(u.resize_mode, image, *base.size)
                image = resize_image(2, image.crop(region), width, height)
            elif image.size != (width, height):
                image = resize_image(u.resize_mode, image, width, height)
            if u.module.strip().lower() != "none":
                image = preprocess(u.module, image, **u.module_options)
            unit = ControlUnit(
                self.controlnet(u.model), hint_from_image(image, width, height),
                u.weight, u.guidance_start, u.guidance_end,
                guess_mode=u.control_mode == 2, soft=u.control_mode == 1,
            )  # fmt: skip
            units.append(unit)
        return units

    def controlnet(self, name: str) -> Any:
        """The ControlNet called ``name`` in the models folder's ``controlnet/``, loaded once
        (the last four are kept) in the UNet's dtype and device."""
        from emaki.control import load_controlnet
        from emaki.models.library import find_model

        entry = find_model("controlnet", name, self.models)
        key = str(entry.path)
        if key not in self._controlnets:
            param = next(self.bundle.unet.parameters())
            net = load_controlnet(entry.path, allow_pickle=self.allow_pickle, dtype=param.dtype)
            while len(self._controlnets) >= 4:
                self._controlnets.pop(next(iter(self._controlnets)))
            self._controlnets[key] = net.to(param.device)
        return self._controlnets[key]

    def sigmas(self, r: Resolved, steps: int | None = None) -> Tensor:
        """Step 5: the sigma schedule (img2img: its tail, by the denoising strength)."""
        req = r.request
        full = r.schedule.fn(self.schedule, steps or req.steps).to(torch.float32)
        if req.init is None or steps is not None:
            return full
        return img2img_sigmas(full, req.denoising_strength)

    def inpainting_model(self, bundle: ModelBundle) -> bool:
        """Whether the UNet takes mask and masked-image channels (RunwayML inpainting)."""
        return int(bundle.unet.config.in_channels) == self.latent_format.channels * 2 + 1

    def diffedit(
        self, r: Resolved, bundle: ModelBundle, text: TextEncoder, encoded: EncodedPrompt
    ) -> Resolved:
        """Step 5b (DiffEdit): the request with the mask where the init image's source prompt
        and the prompt disagree (10 noises at diffusers' default encode strength 0.5, ratio 3;
        the CFG scale and negative prompt of the request), ready for the inpainting path."""
        from emaki.edit.diffedit import diffedit_mask, diffedit_sigma, mask_to_images
        from emaki.imageops.resize import resize_image
        from emaki.latents import encode, from_pil

        req = r.request
        init = req.init
        assert init is not None and init.diffedit_source is not None
        image = init.image.convert("RGB")
        if init.resize_mode != 3 and image.size != (r.width, r.height):
            image = resize_image(init.resize_mode, image, r.width, r.height)
        latents = encode(bundle.vae, from_pil(image), self.latent_format, mean=True)
        source_text, _ = extract_extra_networks(strip_comments(init.diffedit_source))
        source = self.conditioning(r, text, prompts=(source_text, r.negative_prompt)).conds.at(0)
        guided = self.denoiser(r, bundle).cfg
        mask = diffedit_mask(
            guided, latents, source, encoded.conds.at(0),
            sigma=diffedit_sigma(self.schedule, 0.5), seed=req.seed,
        )  # fmt: skip
        if not bool(mask.any()):
            raise InvalidRequestError(
                "DiffEdit found nothing to change: nowhere do the source prompt and the prompt "
                "make the model predict noise that differs more than elsewhere (the mask keeps "
                "what differs over 1.5 times the mean); describe the image in the source prompt "
                "and an edit of its shape in the prompt, or give a mask"
            )
        (mask_image,) = mask_to_images(mask, image.size)
        edited = replace(init, image=image, mask=mask_image, resize_mode=0)
        return replace(r, request=replace(req, init=edited))

    def init_state(self, r: Resolved, bundle: ModelBundle) -> InitState | None:
        """Step 6a (img2img): the init image resized, masked, filled and encoded."""
        if r.request.init is None:
            return None
        return prepare_init(
            r.request.init, r.width, r.height, bundle.vae, self.latent_format,
            inpainting_model=self.inpainting_model(bundle),
        )  # fmt: skip

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, *, progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Run a txt2img or img2img job; raising from ``progress`` interrupts it."""
        r = self.resolve(request)
        req = r.request
        bundle, text = self.adapted(r)
        encoded = self.conditioning(r, text)
        if req.init is not None and req.init.diffedit_source is not None:
            r = self.diffedit(r, bundle, text, encoded)
        init = self.init_state(r, bundle)
        sigmas = self.sigmas(r)
        concat = init.concat if init is not None else None
        if init is None and self.inpainting_model(bundle):
            concat = txt2img_conditioning(bundle.vae, self.latent_format, r.width, r.height)
        shape = self.latent_format.latent_shape(r.width, r.height)
        regions = self.regions(r, text, shape) if req.tiled is not None else ()
        control = self.control_units(r, bundle, r.width, r.height, init)
        passes = 2 if req.hires is not None else 1
        images: list[Image.Image] = []
        seeds: list[int] = []
        for n in range(req.n_iter):
            # Step 6: per-image seeds; image i of the job uses seed + i.
            batch_seeds = [req.seed + n * req.batch_size + i for i in range(req.batch_size)]
            seeds.extend(batch_seeds)
            if init is not None and len(sigmas) == 1:  # strength 0: the input, unchanged
                images.extend(init.finish([init.image.copy() for _ in batch_seeds]))
                continue
            with _precision(req.precision):
                # Step 7: sample (and the hires pass), then decode the latents.
                call = _Call(progress, n * passes, req.n_iter * passes)
                latents = self.sample(
                    r, bundle, encoded, sigmas, batch_seeds, shape, init=init, concat=concat,
                    call=call, regions=regions, control=control,
                )  # fmt: skip
                if req.hires is not None:
                    latents = self.hires_pass(r, bundle, text, encoded, latents, batch_seeds, call)
                pixels = decode(bundle.vae, latents, self.latent_format)
            batch = to_pil(pixels)
            images.extend(init.finish(batch) if init is not None else batch)
        # Step 8: infotext for each image.
        infotexts = [self.infotext(r, seed, encoded, bundle) for seed in seeds]
        return GenerationResult(images, infotexts, seeds, req)

    @torch.inference_mode()
    def generate_prompts(self, request: GenerationRequest, prompts: list[str]) -> GenerationResult:
        """One txt2img image per prompt with ``request``'s settings, ``batch_size`` prompts a call.

        Image ``i`` uses ``prompts[i]`` and seed ``request.seed + i``, and is the image that
        ``generate`` makes for that prompt and seed alone (up to float rounding of the batched
        model call). Plain prompts with the same chunk count share one model call per step;
        others (editing, ``AND``, LoRA tags) are generated one by one. For evaluation sets and
        contact sheets; img2img, hires fix and tiled diffusion go through :meth:`generate`.
        """
        if request.init or request.hires or request.tiled or request.control:
            raise InvalidRequestError(
                "generating a list of prompts is plain txt2img only (no init image, hires fix, "
                "tiled diffusion or ControlNet)"
            )
        request = request.with_seed()
        base = request.seed
        single = replace(request, batch_size=1, n_iter=1)
        images: list[Image.Image] = []
        infotexts: list[str] = []
        seeds = [base + i for i in range(len(prompts))]
        for start in range(0, len(prompts), request.batch_size):
            chunk = [
                self.resolve(replace(single, prompt=p, seed=seeds[start + j]))
                for j, p in enumerate(prompts[start : start + request.batch_size])
            ]
            key = chunk[0].adapters.key
            bundle, text = self.adapted(chunk[0])
            encoded = [self.conditioning(r, text) for r in chunk]
            stacked = stack_plain(encoded) if all(r.adapters.key == key for r in chunk) else None
            if stacked is None:
                for r in chunk:
                    res = self.generate(r.request)
                    images.extend(res.images)
                    infotexts.extend(res.infotexts)
                continue
            r = chunk[0]
            concat = None
            if self.inpainting_model(bundle):
                concat = txt2img_conditioning(bundle.vae, self.latent_format, r.width, r.height)
            shape = self.latent_format.latent_shape(r.width, r.height)
            with _precision(request.precision):
                latents = self.sample(
                    r, bundle, stacked, self.sigmas(r), [c.request.seed for c in chunk], shape,
                    concat=concat,
                )  # fmt: skip
                images.extend(to_pil(decode(bundle.vae, latents, self.latent_format)))
            infotexts.extend(
                self.infotext(c, c.request.seed, e, bundle) for c, e in zip(chunk, encoded)
            )
        return GenerationResult(images, infotexts, seeds, request)

    def sample(
        self,
        r: Resolved,
        bundle: ModelBundle,
        encoded: EncodedPrompt,
        sigmas: Tensor,
        seeds: list[int],
        shape: tuple[int, ...],
        *,
        init: InitState | None = None,
        start: Tensor | None = None,
        concat: Tensor | None = None,
        cfg_scale: float | None = None,
        call: _Call | None = None,
        regions: tuple[Any, ...] = (),
        control: Sequence[Any] = (),
    ) -> Tensor:
        """One batch through the sampler: seeded noise, (init latent,) guidance, steps.

        ``start`` (img2img without an :class:`InitState`, e.g. the hires pass) is the latent the
        noise is added to. Returns latents [B, C, h, w].
        """
        req = r.request
        device = next(bundle.unet.parameters()).device
        resize_from = None
        if req.seed_resize_from is not None:
            resize_from = self.latent_format.latent_shape(*req.seed_resize_from)
        seeded = SeededNoise(
            seeds, shape, device=device, subseeds=[req.subseed] * len(seeds),
            subseed_strength=req.subseed_strength, resize_from=resize_from,
        )  # fmt: skip
        noise0 = seeded.initial()
        sigmas = sigmas.to(device)
        keep = None
        if init is not None:
            start = init.start_latent(noise0)
            keep = init.keep
        if start is not None:
            multiplier = req.init.initial_noise_multiplier if req.init is not None else 1.0
            x = start.to(noise0) + noise0 * (multiplier * sigmas[0])
        else:
            x = noise0 * sigmas[0]
        noise = _sampler_noise(r.sampler, seeded, seeds, shape, sigmas, device)
        scheduled = self.denoiser(
            r, bundle, concat=concat, cfg_scale=cfg_scale, control=control, steps=len(sigmas) - 1
        )
        denoiser: Any = scheduled
        if req.tiled is not None:  # MultiDiffusion over windows of the model's size
            from emaki.sampling.multidiffusion import MultiDiffusion

            down = self.latent_format.downsample
            win = (req.tiled.window or self.native_size) // down
            stride = (
                req.tiled.stride or max(down, req.tiled.window or self.native_size) // 2
            ) // down
            if concat is not None:
                raise InvalidRequestError(
                    "MultiDiffusion (tiled) does not work with inpainting models: their extra "
                    "input channels cover the whole image, not one window"
                )
            window = (min(win, int(shape[1])), min(win, int(shape[2])))  # small sides: one window
            stride = max(1, stride)
            denoiser = MultiDiffusion(
                scheduled,
                window=window,
                stride=(min(stride, window[0]), min(stride, window[1])),
                regions=regions,
                on_window=scheduled.on_window if control else None,
            )
        if keep is not None and start is not None:
            denoiser = MaskedDenoiser(denoiser, start, keep)
        callback = (call or _Call(None, 0, 1)).callback(scheduled)
        latents = r.sampler(
            denoiser, x, sigmas, cond=encoded.conds, noise=noise, callback=callback, **r.options
        )
        if keep is not None and start is not None:
            keep = keep.to(latents)
            latents = latents * (1 - keep) + start.to(latents) * keep
        return latents

    def regions(
        self, r: Resolved, text: TextEncoder, shape: tuple[int, ...], scale: float = 1.0
    ) -> tuple[Any, ...]:
        """Step 3b: each region prompt encoded (with the job's negative) and its latent mask;
        ``scale`` (hires pass) scales the boxes and mask images from the first pass's size."""
        from emaki.sampling.multidiffusion import Region, box_mask, image_mask

        tiled = r.request.tiled
        assert tiled is not None
        down = self.latent_format.downsample
        h, w = int(shape[1]), int(shape[2])
        out = []
        for region in tiled.regions:
            if region.box is not None:
                mask = box_mask(tuple(v * scale for v in region.box), h, w, down)
            else:
                image = region.mask
                if scale != 1.0:
                    image = image.resize((w * down, h * down), Image.Resampling.BILINEAR)
                mask = image_mask(image, h, w, down)
            prompt, _ = extract_extra_networks(strip_comments(region.prompt))
            conds = self.conditioning(r, text, prompts=(prompt, r.negative_prompt)).conds
            out.append(Region(conds, mask))
        return tuple(out)

    def hires_pass(
        self,
        r: Resolved,
        bundle: ModelBundle,
        text: TextEncoder,
        encoded: EncodedPrompt,
        latents: Tensor,
        seeds: list[int],
        call: _Call,
    ) -> Tensor:
        """Step 7b: upscale the first pass and run img2img over it at the hires size."""
        hr = r.request.hires
        assert hr is not None
        fmt = self.latent_format
        size = hires_size(hr, r.width, r.height, fmt.downsample)
        start = upscale_latents(latents, hr, size, bundle.vae, fmt)
        steps = hr.steps or r.request.steps
        sampler, schedule = r.sampler, r.schedule
        if hr.sampler is not None or hr.schedule is not None:
            sampler, legacy = resolve_sampler(hr.sampler or r.request.sampler)
            name = hr.schedule or ("automatic" if hr.sampler else r.request.schedule)
            if name.strip().lower() == "automatic":
                name = legacy or sampler.default_schedule
            schedule = get_schedule(name)
        hr_r = replace(r, sampler=sampler, schedule=schedule)
        prompts = (
            r.prompt if hr.prompt is None else strip_comments(hr.prompt),
            r.negative_prompt if hr.negative_prompt is None else strip_comments(hr.negative_prompt),
        )
        if prompts != (r.prompt, r.negative_prompt) or steps != r.request.steps:
            encoded = self.conditioning(r, text, prompts=prompts, steps=steps)
        total = fixed_steps(steps, hr.denoising_strength)
        sigmas = img2img_sigmas(self.sigmas(hr_r, total), hr.denoising_strength, run=steps)
        if len(sigmas) == 1:
            return start
        w, h = size.final(fmt.downsample)
        concat = None
        if self.inpainting_model(bundle):
            concat = txt2img_conditioning(bundle.vae, fmt, w, h)
        regions: tuple[Any, ...] = ()
        if r.request.tiled is not None and r.request.tiled.regions:
            regions = self.regions(hr_r, text, tuple(start.shape[1:]), w / r.width)
        control = self.control_units(r, bundle, w, h)
        call.advance()
        return self.sample(
            hr_r, bundle, encoded, sigmas, seeds, tuple(start.shape[1:]), start=start,
            concat=concat, cfg_scale=hr.cfg_scale, call=call, regions=regions, control=control,
        )  # fmt: skip

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
            **seed_params(req, r.width, r.height),
            "Denoising strength": denoising(req),
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            "Tiling": True if req.tiling else None,
            "Eta": r.options.get("eta"),
            "CFG rescale": req.guidance_rescale or None,
            "SAG Guidance Enabled": True if req.sag_scale else None,
            "SAG Guidance Scale": req.sag_scale or None,
            "Precision": req.precision if req.precision != "fp32" else None,
            "Emphasis": req.emphasis if req.emphasis != "Original" else None,
            "Lora hashes": ", ".join(f"{f.name}: {f.hash}" for f, _, _ in r.adapters.loras) or None,
            "TI hashes": ", ".join(f"{n}: {library.get(n).hash}" for n in ti) if library else None,
            **init_params(req),
            **hires_params(req),
            **tiled_params(req, self.native_size),
            **control_params(req),
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


class _Call:
    """Which model call of the job is running (for progress), and its step callback."""

    def __init__(self, progress: ProgressCallback | None, index: int, total: int) -> None:
        self.progress = progress
        self.index = index
        self.total = total

    def advance(self) -> None:
        self.index += 1

    def callback(self, denoiser: ScheduledGuidance) -> StepCallback:
        """The sampler's step callback: advance the prompt schedule, then report progress."""
        progress, index, total = self.progress, self.index, self.total

        def callback(info: StepInfo) -> None:
            denoiser.on_step(info)
            if progress is not None:
                progress(info, index, total)

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
