"""``emaki generate``: txt2img, img2img, inpainting, hires fix, variations, from the command line.

Flags map one to one onto :class:`~emaki.request.GenerationRequest` fields; ``--init`` makes
the job img2img (``--mask`` inpainting), ``--hires-scale``/``--hires-resize`` adds the hires
pass. ``--init`` may name a folder: every image in it is processed in turn (A1111's batch
img2img, with ``--mask`` a folder of masks of the same names). ``--loopback N`` feeds each
output back as the next input N times. ``--from IMAGE`` re-creates an image from its infotext
(img2img images need their ``--init`` again: infotext does not carry pixels).

The helpers here (:func:`add_model_args`, :func:`add_request_args`, :func:`request_from_args`,
:func:`load_from_args`, :func:`save_result`) are shared with other generating commands.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emaki.errors import EmakiError

if TYPE_CHECKING:
    from PIL import Image

    from emaki.pipelines.txt2img import GenerationResult, Pipeline
    from emaki.request import GenerationRequest, HiresFix, InitImage

DEFAULT_OUT = Path("outputs")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: CLI flag -> GenerationRequest field, for flags that override a request.
REQUEST_FLAGS = {
    "negative": "negative_prompt",
    "sampler": "sampler",
    "schedule": "schedule",
    "steps": "steps",
    "cfg": "cfg_scale",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "batch_size": "batch_size",
    "n_iter": "n_iter",
    "clip_skip": "clip_skip",
    "eta": "eta",
    "cfg_rescale": "guidance_rescale",
    "sag_scale": "sag_scale",
    "precision": "precision",
    "emphasis": "emphasis",
    "subseed": "subseed",
    "subseed_strength": "subseed_strength",
    "denoising_strength": "denoising_strength",
}
#: CLI flag -> InitImage field.
INIT_FLAGS = {
    "resize_mode": "resize_mode",
    "mask_blur": "mask_blur",
    "masked_content": "inpainting_fill",
    "padding": "inpaint_full_res_padding",
    "noise_multiplier": "initial_noise_multiplier",
    "diffedit_source": "diffedit_source",
}
#: CLI flag -> HiresFix field.
HIRES_FLAGS = {
    "hires_scale": "scale",
    "hires_upscaler": "upscaler",
    "hires_steps": "steps",
    "hires_denoising": "denoising_strength",
    "hires_sampler": "sampler",
    "hires_schedule": "schedule",
    "hires_prompt": "prompt",
    "hires_negative": "negative_prompt",
    "hires_cfg": "cfg_scale",
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="diffusers folder or .safetensors checkpoint")
    p.add_argument("--vae", type=Path, help="a VAE file that overrides the model's")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample"],
        help="the model's parameterisation when the file can't tell (SD 2.x 768-v: v_prediction)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt/.bin files (loaded with torch.load(weights_only=True))",
    )


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def _sides(text: str) -> tuple[int, int, int, int]:
    try:
        left, right, top, bottom = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT,TOP,BOTTOM, got {text!r}") from None
    return left, right, top, bottom


def add_request_args(g: argparse.ArgumentParser) -> None:
    """The flags of one generation request (shared by generate, plot, matrix...)."""
    from emaki.request import MASKED_CONTENT, RESIZE_MODES

    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M', 'Euler a' (see: samplers)")
    g.add_argument("--schedule", help="sigma schedule: automatic, karras, exponential, ...")
    g.add_argument("--steps", type=int, help="sampling steps (default 20)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    g.add_argument("--seed", type=int, help="seed; -1 (default) draws a random one")
    g.add_argument("--width", type=int, help="width in pixels, a multiple of 8")
    g.add_argument("--height", type=int, help="height in pixels, a multiple of 8")
    g.add_argument("--batch-size", type=int, help="images per model call (default 1)")
    g.add_argument("--n-iter", type=int, help="number of batches (default 1)")
    g.add_argument("--clip-skip", type=int, help="skip the last N-1 text-encoder layers")
    g.add_argument("--eta", type=float, help="noise multiplier of ancestral/DDIM samplers")
    g.add_argument("--cfg-rescale", type=float, help="guidance rescale phi in [0, 1]")
    g.add_argument(
        "--sag-scale", type=float, help="self-attention guidance scale (0 off; 0.75 is usual)"
    )
    g.add_argument("--precision", choices=["fp32", "bf16"], help="compute precision")
    g.add_argument(
        "--emphasis",
        choices=["Original", "No norm", "Ignore", "None"],
        help="how (word:1.2) weights apply (A1111's modes; default Original)",
    )
    g.add_argument(
        "--style", action="append", default=[], help="apply a style from the styles file"
    )
    g.add_argument(
        "--styles-file",
        type=Path,
        help="A1111-format styles.csv (default: beside the models folder)",
    )
    g.add_argument(
        "--models-dir", type=Path, help="models folder for <lora:...>, <hypernet:...>, embeddings"
    )
    g.add_argument("--vae-name", help="a VAE from the models folder's vae/ for this job")
    seeds = g.add_argument_group("variations")
    seeds.add_argument("--subseed", type=int, help="variation seed (-1: random)")
    seeds.add_argument("--subseed-strength", type=float, help="variation strength in [0, 1]")
    seeds.add_argument(
        "--seed-resize-from", type=_size, metavar="WxH", help="make the noise at this size"
    )
    seeds.add_argument("--tiling", action="store_true", default=None, help="seamless tiling")
    i2i = g.add_argument_group("img2img and inpainting")
    i2i.add_argument("--init", type=Path, help="init image, or a folder of them (batch)")
    i2i.add_argument("--mask", type=Path, help="inpainting mask (white = repaint), or a folder")
    i2i.add_argument("--denoising-strength", type=float, help="img2img strength (default 0.75)")
    i2i.add_argument(
        "--resize-mode", type=int, choices=range(4),
        help="; ".join(f"{i} {n}" for i, n in enumerate(RESIZE_MODES)),
    )  # fmt: skip
    i2i.add_argument("--mask-blur", type=int, help="mask blur in pixels (default 4)")
    i2i.add_argument(
        "--masked-content", type=int, choices=range(4),
        help="; ".join(f"{i} {n}" for i, n in enumerate(MASKED_CONTENT)) + " (default 1)",
    )  # fmt: skip
    i2i.add_argument(
        "--only-masked", action="store_true", default=None,
        help="inpaint area: only masked (crop, generate at full size, paste back)",
    )  # fmt: skip
    i2i.add_argument("--padding", type=int, help="masked area padding for --only-masked (32)")
    i2i.add_argument("--invert-mask", action="store_true", default=None, help="inpaint not masked")
    i2i.add_argument("--noise-multiplier", type=float, help="initial noise multiplier (1)")
    i2i.add_argument(
        "--diffedit-source", metavar="PROMPT",
        help="DiffEdit: describe the --init image; the mask is made where this and the prompt "
        "disagree (no --mask needed)",
    )  # fmt: skip
    i2i.add_argument(
        "--outpaint", type=_sides, metavar="L,R,T,B",
        help="extend the --init image by these pixels (multiples of 8) and paint the border",
    )  # fmt: skip
    md = g.add_argument_group("MultiDiffusion (panoramas, large images, region prompts)")
    md.add_argument(
        "--tiled", action="store_true", default=None,
        help="sample through overlapping windows of the model's size (for sizes beyond it)",
    )  # fmt: skip
    md.add_argument("--tile-window", type=int, help="window in pixels (default: native size)")
    md.add_argument("--tile-stride", type=int, help="stride in pixels (default: half the window)")
    md.add_argument(
        "--region", action="append", default=[], metavar="'PROMPT@x0,y0,x1,y1'",
        help="a prompt for a pixel box (repeatable; implies --tiled)",
    )  # fmt: skip
    cn = g.add_argument_group("ControlNet")
    cn.add_argument(
        "--control", action="append", default=[], metavar="'model=NAME,image=PATH,...'",
        help="a ControlNet unit (repeatable): model (in the models folder's controlnet/), image, "
        "and optionally module (canny, scribble, soft_edge, lineart, threshold, invert, "
        "segmentation; default none), weight, start, end, mode (0 Balanced, 1 My prompt is more "
        "important, 2 ControlNet is more important), resize (0-2, default 1); other keys are "
        "the preprocessor's options, e.g. low=50",
    )  # fmt: skip
    cn.add_argument(
        "--control-image", action="append", default=[], type=Path, metavar="PATH",
        help="with --from: the input image of each ControlNet unit the image was made with, in "
        "order (PNGs do not store control images)",
    )  # fmt: skip
    hr = g.add_argument_group("hires fix")
    hr.add_argument("--hires-scale", type=float, help="upscale factor of the second pass")
    hr.add_argument("--hires-resize", type=_size, metavar="WxH", help="second pass size")
    hr.add_argument("--hires-upscaler", help="Latent (default), Latent (bicubic), Lanczos, ...")
    hr.add_argument("--hires-steps", type=int, help="second pass steps (0: same as --steps)")
    hr.add_argument("--hires-denoising", type=float, help="second pass strength (default 0.7)")
    hr.add_argument("--hires-sampler", help="second pass sampler (default: the same)")
    hr.add_argument("--hires-schedule", help="second pass schedule")
    hr.add_argument("--hires-prompt", help="second pass prompt")
    hr.add_argument("--hires-negative", help="second pass negative prompt")
    hr.add_argument("--hires-cfg", type=float, help="second pass CFG scale")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="generate images: txt2img, img2img (--init), inpainting (--mask)"
    )
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --from)")
    add_model_args(gen)
    add_request_args(gen)
    gen.add_argument("--loopback", type=int, default=0, help="feed each output back N times")
    gen.add_argument(
        "--loopback-factor", type=float, default=1.0,
        help="multiply the denoising strength by this after each loop (kept in [0.1, 1])",
    )  # fmt: skip
    gen.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    gen.add_argument("--from", dest="from_image", type=Path, help="re-create from an image")


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags describe (``--from`` infotext first, flags on top); no init image."""
    from emaki.imageio import read_infotext
    from emaki.request import GenerationRequest, request_from_params

    if getattr(args, "from_image", None) is not None:
        info = read_infotext(args.from_image)
        if info is None:
            raise EmakiError(f"{args.from_image} carries no generation parameters")
        request = request_from_params(info.prompt, info.negative_prompt, info.params)
        args._from_params = info.params
        if args.prompt is not None:
            request = replace(request, prompt=args.prompt)
    elif args.prompt is None:
        raise EmakiError('no prompt given: emaki generate "a prompt" (or --from IMAGE)')
    else:
        request = GenerationRequest(prompt=args.prompt)
    overrides: dict[str, Any] = {
        f: getattr(args, flag)
        for flag, f in REQUEST_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.seed_resize_from is not None:
        overrides["seed_resize_from"] = args.seed_resize_from
    if args.tiling:
        overrides["tiling"] = True
    if args.vae_name is not None:
        overrides["vae"] = args.vae_name
    request = replace(request, **overrides)
    tiled = _tiled_from_args(args, request.tiled)
    if tiled is not None:
        request = replace(request, tiled=tiled)
    hires = _hires_from_args(args, request.hires)
    if hires is not None:
        request = replace(request, hires=hires)
    if args.control:
        request = replace(request, control=tuple(_control_unit(spec) for spec in args.control))
    elif request.control or args.control_image:
        request = replace(request, control=_control_images(request.control, args))
    if args.style:
        request = _with_styles(request, args)
    return request


def _tiled_from_args(args: argparse.Namespace, tiled: Any) -> Any:
    from emaki.request import RegionPrompt, TiledDiffusion

    regions = []
    for spec in args.region:
        prompt, sep, box = spec.rpartition("@")
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            raise EmakiError(f"--region is 'PROMPT@x0,y0,x1,y1', got {spec!r}") from None
        if not sep:
            raise EmakiError(f"--region is 'PROMPT@x0,y0,x1,y1', got {spec!r}")
        regions.append(RegionPrompt(prompt, box=(x0, y0, x1, y1)))
    if not (args.tiled or regions or args.tile_window or args.tile_stride):
        return tiled
    base = tiled or TiledDiffusion()
    return replace(
        base, window=args.tile_window or base.window, stride=args.tile_stride or base.stride,
        regions=tuple(regions) or base.regions,
    )  # fmt: skip


_CONTROL_KEYS = {
    "weight": ("weight", float),
    "start": ("guidance_start", float),
    "end": ("guidance_end", float),
    "mode": ("control_mode", int),
    "resize": ("resize_mode", int),
}


def _control_images(units: tuple[Any, ...], args: argparse.Namespace) -> tuple[Any, ...]:
    """The ControlNet units read from ``--from`` infotext, with ``--control-image`` images."""
    from emaki.imageio import read_image

    images = args.control_image
    if not units:
        raise EmakiError("--control-image gives images to the ControlNet units of --from IMAGE; "
                         "this image has none (use --control for new units)")  # fmt: skip
    if len(images) != len(units):
        described = "; ".join(
            f"{i}: model {u.model}, module {u.module}" for i, u in enumerate(units)
        )
        raise EmakiError(
            f"{args.from_image} was made with {len(units)} ControlNet unit(s) ({described}). PNGs "
            f"do not store control images: give each unit's input image with --control-image "
            f"PATH, in order (got {len(images)}), or replace the units with --control"
        )
    return tuple(replace(u, image=read_image(path)) for u, path in zip(units, images, strict=True))


def _control_unit(spec: str) -> Any:
    """A ControlNet unit from ``--control 'model=NAME,image=PATH,module=canny,weight=0.8,...'``."""
    from emaki.imageio import read_image
    from emaki.request import ControlNetUnit

    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in (part.strip() for part in spec.split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise EmakiError(f"--control takes key=value pairs separated by commas, got {item!r}")
        if key in ("model", "image", "module"):
            fields[key] = value
        elif key in _CONTROL_KEYS:
            name, kind = _CONTROL_KEYS[key]
            try:
                fields[name] = kind(value)
            except ValueError:
                raise EmakiError(f"--control {key}={value!r}: not a number") from None
        else:  # a preprocessor option: a number where it reads as one
            try:
                options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                options[key] = {"true": True, "false": False}.get(value.lower(), value)
    for needed in ("model", "image"):
        if needed not in fields:
            raise EmakiError(f"--control needs {needed}=..., got {spec!r}")
    fields["image"] = read_image(fields["image"])
    return ControlNetUnit(**fields, module_options=options)


def _hires_from_args(args: argparse.Namespace, hires: HiresFix | None) -> HiresFix | None:
    from emaki.request import HiresFix

    fields = {
        f: getattr(args, flag) for flag, f in HIRES_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.hires_resize is not None:
        fields["resize_x"], fields["resize_y"] = args.hires_resize
    if not fields:
        return hires
    return replace(hires or HiresFix(), **fields)


def init_from_args(
    args: argparse.Namespace, image: Image.Image, mask: Image.Image | None
) -> InitImage:
    """The img2img input: infotext settings (with ``--from``), then the flags."""
    from emaki.request import InitImage, init_from_params

    params = getattr(args, "_from_params", None)
    init = init_from_params(params, image, mask) if params else InitImage(image, mask=mask)
    fields = {
        f: getattr(args, flag) for flag, f in INIT_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.only_masked:
        fields["inpaint_full_res"] = True
    if args.invert_mask:
        fields["inpainting_mask_invert"] = True
    return replace(init, **fields)


def _with_styles(request: GenerationRequest, args: argparse.Namespace) -> GenerationRequest:
    """The request with the named styles applied to its prompts (A1111's style merge)."""
    from emaki.models.library import models_root
    from emaki.prompts.styles import apply_styles, load_styles

    path = args.styles_file or (args.models_dir or models_root()).parent / "styles.csv"
    styles = load_styles(path)
    missing = [name for name in args.style if name not in styles]
    if missing:
        known = ", ".join(sorted(styles)) or "none"
        raise EmakiError(f"no style {missing[0]!r} in {path} (it has: {known})")
    prompt, negative = apply_styles(
        request.prompt, request.negative_prompt, [styles[n] for n in args.style]
    )
    return replace(request, prompt=prompt, negative_prompt=negative)


def load_from_args(args: argparse.Namespace) -> Pipeline:
    """The pipeline the model flags name (the embedded default model without ``--model``)."""
    from emaki.pipelines.txt2img import load_pipeline

    if args.model is None:
        from emaki.models.default import default_model_path

        args.model = default_model_path()
    return load_pipeline(
        args.model,
        prediction_type=args.prediction_type,
        vae_path=args.vae,
        allow_pickle=args.allow_pickle,
        models=getattr(args, "models_dir", None),
    )


def save_result(result: GenerationResult, out: Path) -> list[Path]:
    """Write a job's images as PNGs with their infotext; print and return the paths."""
    from emaki.imageio import filename_stem, save_png

    paths = []
    for image, text, seed in zip(result.images, result.infotexts, result.seeds):
        path = save_png(image, out, filename_stem(seed, result.request.prompt), text)
        print(path)
        paths.append(path)
    return paths


def _init_jobs(args: argparse.Namespace) -> list[tuple[Path | None, Path | None]]:
    """(init image, mask) pairs: one, or one per image of an ``--init`` folder."""
    if args.init is None:
        if args.mask is not None:
            raise EmakiError("--mask needs --init (the image to inpaint)")
        return [(None, None)]
    if not args.init.is_dir():
        if args.mask is not None and args.mask.is_dir():
            raise EmakiError("--mask is a folder but --init is one image")
        return [(args.init, args.mask)]
    images = sorted(p for p in args.init.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise EmakiError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {args.init}")
    masks: dict[str, Path] = {}
    if args.mask is not None:
        if not args.mask.is_dir():
            masks = {p.stem: args.mask for p in images}  # one mask for every image
        else:
            masks = {p.stem: p for p in args.mask.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return [(p, masks.get(p.stem)) for p in images]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from emaki.imageio import read_image

    request = request_from_args(args)
    jobs = _init_jobs(args)
    if args.loopback < 0:
        raise EmakiError("--loopback must be 0 or more")
    if args.loopback and jobs == [(None, None)]:
        raise EmakiError("--loopback needs --init (it feeds the output back as the init image)")
    pipe = load_from_args(args)
    for init_path, mask_path in jobs:
        job = request
        if init_path is not None:
            image = read_image(init_path)
            mask = read_image(mask_path) if mask_path is not None else None
            if args.outpaint is not None:
                if mask is not None:
                    raise EmakiError("--outpaint makes its own mask; leave out --mask")
                from emaki.pipelines.outpaint import Outpaint, outpaint_request

                blur = args.mask_blur if args.mask_blur is not None else 8
                spec = Outpaint(*args.outpaint, mask_blur=blur)
                job = outpaint_request(request, image, spec)
            else:
                job = replace(request, init=init_from_args(args, image, mask))
        job = pipe.resolve(job).request  # validates and fixes the seeds before work starts
        print(f"seed: {job.seed}", file=sys.stderr)
        for _ in range(1 + args.loopback):
            steps = job.steps * job.n_iter * (2 if job.hires is not None else 1)
            bar = tqdm(total=steps, unit="step", file=sys.stderr)
            try:
                result = pipe.generate(job, progress=lambda info, n, total, b=bar: b.update(1))
            finally:
                bar.close()
            save_result(result, args.out)
            if job.init is not None:  # loopback: the first output is the next input
                job = replace(
                    job, init=replace(job.init, image=result.images[0]), seed=job.seed + 1
                )
    return 0
