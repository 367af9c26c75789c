"""Render docs/images/prompt-syntax.png: the prompt language at work on a model.

Each row holds one feature, each cell one prompt with the same seed, so the cells differ only by
what the syntax does: emphasis, prompt editing, alternation and composable AND, next to the plain
prompts they are made of.

    .venv/bin/python tools/prompt_grid.py --out docs/images/prompt-syntax.png
    .venv/bin/python tools/prompt_grid.py --model /tmp/tiny-sd1 --out /tmp/grid.png --steps 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

ROWS: list[list[str]] = [
    # emphasis: the weighted word gains or loses influence
    ["red heart", "(red:1.6) heart", "(red:0.4) heart", "[[[red]]] heart"],
    # editing: the first prompt lays out the image, the second takes over after the switch step
    ["cat face", "sun with face", "[cat face:sun with face:0.3]", "[cat face:sun with face:0.6]"],
    # alternation: the two prompts take turns every step, giving a blend of both
    ["cat face", "dog face", "[cat face|dog face]", "[dog face|cat face]"],
    # composable diffusion: both parts guide at once, with their weights
    ["rocket", "red heart", "rocket AND red heart", "rocket :0.4 AND red heart :1.2"],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model (default: emaki's default model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--cell", type=int, default=128, help="cell size in pixels")
    args = ap.parse_args()

    from emaki.models.default import default_model_path
    from emaki.pipelines.txt2img import load_pipeline
    from emaki.request import GenerationRequest
    from emaki.train.report import save_grid

    pipe = load_pipeline(args.model or default_model_path())
    images: list[Image.Image] = []
    labels: list[str] = []
    for row in ROWS:
        for prompt in row:
            req = GenerationRequest(
                prompt=prompt, steps=args.steps, seed=args.seed, cfg_scale=args.cfg
            )
            image = pipe.generate(req).images[0]
            images.append(image.resize((args.cell, args.cell), Image.Resampling.NEAREST))
            labels.append(prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, labels, args.out, cols=len(ROWS[0]))
    print(args.out)


if __name__ == "__main__":
    main()
