"""Render the images of docs/generation.md: each generation feature at work on a model.

One PNG per feature under ``--out`` (default docs/images/generation/), each a labelled strip of
cells: the input (where there is one) and what the feature makes of it, same seed throughout.

    .venv/bin/python tools/feature_gallery.py
    .venv/bin/python tools/feature_gallery.py --model /tmp/tiny-sd1 --out /tmp/gallery --steps 4
    .venv/bin/python tools/feature_gallery.py --only controlnet \
        --controlnet runs/default-controlnet-canny-2/model

The ``controlnet`` strip needs ``--controlnet`` (a ControlNet folder for the model; the
default model's is trained by ``recipes/default-controlnet-canny.toml``, continued by
``recipes/default-controlnet-canny-2.toml``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from emaki.request import GenerationRequest, HiresFix, InitImage

Cell = tuple[Image.Image, str]


def _mask_box(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def txt2img_and_img2img(pipe: Any, base: GenerationRequest) -> list[Cell]:
    source = pipe.generate(base).images[0]
    cells = [(source, base.prompt)]
    for strength in (0.4, 0.6, 0.8):
        req = replace(
            base, prompt="green apple, twemoji style", denoising_strength=strength,
            init=InitImage(source),
        )  # fmt: skip
        cells.append((pipe.generate(req).images[0], f"img2img 'green apple' s={strength}"))
    return cells


def inpainting(pipe: Any, base: GenerationRequest) -> list[Cell]:
    source = pipe.generate(replace(base, prompt="grinning face, twemoji style")).images[0]
    mask = _mask_box(source.size, (16, 36, 48, 56))
    cells = [(source, "input"), (mask.convert("RGB"), "mask (mouth)")]
    for fill, name in ((1, "original"), (2, "latent noise")):
        req = replace(
            base, prompt="face with open mouth, twemoji style", denoising_strength=0.9,
            init=InitImage(source, mask=mask, mask_blur=2, inpainting_fill=fill),
        )  # fmt: skip
        cells.append((pipe.generate(req).images[0], f"inpaint, {name}"))
    only = InitImage(source, mask=mask, mask_blur=2, inpaint_full_res=True,
                     inpaint_full_res_padding=8)  # fmt: skip
    req = replace(base, prompt="face with open mouth, twemoji style", denoising_strength=0.9,
                  init=only)  # fmt: skip
    cells.append((pipe.generate(req).images[0], "only masked, pad 8"))
    return cells


def outpainting(pipe: Any, base: GenerationRequest) -> list[Cell]:
    from emaki.pipelines.outpaint import Outpaint, outpaint_request

    source = pipe.generate(replace(base, prompt="rocket, twemoji style")).images[0]
    cells = [(source, "input 64x64")]
    for spec, name in (
        (Outpaint(right=32), "right +32"),
        (Outpaint(left=32, right=32), "both +32"),
    ):
        req = outpaint_request(replace(base, denoising_strength=1.0), source, spec)
        cells.append((pipe.generate(req).images[0], f"outpaint {name}"))
    return cells


def hires_fix(pipe: Any, base: GenerationRequest) -> list[Cell]:
    plain = pipe.generate(base).images[0]
    cells = [(plain, "64x64, one pass")]
    for upscaler in ("Latent", "Lanczos"):
        hr = HiresFix(scale=2.0, upscaler=upscaler, denoising_strength=0.55)
        cells.append((pipe.generate(replace(base, hires=hr)).images[0], f"hires x2, {upscaler}"))
    return cells


def variations(pipe: Any, base: GenerationRequest) -> list[Cell]:
    cells = []
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        req = replace(base, prompt="cat face, twemoji style", subseed=99, subseed_strength=strength)
        cells.append((pipe.generate(req).images[0], f"variation {strength}"))
    return cells


def tiling(pipe: Any, base: GenerationRequest) -> list[Cell]:
    req = replace(base, prompt="red heart, twemoji style", tiling=True)
    tile = pipe.generate(req).images[0]
    plain = pipe.generate(replace(req, tiling=False)).images[0]

    def repeat(im: Image.Image) -> Image.Image:
        out = Image.new("RGB", (im.width * 2, im.height * 2))
        for x in (0, im.width):
            for y in (0, im.height):
                out.paste(im, (x, y))
        return out

    return [(repeat(plain), "2x2 of a plain image"), (repeat(tile), "2x2 of a tiling image")]


def xyz_plot(pipe: Any, base: GenerationRequest) -> list[Cell]:
    from emaki.plots.axes import parse_axis
    from emaki.plots.xyz import run_xyz

    result = run_xyz(
        lambda r, m: pipe.generate(r), base, parse_axis("CFG Scale: 1, 3, 7"),
        parse_axis("Sampler: Euler a, DPM++ 2M"),
    )  # fmt: skip
    return [(result.sheet, "emaki plot --x 'CFG Scale: 1, 3, 7' --y 'Sampler: Euler a, DPM++ 2M'")]


def prompt_matrix(pipe: Any, base: GenerationRequest) -> list[Cell]:
    from emaki.plots.matrix import run_prompt_matrix

    req = replace(base, prompt="cat face|twemoji style|red")
    result = run_prompt_matrix(lambda r, m: pipe.generate(r), req)
    return [(result.grid, "emaki matrix 'cat face|twemoji style|red'")]


def _changed(a: Image.Image, b: Image.Image) -> Image.Image:
    """Where two images differ: the per-pixel difference, amplified, dark = changed."""
    import numpy as np

    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2)
    return Image.fromarray((255 - np.clip(d * 4, 0, 255)).astype(np.uint8)).convert("RGB")


def diffedit(pipe: Any, base: GenerationRequest) -> list[Cell]:
    """DiffEdit makes its own mask from two prompts; the change is kept to where they differ."""
    source = pipe.generate(base).images[0]
    cells = [(source, base.prompt.split(",")[0])]
    for prompt in ("red heart, twemoji style", "red star, twemoji style"):
        init = InitImage(source, diffedit_source=base.prompt, inpainting_fill=2, mask_blur=1)
        req = replace(base, prompt=prompt, denoising_strength=1.0, init=init)
        out = pipe.generate(req).images[0]
        cells += [
            (out, f"DiffEdit -> '{prompt.split(',')[0]}'"),
            (_changed(source, out), "changed"),
        ]
    return cells


def sag(pipe: Any, base: GenerationRequest) -> list[Cell]:
    req = replace(base, prompt="cat face, twemoji style")
    return [
        (pipe.generate(replace(req, sag_scale=scale)).images[0], f"SAG scale {scale}")
        for scale in (0.0, 0.75, 1.5)
    ]


def panorama(pipe: Any, base: GenerationRequest) -> list[Cell]:
    from emaki.request import RegionPrompt, TiledDiffusion

    wide = replace(base, width=256, height=64, tiled=TiledDiffusion())
    sky = TiledDiffusion(regions=(RegionPrompt("blue square, twemoji style", box=(0, 0, 64, 32)),))
    return [
        (pipe.generate(wide).images[0], "256x64, --tiled"),
        (pipe.generate(replace(wide, tiled=sky)).images[0], "with a region prompt top left"),
    ]


def _drawing(kind: str, size: int = 64) -> Image.Image:
    """A flat drawing of filled shapes on white, as emoji are drawn: an input no model made."""
    from PIL import ImageDraw

    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    m, grey = size // 8, (190, 190, 190)
    if kind == "circle":
        draw.ellipse([m, m + 4, size - m, size - m + 4], fill=grey)
        draw.rectangle([size // 2 - 2, m - 4, size // 2 + 2, m + 6], fill="black")  # a stalk
    else:  # a square face
        draw.rounded_rectangle([m, m, size - m, size - m], radius=6, fill=grey)
        for x in (size // 3, 2 * size // 3):
            draw.ellipse([x - 4, size // 3, x + 4, size // 3 + 10], fill="black")
        draw.chord([size // 4, size // 3, 3 * size // 4, 3 * size // 4 + 2], 0, 180, fill="black")
    return im


def controlnet(pipe: Any, base: GenerationRequest) -> list[Cell]:
    """Canny edges of a drawing guide the model (the ControlNet named ``canny`` in the models
    folder), next to the same prompt and seed without it."""
    from emaki.control.preprocess import canny
    from emaki.request import ControlNetUnit

    cells: list[Cell] = []
    for kind, prompt in (("circle", "red apple, twemoji style"),
                         ("square", "grinning face, fluent flat style")):  # fmt: skip
        drawing = _drawing(kind)
        req = replace(base, prompt=prompt)
        unit = ControlNetUnit(model="canny", image=drawing, module="canny", resize_mode=0)
        cells += [
            (drawing, "input"),
            (canny(drawing), "canny"),
            (pipe.generate(req).images[0], f"'{prompt.split(',')[0]}'"),
            (pipe.generate(replace(req, control=(unit,))).images[0], "with ControlNet"),
        ]
    return cells


FEATURES: dict[str, Callable[[Any, GenerationRequest], list[Cell]]] = {
    "img2img": txt2img_and_img2img,
    "inpainting": inpainting,
    "outpainting": outpainting,
    "hires-fix": hires_fix,
    "variations": variations,
    "tiling": tiling,
    "xyz-plot": xyz_plot,
    "prompt-matrix": prompt_matrix,
    "panorama": panorama,
    "diffedit": diffedit,
    "sag": sag,
    "controlnet": controlnet,
}


def strip(cells: list[Cell], height: int) -> Image.Image:
    """Cells scaled to one height (nearest neighbour: pixels stay visible), labels below."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    scaled = [
        im.resize((im.width * height // im.height, height), Image.Resampling.NEAREST)
        for im, _ in cells
    ]
    width = sum(max(im.width, 8 * len(label)) for im, (_, label) in zip(scaled, cells)) + 8 * len(
        cells
    )
    out = Image.new("RGB", (width, height + 22), "white")
    draw = ImageDraw.Draw(out)
    x = 4
    for im, (_, label) in zip(scaled, cells):
        out.paste(im, (x, 0))
        draw.text((x, height + 4), label, fill="black", font=font)
        x += max(im.width, 8 * len(label)) + 8
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model (default: emaki's default model)")
    ap.add_argument("--out", type=Path, default=Path("docs/images/generation"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=sorted(FEATURES), help="render only these")
    ap.add_argument("--controlnet", type=Path, help="a Canny ControlNet folder for the model")
    args = ap.parse_args()
    names = args.only or [n for n in FEATURES if n != "controlnet" or args.controlnet]
    if "controlnet" in names and not args.controlnet:
        raise SystemExit("the controlnet strip needs --controlnet FOLDER")

    import shutil
    import tempfile

    from emaki.models.default import default_model_path
    from emaki.pipelines.txt2img import load_pipeline

    models = Path(tempfile.mkdtemp(prefix="emaki-gallery-models-"))
    if args.controlnet:  # the models folder lists real folders only (no links)
        shutil.copytree(args.controlnet, models / "controlnet" / "canny")
    pipe = load_pipeline(args.model or default_model_path(), models=models)
    base = GenerationRequest(
        "red apple, twemoji style", steps=args.steps, seed=args.seed, cfg_scale=5.0
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            path = args.out / f"{name}.png"
            strip(FEATURES[name](pipe, base), 160).save(path)
            print(path)
    finally:
        shutil.rmtree(models)


if __name__ == "__main__":
    main()
