"""The typed generation request, validated once at the edge of the system.

Everything that decides an image is a field here; the CLI, the Python API, infotext ("use these
settings again") and later the HTTP API all produce a :class:`GenerationRequest`. Validation
turns bad values into one-line :class:`~emaki.errors.InvalidRequestError` messages that list
what is accepted.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from emaki.errors import InvalidRequestError

Precision = Literal["fp32", "bf16"]

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_SIDE = 8192


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

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (a random one drawn if ``seed == -1``)."""
        if self.seed != -1:
            return self
        return replace(self, seed=secrets.randbelow(MAX_SEED + 1))

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

    width = height = None
    if "Size" in params:
        try:
            width, height = (int(v) for v in params["Size"].lower().split("x"))
        except ValueError:
            raise InvalidRequestError(f"infotext 'Size' is not WxH: {params['Size']!r}") from None
    schedule = params.get("Schedule type", "automatic")
    precision = params.get("Precision", "fp32")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        sampler=params.get("Sampler", GenerationRequest.sampler),
        schedule=schedule,
        steps=num("Steps", int, GenerationRequest.steps),
        cfg_scale=num("CFG scale", float, GenerationRequest.cfg_scale),
        seed=num("Seed", int, -1),
        width=width,
        height=height,
        clip_skip=num("Clip skip", int, 1),
        guidance_rescale=num("CFG rescale", float, 0.0),
        eta=num("Eta", float, None),
        precision=precision,  # type: ignore[arg-type]
        emphasis=params.get("Emphasis", "Original"),
    )
