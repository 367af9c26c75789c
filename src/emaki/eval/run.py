"""``emaki eval``: prompt adherence and Fréchet distance of a model, by an evaluator trained on real images.

For a fixed prompt set (one prompt per identity, the identity's name in words, chosen with a fixed
seed from the identities the evaluator knows), the model generates one image per prompt for each
(sampler, steps) setting. The evaluator then gives:

* adherence: top-1 / top-5 accuracy of the evaluator on the generated images (the prompt's identity
  among its 1 / 5 best guesses), next to its accuracy on real images of a style it never saw;
* Fréchet distance between the evaluator's features of the generated images and of real images
  (next to the distance between two halves of the real images, the floor for this feature set
  and sample size);
* the autoencoder's ceiling: the evaluator on held-out real images encoded and decoded by the
  model's autoencoder, next to the same images as drawn;
* paraphrase adherence: the same on prompts that describe identities in other words, split into
  those whose content words never occur in the training captions and the rest.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from emaki.data.captions import name_words
from emaki.data.manifest import read_manifest
from emaki.eval.evaluator import Evaluator, frechet_distance, load_real_images
from emaki.eval.prompts import caption_vocabulary, paraphrases, unseen


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int


def identity_prompts(classes: list[str], n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` (prompt, [identity]) pairs, identities drawn without replacement with a fixed seed."""
    pick = sorted(random.Random(seed).sample(classes, min(n, len(classes))))
    return [(name_words(c), [c]) for c in pick]


def generate_all(
    pipe: Any, prompts: list[str], setting: Setting, size: int, cfg: float, batch: int = 16
) -> tuple[list[Image.Image], float]:
    """One image per prompt (prompt ``i`` with seed ``i``), ``batch`` prompts per model call."""
    from emaki.request import GenerationRequest

    t0 = time.perf_counter()
    req = GenerationRequest(
        prompt="", sampler=setting.sampler, steps=setting.steps, cfg_scale=cfg, seed=0,
        width=size, height=size, batch_size=batch,
    )  # fmt: skip
    images = pipe.generate_prompts(req, prompts).images
    return images, (time.perf_counter() - t0) / max(1, len(prompts))


