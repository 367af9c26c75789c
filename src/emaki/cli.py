"""The ``emaki`` command line: argument parsing at the edge, into typed requests.

Every user error (bad file, unknown sampler, bad size) is printed as one line
``emaki: error: ...`` with exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emaki import __version__
from emaki.data import cli as data_cli
from emaki.errors import EmakiError
from emaki.eval import cli as eval_cli
from emaki.models import cli as models_cli
from emaki.pipelines import cli as generate_cli
from emaki.pipelines.cli import add_model_args as _add_model_args  # noqa: F401 (used by helpers)
from emaki.plots import cli as plots_cli
from emaki.prompts import cli as prompt_cli
from emaki.server import cli as server_cli
from emaki.train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emaki", description="Offline text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"emaki {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    generate_cli.register(sub)
    data_cli.register(sub)
    train_cli.register(sub)
    eval_cli.register(sub)
    models_cli.register(sub)
    prompt_cli.register(sub)
    server_cli.register(sub)
    plots_cli.register(sub)
    return parser


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
    "generate": generate_cli.run,
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
    "serve": server_cli.run,
    "plot": plots_cli.run,
    "matrix": plots_cli.run,
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
