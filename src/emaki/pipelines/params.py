"""The infotext keys of generation features beyond txt2img, as A1111 names them.

Each function returns the keys one feature adds (None values are left out by the writer);
:func:`emaki.request.request_from_params` reads them back.
"""

from __future__ import annotations

from emaki.request import CONTROL_MODES, MASKED_CONTENT, RESIZE_MODES, GenerationRequest


def seed_params(req: GenerationRequest, width: int, height: int) -> dict[str, object]:
    """Variation seed and seed resize keys."""
    params: dict[str, object] = {}
    if req.subseed_strength > 0:
        params["Variation seed"] = req.subseed
        params["Variation seed strength"] = req.subseed_strength
    if req.seed_resize_from is not None and req.seed_resize_from != (width, height):
        params["Seed resize from"] = "{}x{}".format(*req.seed_resize_from)
    return params


def denoising(req: GenerationRequest) -> float | None:
    if req.hires is not None:
        return req.hires.denoising_strength
    return req.denoising_strength if req.init is not None else None


def init_params(req: GenerationRequest) -> dict[str, object]:
    """A1111's img2img/inpainting infotext keys (the init image itself is not recorded)."""
    init = req.init
    if init is None:
        return {}
    params: dict[str, object] = {}
    if init.resize_mode != 0:
        params["Resize mode"] = RESIZE_MODES[init.resize_mode]
    if init.initial_noise_multiplier != 1.0:
        params["Noise multiplier"] = init.initial_noise_multiplier
    if init.diffedit_source is not None:
        params["DiffEdit source"] = init.diffedit_source
    if init.mask is None and init.diffedit_source is None:
        return params
    params["Mask blur"] = init.mask_blur
    if init.inpainting_mask_invert:
        params["Mask mode"] = "Inpaint not masked"
    if init.inpainting_fill != 1:
        params["Masked content"] = MASKED_CONTENT[init.inpainting_fill]
    if init.inpaint_full_res:
        params["Inpaint area"] = "Only masked"
        params["Masked area padding"] = init.inpaint_full_res_padding
    return params


def tiled_params(req: GenerationRequest, native: int) -> dict[str, object]:
    """MultiDiffusion settings; region prompts as JSON so ``--from`` can read them back."""
    t = req.tiled
    if t is None:
        return {}
    import json

    window = t.window or native
    regions = [{"prompt": g.prompt, "box": list(g.box)} for g in t.regions if g.box is not None]
    return {
        "MultiDiffusion": f"window {window}, stride {t.stride or window // 2}",
        "MultiDiffusion regions": json.dumps(regions) if regions else None,
    }


def hires_params(req: GenerationRequest) -> dict[str, object]:
    hr = req.hires
    if hr is None:
        return {}
    resize = hr.resize_x or hr.resize_y
    return {
        "Hires upscale": None if resize else hr.scale,
        "Hires resize": f"{hr.resize_x}x{hr.resize_y}" if resize else None,
        "Hires steps": hr.steps or None,
        "Hires upscaler": hr.upscaler,
        "Hires sampler": hr.sampler,
        "Hires schedule type": hr.schedule,
        "Hires CFG Scale": hr.cfg_scale,
        "Hires prompt": hr.prompt if hr.prompt not in (None, req.prompt) else None,
        "Hires negative prompt": (
            hr.negative_prompt if hr.negative_prompt not in (None, req.negative_prompt) else None
        ),
    }


def control_params(req: GenerationRequest) -> dict[str, object]:
    """sd-webui-controlnet's ``ControlNet N`` keys (the control image itself is not recorded)."""
    params: dict[str, object] = {}
    for i, u in enumerate(req.control):
        options = "".join(f", {k}: {v}" for k, v in sorted(u.module_options.items()))
        params[f"ControlNet {i}"] = (
            f"Module: {u.module}, Model: {u.model}, Weight: {u.weight}, "
            f"Resize Mode: {RESIZE_MODES[u.resize_mode]}, Guidance Start: {u.guidance_start}, "
            f"Guidance End: {u.guidance_end}, Control Mode: {CONTROL_MODES[u.control_mode]}"
            f"{options}"
        )
    return params