def evaluate(
    model: Path,
    evaluator_dir: Path,
    data: Path | None = None,
    *,
    n_prompts: int = 200,
    settings: list[Setting] | None = None,
    cfg: float = 5.0,
    real_images: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    from emaki.pipelines.txt2img import load_pipeline

    ev = Evaluator.load(evaluator_dir)
    data = Path(data or ev.config["dataset"])
    records = read_manifest(data)
    settings = settings or [Setting("DPM++ 2M", 20)]
    pipe = load_pipeline(model)
    size = pipe.native_size
    prompts = identity_prompts(ev.classes, n_prompts)
    vocab = caption_vocabulary([r.caption for r in records])
    para = [p for p in paraphrases() if any(t in ev.index for t in p["targets"])]
    unseen_idx = [k for k, p in enumerate(para) if unseen(p["prompt"], vocab)]

    rng = random.Random(1)
    real = [r for r in records if r.name in ev.index]
    real = rng.sample(real, min(real_images, len(real)))
    real_feats = ev.features(load_real_images(data, real))
    half = len(real_feats) // 2
    ceiling = autoencoder_reference(pipe, ev, data, records, size)
    out: dict[str, Any] = {
        "model": str(model),
        "evaluator": str(evaluator_dir),
        "prompts": len(prompts),
        "cfg": cfg,
        "size": size,
        "real_reference": {
            "evaluator_holdout_style": ev.config["scores"].get("holdout_style"),
            "evaluator_holdout_top1": ev.config["scores"].get("holdout_top1"),
            "evaluator_holdout_top5": ev.config["scores"].get("holdout_top5"),
            "fd_real_half_vs_half": frechet_distance(real_feats[:half], real_feats[half:]),
            "real_images": len(real_feats),
            **ceiling,
        },
        "paraphrases": {"all": len(para), "unseen_words": len(unseen_idx)},
        "results": [],
    }
    for s in settings:
        images, per_image = generate_all(pipe, [p for p, _ in prompts], s, size, cfg)
        top1, top5 = ev.accuracy(images, [t for _, t in prompts])
        fd = frechet_distance(ev.features(images), real_feats)
        row: dict[str, Any] = {
            "sampler": s.sampler, "steps": s.steps, "top1": top1, "top5": top5, "fd": fd,
            "seconds_per_image": per_image,
        }  # fmt: skip
        if para:
            # One image per paraphrase; the unseen-word set is scored on its share of them.
            imgs, _ = generate_all(pipe, [p["prompt"] for p in para], s, size, cfg)
            for key, idx in (("paraphrase", range(len(para))), ("paraphrase_unseen", unseen_idx)):
                if idx:
                    p1, p5 = ev.accuracy([imgs[k] for k in idx], [para[k]["targets"] for k in idx])
                    row[f"{key}_top1"], row[f"{key}_top5"] = p1, p5
        out["results"].append(row)
        if progress:
            print(format_row(row), flush=True)
    return out


def autoencoder_reference(
    pipe: Any, ev: Evaluator, data: Path, records: list[Any], size: int, n: int = 500
) -> dict[str, Any]:
    """The evaluator on held-out real images before and after the model's autoencoder.

    Up to ``n`` images of the evaluator's held-out style, at the model's size, scored as they are
    and after encoding and decoding (posterior mean): what the autoencoder alone costs, i.e. the
    adherence a perfect denoiser could reach through it.
    """
    from emaki.latents import decode, encode, from_pil, to_pil

    style = ev.config["scores"].get("holdout_style")
    held = [r for r in records if r.style == style and r.name in ev.index]
    if not held:
        return {}
    held = random.Random(2).sample(held, min(n, len(held)))
    images = [
        im.resize((size, size), Image.Resampling.LANCZOS) for im in load_real_images(data, held)
    ]
    vae, fmt = pipe.bundle.vae, pipe.latent_format
    rebuilt: list[Image.Image] = []
    with torch.inference_mode():
        for k in range(0, len(images), 32):
            x = torch.cat([from_pil(im) for im in images[k : k + 32]])
            rebuilt += to_pil(decode(vae, encode(vae, x, fmt, mean=True), fmt))
    targets = [[r.name] for r in held]
    top1, top5 = ev.accuracy(images, targets)
    ae1, ae5 = ev.accuracy(rebuilt, targets)
    return {
        "autoencoder_images": len(held),
        "holdout_sample_top1": top1,
        "holdout_sample_top5": top5,
        "autoencoder_top1": ae1,
        "autoencoder_top5": ae5,
    }


def format_row(row: dict[str, Any]) -> str:
    extra = ""
    if "paraphrase_top5" in row:
        extra += f", paraphrase top-5 {row['paraphrase_top5']:.3f}"
    if "paraphrase_unseen_top5" in row:
        extra += f", unseen-word paraphrase top-5 {row['paraphrase_unseen_top5']:.3f}"
    return (
        f"{row['sampler']}, {row['steps']} steps: top-1 {row['top1']:.3f}, top-5 {row['top5']:.3f}, "
        f"FD {row['fd']:.2f}{extra} ({row['seconds_per_image']:.2f} s/image)"
    )


def markdown_table(result: dict[str, Any]) -> str:
    ref = result["real_reference"]
    lines = [
        f"Evaluator on real images of a held-out style ({ref['evaluator_holdout_style']}): "
        f"top-1 {ref['evaluator_holdout_top1']:.3f}, top-5 {ref['evaluator_holdout_top5']:.3f}. "
        f"FD between two halves of {ref['real_images']} real images: {ref['fd_real_half_vs_half']:.2f}.",
    ]
    if "autoencoder_top5" in ref:
        lines[0] += (
            f" Through the model's autoencoder, {ref['autoencoder_images']} of those held-out "
            f"images score top-1 {ref['autoencoder_top1']:.3f}, top-5 {ref['autoencoder_top5']:.3f} "
            f"(as drawn: {ref['holdout_sample_top1']:.3f}, {ref['holdout_sample_top5']:.3f}): "
            "the most a denoiser can reach through this autoencoder."
        )
    lines += [
        "",
        "| sampler | steps | top-1 | top-5 | FD | paraphrase top-5 | unseen-word paraphrase top-5 | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['fd']:.2f} | "
            f"{r.get('paraphrase_top5', float('nan')):.3f} | {r.get('paraphrase_unseen_top5', float('nan')):.3f} | "
            f"{r['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def save_result(result: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


STYLES = (
    "twemoji style", "noto emoji style", "fluent flat style", "fluent 3d style",
    "emojione style", "firefox emoji style", "old noto emoji style", "streamline style",
)  # fmt: skip


def contact_sheet(model: Path, classes: list[str], path: Path, *, n: int = 64, steps: int = 20,
                  sampler: str = "DPM++ 2M", cfg: float = 5.0) -> list[str]:  # fmt: skip
    """A labelled grid of ``n`` prompts (identities in rotating styles), one seed each; returns the prompts."""
    from emaki.pipelines.txt2img import load_pipeline
    from emaki.train.report import save_grid

    pipe = load_pipeline(model)
    prompts = [
        f"{p}, {STYLES[i % len(STYLES)]}"
        for i, (p, _) in enumerate(identity_prompts(classes, n, seed=2))
    ]
    images, _ = generate_all(pipe, prompts, Setting(sampler, steps), pipe.native_size, cfg)
    save_grid(
        [im.resize((96, 96), Image.Resampling.NEAREST) for im in images], prompts, path, cols=8
    )
    return prompts
