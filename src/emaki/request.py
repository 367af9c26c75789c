"""The typed generation request, validated once at the edge of the system.

Everything that decides an image is a field here; the CLI, the Python API, infotext ("use these
settings again") and later the HTTP API all produce a :class:`GenerationRequest`. Validation
turns bad values into one-line :class:`~emaki.errors.InvalidRequestError` messages that list
what is accepted.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from emaki.errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image

Precision = Literal["fp32", "bf16"]

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_SIDE = 8192

#: A1111's img2img resize modes, by their API index (``resize_mode``).
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
#: A1111's "Masked content" choices, by their API index (``inpainting_fill``).
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
#: Latent upscalers for hires fix (A1111 names); any other name is a pixel upscaler.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest", "None")


@dataclass(frozen=True)
class InitImage:
    """img2img and inpainting input (A1111 semantics; field names follow A1111's API).

    ``mask``: white (or any alpha in an RGBA image) marks the area to repaint. ``resize_mode``
    indexes :data:`RESIZE_MODES`, ``inpainting_fill`` indexes :data:`MASKED_CONTENT`.
    ``inpaint_full_res`` is "Inpaint area: Only masked": the masked region plus
    ``inpaint_full_res_padding`` pixels is cropped, generated at the full size and pasted back.
    """

    image: Image.Image
    mask: Image.Image | None = None
    resize_mode: int = 0
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    initial_noise_multiplier: float = 1.0
    #: DiffEdit: a prompt describing the init image; with no mask, the mask is where it and the
    #: request's prompt make the model predict different noise (Couairon et al. 2022)
    diffedit_source: str | None = None

    def validate(self) -> None:
        from PIL import Image

        if not isinstance(self.image, Image.Image):
            raise InvalidRequestError("the init image must be an image")
        if self.mask is not None and not isinstance(self.mask, Image.Image):
            raise InvalidRequestError("the mask must be an image")
        _check_int("resize mode", self.resize_mode, 0, len(RESIZE_MODES) - 1)
        _check_int("masked content (inpainting fill)", self.inpainting_fill, 0, 3)
        _check_int("mask blur", self.mask_blur, 0, 256)
        _check_int("masked area padding", self.inpaint_full_res_padding, 0, 1024)
        if self.diffedit_source is not None and self.mask is not None:
            raise InvalidRequestError(
                "DiffEdit makes the mask from its source prompt: give a mask or a source prompt, "
                "not both"
            )
        if self.diffedit_source is not None and not isinstance(self.diffedit_source, str):
            raise InvalidRequestError("the DiffEdit source prompt must be text")
        if not 0.0 <= self.initial_noise_multiplier <= 2.0:
            raise InvalidRequestError(
                f"initial noise multiplier must be in [0, 2], got {self.initial_noise_multiplier}"
            )


@dataclass(frozen=True)
class RegionPrompt:
    """A prompt for part of the image (MultiDiffusion region): a pixel box or a mask image."""

    prompt: str
    box: tuple[int, int, int, int] | None = None  #: (x0, y0, x1, y1) in pixels
    mask: Image.Image | None = None  #: white = the region

    def validate(self) -> None:
        if (self.box is None) == (self.mask is None):
            raise InvalidRequestError("a region prompt needs exactly one of a box or a mask")
        if self.box is not None and (
            len(self.box) != 4 or not all(isinstance(v, int) for v in self.box)
        ):
            raise InvalidRequestError(
                f"a region box is four whole numbers x0, y0, x1, y1: {self.box}"
            )


#: sd-webui-controlnet's control modes; "ControlNet is more important" is guess mode.
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet of a request (field names follow sd-webui-controlnet's API).

    ``model`` names a file or folder in the models folder's ``controlnet/`` (or is a path);
    ``image`` is the input image, turned into the control image by the preprocessor ``module``
    ("none": the image is the control image already) with ``module_options``, after it is
    resized to the generation's size by ``resize_mode`` (:data:`RESIZE_MODES` 0-2; 1, "Crop and
    resize", is sd-webui-controlnet's default). ``weight`` scales the residuals; the unit acts
    from ``guidance_start`` to ``guidance_end`` (fractions of the steps). ``control_mode`` 2,
    "ControlNet is more important", is guess mode.
    """

    model: str
    image: Image.Image | None  # None only in a unit read back from infotext, until it is given
    module: str = "none"
    module_options: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0
    resize_mode: int = 1

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidRequestError("a ControlNet unit needs a model name")
        if self.image is None:
            raise InvalidRequestError(f"ControlNet {self.model!r} needs an image")
        if not isinstance(self.weight, int | float) or not -10.0 <= self.weight <= 10.0:
            raise InvalidRequestError(f"ControlNet weight must be in [-10, 10], got {self.weight}")
        if not 0.0 <= self.guidance_start < self.guidance_end <= 1.0:
            raise InvalidRequestError(
                "ControlNet guidance start and end must satisfy 0 <= start < end <= 1, got "
                f"{self.guidance_start} and {self.guidance_end}"
            )
        _check_int("ControlNet control mode", self.control_mode, 0, len(CONTROL_MODES) - 1)
        _check_int("ControlNet resize mode", self.resize_mode, 0, 2)


@dataclass(frozen=True)
class TiledDiffusion:
    """MultiDiffusion: sample through overlapping windows of the model's size.

    For panoramas and images larger than the model was trained at, and for region prompts.
    ``window`` and ``stride`` are in pixels (0: the model's native size, and half of it).
    """

    window: int = 0
    stride: int = 0
    regions: tuple[RegionPrompt, ...] = ()

    def validate(self) -> None:
        _check_int("tile window", self.window, 0, MAX_SIDE)
        _check_int("tile stride", self.stride, 0, MAX_SIDE)
        if self.window % 8 or self.stride % 8:
            raise InvalidRequestError("the tile window and stride must be multiples of 8 pixels")
        if self.stride and self.window and self.stride > self.window:
            raise InvalidRequestError("the tile stride must not exceed the window")
        for region in self.regions:
            region.validate()


@dataclass(frozen=True)
class HiresFix:
    """A1111's "Hires. fix": a second img2img pass over the upscaled first image.

    The target size is ``scale`` times the first pass unless ``resize_x``/``resize_y`` are set
    (one set: keep the aspect ratio; both: upscale to cover, then centre-crop). ``upscaler`` is
    a latent mode (:data:`LATENT_UPSCALERS`) or a pixel one (:data:`PIXEL_UPSCALERS`). ``steps``
    0 means the first pass's step count; None for sampler, schedule, prompts and CFG means "same
    as the first pass".
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    sampler: str | None = None
    schedule: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = None

    def validate(self) -> None:
        if not 1.0 <= self.scale <= 8.0:
            raise InvalidRequestError(f"hires scale must be in [1, 8], got {self.scale}")
        for name, side in (
            ("hires resize width", self.resize_x),
            ("hires resize height", self.resize_y),
        ):
            _check_int(name, side, 0, MAX_SIDE)
        _check_int("hires steps", self.steps, 0, MAX_STEPS)
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise InvalidRequestError(
                f"hires denoising strength must be in [0, 1], got {self.denoising_strength}"
            )
        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in PIXEL_UPSCALERS:
            raise InvalidRequestError(
                f"unknown hires upscaler {self.upscaler!r}; choose one of "
                f"{', '.join([*LATENT_UPSCALERS, *PIXEL_UPSCALERS])}"
            )
        if self.cfg_scale is not None and not 0.0 <= self.cfg_scale <= 100.0:
            raise InvalidRequestError(f"hires CFG scale must be in [0, 100], got {self.cfg_scale}")


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img job: ``batch_size`` images per model call, ``n_iter`` calls.

    ``seed=-1`` draws a random seed (see :meth:`with_seed`); image ``i`` of the job uses
    ``seed + i`` as A1111 does. ``width``/``height`` of None mean the model's native size.
    ``schedule="automatic"`` uses the sampler's A1111 default schedule.
    """

    prompt: str
    negative_prompt: str = ""
    sampler: str = "DPM++ 2M"
    schedule: str = "automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    eta: float | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    precision: Precision = "fp32"
    emphasis: str = "Original"
    vae: str | None = None  #: a VAE from the models folder's vae/ for this request
    subseed: int = -1  #: variation seed (-1: drawn at random when subseed_strength > 0)
    subseed_strength: float = 0.0  #: 0 = the seed's image, 1 = the variation seed's
    seed_resize_from: tuple[int, int] | None = None  #: (width, height) the noise is made at
    tiling: bool = False  #: seamless tiling (circular padding in UNet and VAE)
    denoising_strength: float = 0.75  #: img2img strength (with ``init``)
    init: InitImage | None = None  #: img2img / inpainting input
    hires: HiresFix | None = None  #: txt2img second pass
    tiled: TiledDiffusion | None = None  #: MultiDiffusion windows and region prompts
    control: tuple[ControlNetUnit, ...] = ()  #: ControlNet units, summed
    sag_scale: float = 0.0  #: self-attention guidance scale (0: off)

    def with_seed(self) -> GenerationRequest:
        """This request with concrete seeds (random ones drawn for ``-1``)."""
        r = self
        if r.seed == -1:
            r = replace(r, seed=secrets.randbelow(MAX_SEED + 1))
        if r.subseed == -1 and r.subseed_strength > 0:
            r = replace(r, subseed=secrets.randbelow(MAX_SEED + 1))
        return r

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field and what is accepted."""
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt must be text")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("batch size", self.batch_size, 1, 64)
        _check_int("n-iter", self.n_iter, 1, 10_000)
        _check_int("clip skip", self.clip_skip, 1, 12)
        if self.seed != -1:
            _check_int("seed", self.seed, 0, MAX_SEED)
        for name, side in (("width", self.width), ("height", self.height)):
            if side is None:
                continue
            _check_int(name, side, 8, MAX_SIDE)
            if side % 8:
                raise InvalidRequestError(
                    f"{name} {side} is not a multiple of 8 (the autoencoder downsamples by 8); "
                    f"try {max(8, side // 8 * 8)} or {side // 8 * 8 + 8}"
                )
        if not 0.0 <= self.cfg_scale <= 100.0:
            raise InvalidRequestError(f"CFG scale must be in [0, 100], got {self.cfg_scale}")
        if not isinstance(self.sag_scale, int | float) or not 0.0 <= self.sag_scale <= 10.0:
            raise InvalidRequestError(
                f"self-attention guidance scale must be in [0, 10], got {self.sag_scale}"
            )
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InvalidRequestError(
                f"guidance rescale must be in [0, 1], got {self.guidance_rescale}"
            )
        if self.eta is not None and not 0.0 <= self.eta <= 10.0:
            raise InvalidRequestError(f"eta must be in [0, 10], got {self.eta}")
        if self.emphasis not in EMPHASIS_MODES:
            raise InvalidRequestError(
                f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {self.emphasis!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise InvalidRequestError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.subseed != -1:
            _check_int("variation seed", self.subseed, 0, MAX_SEED)
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise InvalidRequestError(
                f"variation strength must be in [0, 1], got {self.subseed_strength}"
            )
        if self.seed_resize_from is not None:
            w, h = self.seed_resize_from
            _check_int("seed resize width", w, 8, MAX_SIDE)
            _check_int("seed resize height", h, 8, MAX_SIDE)
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise InvalidRequestError(
                f"denoising strength must be in [0, 1], got {self.denoising_strength}"
            )
        if self.init is not None:
            self.init.validate()
        if self.hires is not None:
            self.hires.validate()
        if self.tiled is not None:
            self.tiled.validate()
        if self.init is not None and self.hires is not None:
            raise InvalidRequestError("hires fix is a txt2img option; img2img takes no hires")
        for unit in self.control:
            unit.validate()


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {value}")


def request_from_params(
    prompt: str, negative_prompt: str, params: dict[str, str]
) -> GenerationRequest:
    """Re-create a request from parsed infotext parameters (A1111 keys).

    Unknown keys are ignored (other tools write many); a known key with an unreadable value is an
    error naming the key. A1111's older combined sampler labels ("DPM++ 2M Karras") are accepted.
    """

    def num(key: str, kind: type, default: Any) -> Any:
        if key not in params:
            return default
        try:
            value = float(params[key])
            return int(value) if kind is int and value.is_integer() else kind(value)
        except ValueError:
            raise InvalidRequestError(
                f"infotext {key!r} has an unreadable value {params[key]!r}"
            ) from None

    width, height = _size(params, "Size") or (None, None)
    schedule = params.get("Schedule type", "automatic")
    precision = params.get("Precision", "fp32")
    strength = num("Denoising strength", float, None)
    hires = None
    if strength is not None and any(
        k in params for k in ("Hires upscale", "Hires upscaler", "Hires resize")
    ):
        rx, ry = _size(params, "Hires resize") or (0, 0)
        hires = HiresFix(
            scale=num("Hires upscale", float, 2.0),
            resize_x=rx,
            resize_y=ry,
            upscaler=params.get("Hires upscaler", "Latent"),
            steps=num("Hires steps", int, 0),
            denoising_strength=strength,
            sampler=params.get("Hires sampler"),
            schedule=params.get("Hires schedule type"),
            prompt=params.get("Hires prompt"),
            negative_prompt=params.get("Hires negative prompt"),
            cfg_scale=num("Hires CFG Scale", float, None),
        )
    tiled = _tiled_from_params(params)
    from emaki.control.webui import units_from_infotext

    return GenerationRequest(
        prompt=prompt,
        control=units_from_infotext(params),  # without images: the caller must supply them
        negative_prompt=negative_prompt,
        tiled=tiled,
        sampler=params.get("Sampler", GenerationRequest.sampler),
        schedule=schedule,
        steps=num("Steps", int, GenerationRequest.steps),
        cfg_scale=num("CFG scale", float, GenerationRequest.cfg_scale),
        seed=num("Seed", int, -1),
        width=width,
        height=height,
        clip_skip=num("Clip skip", int, 1),
        guidance_rescale=num("CFG rescale", float, 0.0),
        sag_scale=num("SAG Guidance Scale", float, 0.0),
        eta=num("Eta", float, None),
        precision=precision,  # type: ignore[arg-type]
        emphasis=params.get("Emphasis", "Original"),
        subseed=num("Variation seed", int, -1),
        subseed_strength=num("Variation seed strength", float, 0.0),
        seed_resize_from=_size(params, "Seed resize from"),
        tiling=params.get("Tiling", "").strip().lower() == "true",
        denoising_strength=strength if strength is not None and hires is None else 0.75,
        hires=hires,
    )


def _tiled_from_params(params: dict[str, str]) -> TiledDiffusion | None:
    """``MultiDiffusion: window W, stride S`` and the regions' JSON, back into settings."""
    import json
    import re

    if "MultiDiffusion" not in params:
        return None
    m = re.fullmatch(r"window (\d+), stride (\d+)", params["MultiDiffusion"].strip())
    if m is None:
        raise InvalidRequestError(
            f"infotext 'MultiDiffusion' is unreadable: {params['MultiDiffusion']!r}"
        )
    regions = ()
    if "MultiDiffusion regions" in params:
        try:
            items = json.loads(params["MultiDiffusion regions"])
            regions = tuple(
                RegionPrompt(str(i["prompt"]), box=tuple(int(v) for v in i["box"])) for i in items
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError("infotext 'MultiDiffusion regions' is unreadable") from None
    return TiledDiffusion(window=int(m[1]), stride=int(m[2]), regions=regions)  # type: ignore[arg-type]


def _size(params: dict[str, str], key: str) -> tuple[int, int] | None:
    """A ``WxH`` infotext value as (width, height), None when absent."""
    if key not in params:
        return None
    try:
        w, h = (int(v) for v in params[key].lower().split("x"))
    except ValueError:
        raise InvalidRequestError(f"infotext {key!r} is not WxH: {params[key]!r}") from None
    return w, h


def init_from_params(
    params: dict[str, str], image: Image.Image, mask: Image.Image | None = None
) -> InitImage:
    """The img2img settings an infotext records, applied to a given init image and mask."""
    content = params.get("Masked content", "original")
    if content not in MASKED_CONTENT:
        raise InvalidRequestError(
            f"infotext 'Masked content' {content!r} is not one of {MASKED_CONTENT}"
        )
    mode = params.get("Resize mode", RESIZE_MODES[0])
    if mode not in RESIZE_MODES:
        raise InvalidRequestError(f"infotext 'Resize mode' {mode!r} is not one of {RESIZE_MODES}")
    try:
        return InitImage(
            image,
            mask=mask,
            resize_mode=RESIZE_MODES.index(mode),
            mask_blur=int(float(params.get("Mask blur", 4))),
            inpainting_fill=MASKED_CONTENT.index(content),
            inpaint_full_res=params.get("Inpaint area") == "Only masked",
            inpaint_full_res_padding=int(float(params.get("Masked area padding", 32))),
            inpainting_mask_invert=params.get("Mask mode") == "Inpaint not masked",
            initial_noise_multiplier=float(params.get("Noise multiplier", 1.0)),
            diffedit_source=params.get("DiffEdit source") if mask is None else None,
        )
    except ValueError as e:
        raise InvalidRequestError(f"infotext has an unreadable img2img value: {e}") from None
