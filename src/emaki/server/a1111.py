"""A1111's HTTP API payloads mapped onto emaki requests, and results back into A1111's shape.

Field names, meanings and the img2img defaults follow A1111's ``StableDiffusionProcessing``
dataclasses (``modules/processing.py``) as its API exposes them, so that payloads captured from
A1111 clients work unchanged. Differences, each deliberate:

* a missing ``width``/``height`` means the model's native size (A1111: 512), and missing
  ``steps`` emaki's 20 (A1111's API: 50), because emaki's default model is small;
* fields that ask for something emaki does not do (face restoration, a refiner, scripts) are
  refused with a message rather than ignored, so a client never gets a silently different
  image; fields with their default "off" values are accepted;
* of ``alwayson_scripts``, the ControlNet extension's ``controlnet`` is run
  (:mod:`emaki.control.webui` maps its units); any other script is refused;
* unknown fields are ignored, as clients send fields of newer and older A1111 versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from PIL import Image

from emaki.control.webui import units_from_api
from emaki.errors import InvalidRequestError
from emaki.request import ControlNetUnit, GenerationRequest, HiresFix, InitImage
from emaki.server.payload import Uploads

#: A1111 field -> (GenerationRequest field, type)
_COMMON: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float),
    "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "tiling": ("tiling", bool),
    "eta": ("eta", float),
    "denoising_strength": ("denoising_strength", float),
}
#: Fields emaki refuses when they ask for something (value -> is it "off"?).
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "restore_faces": lambda v: not v,
    "script_name": lambda v: v in (None, "", "None"),
    "refiner_checkpoint": lambda v: v in (None, "", "None"),
    "hr_checkpoint_name": lambda v: v in (None, "", "Use same checkpoint"),
    "image_cfg_scale": lambda v: v is None,
    "latent_mask": lambda v: v is None,
}


def _typed(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidRequestError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _check_supported(body: dict[str, Any]) -> None:
    for key, is_off in _UNSUPPORTED.items():
        if key in body and not is_off(body[key]):
            raise InvalidRequestError(f"emaki does not support {key}={body[key]!r}")
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise InvalidRequestError("alwayson_scripts must be an object of script name -> args")
    others = sorted(name for name in scripts if name.lower() != "controlnet")
    if others:
        raise InvalidRequestError(
            f"emaki does not run A1111 scripts ({', '.join(others)}); of alwayson_scripts it "
            "runs only controlnet"
        )


def _common(body: dict[str, Any], current_model: str | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _check_supported(body)
    kw: dict[str, Any] = {}
    for key, (name, kind) in _COMMON.items():
        if body.get(key) is not None:
            kw[name] = _typed(body, key, kind)
    if kw.get("width") in (0,) or kw.get("height") in (0,):
        kw.pop("width", None), kw.pop("height", None)
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler:
        kw["sampler"] = _typed({"sampler_name": sampler}, "sampler_name", str)
    if body.get("scheduler"):
        kw["schedule"] = _typed(body, "scheduler", str)
    rw, rh = body.get("seed_resize_from_w", -1), body.get("seed_resize_from_h", -1)
    if isinstance(rw, int) and isinstance(rh, int) and rw > 0 and rh > 0:
        kw["seed_resize_from"] = (rw, rh)
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidRequestError("override_settings must be an object")
    if "CLIP_stop_at_last_layers" in overrides:
        kw["clip_skip"] = _typed(overrides, "CLIP_stop_at_last_layers", int)
    vae = overrides.get("sd_vae")
    if vae not in (None, "", "Automatic", "None"):
        kw["vae"] = str(vae)
    model = overrides.get("sd_model_checkpoint")
    if model and current_model and model not in (current_model, current_model.split(" [")[0]):
        raise InvalidRequestError(
            f"this server runs {current_model!r}; switching checkpoints per request "
            f"({model!r}) is not supported"
        )
    if body.get("styles"):
        kw["_styles"] = [str(s) for s in body["styles"]]
    return kw


def _control(
    body: dict[str, Any], uploads: Uploads | None, init: Image.Image | None = None
) -> tuple[ControlNetUnit, ...]:
    scripts = body.get("alwayson_scripts") or {}
    if not scripts:
        return ()
    if uploads is None:
        raise InvalidRequestError("ControlNet units need an upload store (server set-up)")
    return units_from_api(scripts, uploads.decode_base64, init)


def txt2img_request(
    body: dict[str, Any], *, current_model: str | None = None, uploads: Uploads | None = None
) -> GenerationRequest:
    """A ``POST /sdapi/v1/txt2img`` body as a request (styles are returned for the caller).

    ``uploads`` decodes the images of ControlNet units, when the body has any."""
    kw = _common(body, current_model)
    kw.pop("_styles", None)
    strength = kw.pop("denoising_strength", None)
    request = GenerationRequest(**kw, control=_control(body, uploads))
    if body.get("enable_hr"):
        hires = HiresFix(
            scale=float(body.get("hr_scale", 2.0)),
            resize_x=int(body.get("hr_resize_x", 0) or 0),
            resize_y=int(body.get("hr_resize_y", 0) or 0),
            upscaler=str(body.get("hr_upscaler") or "Latent"),
            steps=int(body.get("hr_second_pass_steps", 0) or 0),
            denoising_strength=float(strength if strength is not None else 0.7),
            sampler=body.get("hr_sampler_name") or None,
            schedule=body.get("hr_scheduler") or None,
            prompt=body.get("hr_prompt") or None,
            negative_prompt=body.get("hr_negative_prompt") or None,
            cfg_scale=body.get("hr_cfg"),
        )
        request = replace(request, hires=hires)
    return request


def img2img_request(
    body: dict[str, Any], uploads: Uploads, *, current_model: str | None = None
) -> GenerationRequest:
    """A ``POST /sdapi/v1/img2img`` body as a request (the first init image is used)."""
    kw = _common(body, current_model)
    kw.pop("_styles", None)
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise InvalidRequestError("init_images must be a list with at least one base64 image")
    image = uploads.decode_base64(images[0], "init_images[0]")
    mask = None
    if body.get("mask"):
        mask = uploads.decode_base64(body["mask"], "mask")
    blur = body.get("mask_blur")
    if blur is None:
        blur = body.get("mask_blur_x", 4)
    init = InitImage(
        image,
        mask=mask,
        resize_mode=_int(body, "resize_mode", 0),
        mask_blur=int(blur),
        inpainting_fill=_int(body, "inpainting_fill", 0),
        inpaint_full_res=bool(body.get("inpaint_full_res", True)),
        inpaint_full_res_padding=_int(body, "inpaint_full_res_padding", 0),
        inpainting_mask_invert=bool(body.get("inpainting_mask_invert", 0)),
        initial_noise_multiplier=float(body.get("initial_noise_multiplier") or 1.0),
    )
    return GenerationRequest(**kw, init=init, control=_control(body, uploads, image))


def _int(body: dict[str, Any], key: str, default: int) -> int:
    if body.get(key) is None:
        return default
    return int(_typed(body, key, int))


def styles_of(body: dict[str, Any]) -> list[str]:
    styles = body.get("styles") or []
    if not isinstance(styles, list):
        raise InvalidRequestError("styles must be a list of style names")
    return [str(s) for s in styles]


def info_json(
    request: GenerationRequest,
    seeds: list[int],
    infotexts: list[str],
    model_name: str,
    model_hash: str | None,
    width: int,
    height: int,
) -> str:
    """The ``info`` string of an A1111 response (JSON of its ``Processed.js()``)."""
    return json.dumps(
        {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": seeds[0] if seeds else request.seed,
            "all_seeds": seeds,
            "subseed": request.subseed,
            "all_subseeds": [request.subseed] * len(seeds),
            "subseed_strength": request.subseed_strength,
            "width": width,
            "height": height,
            "sampler_name": request.sampler,
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "restore_faces": False,
            "sd_model_name": model_name,
            "sd_model_hash": model_hash,
            "seed_resize_from_w": request.seed_resize_from[0] if request.seed_resize_from else -1,
            "seed_resize_from_h": request.seed_resize_from[1] if request.seed_resize_from else -1,
            "denoising_strength": request.denoising_strength,
            "clip_skip": request.clip_skip,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "is_using_inpainting_conditioning": False,
            "version": "emaki",
        }
    )
