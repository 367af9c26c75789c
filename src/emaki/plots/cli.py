"""``emaki plot`` (X/Y/Z plot) and ``emaki matrix`` (prompt matrix)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from emaki.pipelines.cli import DEFAULT_OUT, add_model_args, add_request_args

    plot = sub.add_parser(
        "plot",
        help="X/Y/Z plot: a labelled grid over up to three parameters",
        description=(
            "Each axis is 'TYPE: VALUES', e.g. --x 'Steps: 10-30 (+10)' --y 'Sampler: Euler a, "
            "DPM++ 2M'. Ranges: 1-5, 1-5 (+2), 10-5 (-3), 1-10 [5], 0.0-1.0 [6]. Types: Seed, "
            "Var. seed, Var. strength, Steps, CFG Scale, Sampler, Schedule type, Clip skip, Eta, "
            "Denoising, CFG rescale, Emphasis, VAE, Initial noise multiplier, Hires steps, Hires "
            "sampler, Hires upscaler, Prompt S/R, Prompt order, Checkpoint name, Nothing."
        ),
    )
    plot.add_argument("prompt")
    plot.add_argument("--x", required=True, metavar="'TYPE: VALUES'", help="columns")
    plot.add_argument("--y", metavar="'TYPE: VALUES'", help="rows")
    plot.add_argument("--z", metavar="'TYPE: VALUES'", help="one grid per value")
    matrix = sub.add_parser("matrix", help="prompt matrix: every combination of 'base|a|b'")
    matrix.add_argument("prompt")
    matrix.add_argument(
        "--in-negative", action="store_true", help="the matrix is in the negative prompt"
    )
    for p in (plot, matrix):
        add_model_args(p)
        add_request_args(p)
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
        p.add_argument("--save-cells", action="store_true", help="also save every cell's image")


def _generator(args: argparse.Namespace) -> Any:
    """generate(request, model) over the --model pipeline; Checkpoint-name values load others."""
    from emaki.pipelines.cli import load_from_args
    from emaki.pipelines.txt2img import load_pipeline

    pipes: dict[str | None, Any] = {None: load_from_args(args)}

    def generate(request: Any, model: str | None) -> Any:
        if model not in pipes:
            for other in [k for k in pipes if k is not None]:
                del pipes[other]  # keep the base model and one other loaded
            pipes[model] = load_pipeline(model, allow_pickle=args.allow_pickle)
        return pipes[model].generate(request)

    return generate


def run(args: argparse.Namespace) -> int:
    from emaki.imageio import filename_stem, save_png
    from emaki.pipelines.cli import request_from_args
    from emaki.plots.axes import parse_axis
    from emaki.plots.matrix import run_prompt_matrix
    from emaki.plots.xyz import run_xyz

    args.from_image = None
    request = request_from_args(args)
    generate = _generator(args)
    stem = filename_stem(request.seed, request.prompt)
    if args.command == "plot":
        axes = [parse_axis(s) if s else None for s in (args.x, args.y, args.z)]
        result = run_xyz(generate, request, axes[0], axes[1], axes[2])  # type: ignore[arg-type]
        print(save_png(result.sheet, args.out, f"grid-{stem}", result.infotext))
        cells = [(c.image, c.infotext) for c in result.cells]
    else:
        matrix = run_prompt_matrix(generate, request, in_negative=args.in_negative)
        print(save_png(matrix.grid, args.out, f"matrix-{stem}", matrix.infotext))
        cells = list(zip(matrix.images, [matrix.infotext] * len(matrix.images)))
    if args.save_cells:
        for image, text in cells:
            print(save_png(image, args.out, stem, text))
    return 0
