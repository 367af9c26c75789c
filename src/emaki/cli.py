"""The ``emaki`` command line: argument parsing at the edge, into typed requests.

Every user error (bad file, unknown sampler, bad size) is printed as one line
``emaki: error: ...`` with exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from emaki import __version__
from emaki.data import cli as data_cli
from emaki.errors import EmakiError
from emaki.eval import cli as eval_cli
from emaki.models import cli as models_cli
from emaki.prompts import cli as prompt_cli
from emaki.train import cli as train_cli

if TYPE_CHECKING:
    from emaki.request import GenerationRequest

DEFAULT_OUT = Path("outputs")

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
    "precision": "precision",
    "emphasis": "emphasis",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emaki", description="Offline text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"emaki {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt (txt2img)")
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --from)")
    gen.add_argument("--negative", help="negative prompt")
    _add_model_args(gen)
    gen.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M', 'Euler a' (see: samplers)")
    gen.add_argument("--schedule", help="sigma schedule: automatic, karras, exponential, ...")
    gen.add_argument("--steps", type=int, help="sampling steps (default 20)")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7)")
    gen.add_argument("--seed", type=int, help="seed; -1 (default) draws a random one")
    gen.add_argument("--width", type=int, help="width in pixels, a multiple of 8")
    gen.add_argument("--height", type=int, help="height in pixels, a multiple of 8")
    gen.add_argument("--batch-size", type=int, help="images per model call (default 1)")
    gen.add_argument("--n-iter", type=int, help="number of batches (default 1)")
    gen.add_argument("--clip-skip", type=int, help="skip the last N-1 text-encoder layers")
    gen.add_argument("--eta", type=float, help="noise multiplier of ancestral/DDIM samplers")
    gen.add_argument("--cfg-rescale", type=float, help="guidance rescale phi in [0, 1]")
    gen.add_argument("--precision", choices=["fp32", "bf16"], help="compute precision")
    gen.add_argument(
        "--emphasis",
        choices=["Original", "No norm", "Ignore", "None"],
        help="how (word:1.2) weights apply (A1111's modes; default Original)",
    )
    gen.add_argument(
        "--style", action="append", default=[], help="apply a style from the styles file"
    )
    gen.add_argument(
        "--styles-file",
        type=Path,
        help="A1111-format styles.csv (default: beside the models folder)",
    )
    gen.add_argument(
        "--models-dir", type=Path, help="models folder for <lora:...>, <hypernet:...>, embeddings"
    )
    gen.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    gen.add_argument("--from", dest="from_image", type=Path, help="re-create from an image")

    info = sub.add_parser("info", help="print the generation parameters stored in an image")
    info.add_argument("image", type=Path)
    info.add_argument("--json", action="store_true", help="print as JSON")

    conv = sub.add_parser("convert", help="convert a model between formats")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    conv.add_argument("--to", required=True, choices=["diffusers", "single-file"])
    conv.add_argument("--half", action="store_true", help="store weights as fp16")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    conv.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints")
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"])

    sub.add_parser("samplers", help="list samplers and schedules")

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny model with RANDOM weights (its images are noise), to try the machinery",
    )
    tiny.add_argument("dst", type=Path)
    tiny.add_argument("--family", choices=["sd1", "sd2"], default="sd1")
    tiny.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers")
    tiny.add_argument("--seed", type=int, default=0)
    data_cli.register(sub)
    train_cli.register(sub)
    eval_cli.register(sub)
    models_cli.register(sub)
    prompt_cli.register(sub)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from emaki.imageio import filename_stem, read_infotext, save_png
    from emaki.pipelines.txt2img import load_pipeline
    from emaki.request import GenerationRequest, request_from_params

    if args.from_image is not None:
        info = read_infotext(args.from_image)
        if info is None:
            raise EmakiError(f"{args.from_image} carries no generation parameters")
        request = request_from_params(info.prompt, info.negative_prompt, info.params)
        if args.prompt is not None:
            request = replace(request, prompt=args.prompt)
    elif args.prompt is None:
        raise EmakiError('no prompt given: emaki generate "a prompt" (or --from IMAGE)')
    else:
        request = GenerationRequest(prompt=args.prompt)
    overrides = {
        f: getattr(args, flag)
        for flag, f in REQUEST_FLAGS.items()
        if getattr(args, flag) is not None
    }
    request = replace(request, **overrides)
    if args.style:
        request = _with_styles(request, args)
    if args.model is None:
        from emaki.models.default import default_model_path

        args.model = default_model_path()
    pipe = load_pipeline(
        args.model,
        prediction_type=args.prediction_type,
        vae_path=args.vae,
        allow_pickle=args.allow_pickle,
        models=args.models_dir,
    )
    request = pipe.resolve(request).request  # validates and fixes the seed before work starts
    print(f"seed: {request.seed}", file=sys.stderr)
    bar = tqdm(total=request.steps * request.n_iter, unit="step", file=sys.stderr)
    try:
        result = pipe.generate(request, progress=lambda info, n, total: bar.update(1))
    finally:
        bar.close()
    for image, text, seed in zip(result.images, result.infotexts, result.seeds):
        path = save_png(image, args.out, filename_stem(seed, request.prompt), text)
        print(path)
    return 0


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


def cmd_info(args: argparse.Namespace) -> int:
    from emaki.imageio import read_infotext

    info = read_infotext(args.image)
    if info is None:
        raise EmakiError(f"{args.image} carries no generation parameters")
    # The parser adds "Size-1"/"Size-2" beside "Size" for WxH values; show only what was stored.
    params = {
        k: v
        for k, v in info.params.items()
        if not (k[-2:] in ("-1", "-2") and k[:-2] in info.params)
    }
    if args.json:
        data = {"prompt": info.prompt, "negative_prompt": info.negative_prompt, **params}
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(f"Prompt: {info.prompt}")
        if info.negative_prompt:
            print(f"Negative prompt: {info.negative_prompt}")
        for key, value in params.items():
            print(f"{key}: {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from emaki.models.convert import convert

    dtype = torch.float16 if args.half else None
    convert(
        args.src,
        args.dst,
        to=args.to,
        overwrite=args.overwrite,
        dtype=dtype,
        allow_pickle=args.allow_pickle,
        prediction_type=args.prediction_type,
    )
    print(args.dst)
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from emaki.sampling.registry import SAMPLERS
    from emaki.sampling.schedules import SCHEDULES

    print("samplers (A1111 label / ComfyUI name / default schedule):")
    for s in SAMPLERS:
        print(f"  {s.label:14} {s.name:20} {s.default_schedule}")
    print("schedules:")
    for sch in SCHEDULES:
        print(f"  {sch.label:16} {sch.name}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from emaki.models.saving import save_diffusers, save_single_file
    from emaki.models.tiny import make_tiny_bundle

    bundle = make_tiny_bundle(args.family, seed=args.seed)
    save = save_diffusers if args.format == "diffusers" else save_single_file
    print(save(bundle, args.dst))
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "info": cmd_info,
    "convert": cmd_convert,
    "samplers": cmd_samplers,
    "make-tiny-model": cmd_make_tiny_model,
    "data": data_cli.run,
    "train": train_cli.run,
    "eval": eval_cli.run,
    "merge": models_cli.run_merge,
    "models": models_cli.run_models,
    "prompt": prompt_cli.run,
}


def main(argv: list[str] | None = None) -> int:
    from emaki.runtime import tune_allocator

    tune_allocator()  # before torch's first large allocation (importing diffusers makes one)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EmakiError as e:
        print(f"emaki: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emaki: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"emaki: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
