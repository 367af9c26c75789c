"""``emaki eval``: score a model with an evaluator (see emaki.eval.run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from emaki.errors import EmakiError


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="measure prompt adherence and Fréchet distance with an evaluator trained on real images",
    )
    e.add_argument("--model", type=Path, required=True, help="the model to score")
    e.add_argument(
        "--evaluator", type=Path, required=True, help="an evaluator folder (classifier recipe)"
    )
    e.add_argument("--data", type=Path, help="the real images (default: the evaluator's dataset)")
    e.add_argument("--prompts", type=int, default=200, help="identity prompts (default 200)")
    e.add_argument("--steps", default="20", help="comma-separated step counts, e.g. 10,20,50")
    e.add_argument(
        "--samplers", default="DPM++ 2M", help="comma-separated samplers, e.g. 'DPM++ 2M,Euler a'"
    )
    e.add_argument("--cfg", type=float, default=5.0, help="guidance scale (default 5)")
    e.add_argument(
        "--real-images", type=int, default=2000, help="real images for the Fréchet distance"
    )
    e.add_argument("--json", type=Path, help="also write the results as JSON")
    e.add_argument("--contact-sheet", type=Path, help="also write a 64-prompt contact sheet PNG")


def run(args: argparse.Namespace) -> int:
    from emaki.eval.evaluator import Evaluator
    from emaki.eval.run import Setting, contact_sheet, evaluate, markdown_table, save_result
    from emaki.sampling.registry import get_sampler

    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        raise EmakiError(
            f"--steps {args.steps!r}: give comma-separated whole numbers, e.g. 10,20,50"
        ) from None
    if not steps or min(steps) < 1:
        raise EmakiError("--steps needs positive step counts")
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in samplers:
        get_sampler(s)  # an unknown name is a clear error before any work
    settings = [Setting(s, n) for s in samplers for n in steps]
    result = evaluate(
        args.model, args.evaluator, args.data, n_prompts=args.prompts, settings=settings,
        cfg=args.cfg, real_images=args.real_images,
    )  # fmt: skip
    print(markdown_table(result))
    if args.json:
        save_result(result, args.json)
    if args.contact_sheet:
        contact_sheet(
            args.model, Evaluator.load(args.evaluator).classes, args.contact_sheet, cfg=args.cfg
        )
        print(f"contact sheet: {args.contact_sheet}")
    return 0
