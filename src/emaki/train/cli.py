"""``emaki train RECIPE.toml``: run or resume a training recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train a model from a recipe (resumes from the recipe's output folder)",
        description=(
            "Runs a TOML recipe (see recipes/ and docs/training.md). Re-running the same command "
            "resumes from the newest checkpoint in the recipe's output folder. Ctrl-C stops after "
            "the current step and writes a checkpoint."
        ),
    )
    t.add_argument("recipe", type=Path)
    t.add_argument(
        "--max-steps", type=int, help="stop after this many steps in this call (then resume later)"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="do not train: export the newest checkpoint (with its EMA weights) as a model to DIR",
    )


def run(args: argparse.Namespace) -> int:
    from emaki.train.loop import train
    from emaki.train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.export is not None:
        from emaki.train.loop import export_checkpoint

        print(f"model: {export_checkpoint(recipe, args.export)}")
        return 0
    result = train(recipe, stop_after=args.max_steps, progress=not args.no_progress)
    if result.finished and result.model_dir is None:
        return 0  # another process of a multi-process run: the first one reports
    if result.finished:
        print(f"finished at step {result.step}; model: {result.model_dir}")
    else:
        print(
            f"stopped at step {result.step} of {recipe.train.steps}; run the same command to resume",
            file=sys.stderr,
        )
    return 0
