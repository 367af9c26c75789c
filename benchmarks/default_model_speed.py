"""Seconds per 20-step image of the default model's architecture, emaki vs diffusers, after loading.

The issue's target: one 20-step image from the default model in under 1 s on our 2-core CPU.
With ``--model`` it times a trained model folder (e.g. ``src/emaki/default_model``); without, it
builds the architecture of ``recipes/default-unet.toml`` and ``recipes/default-vae.toml`` with
random weights (speed does not depend on the weights) and the real frozen MiniLM. Both sides run
DPM++ 2M (Karras), CFG 5, 64x64, decode to PIL; runs alternate and the medians are printed with
their ratio.

    python benchmarks/default_model_speed.py --runs 10
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from emaki.runtime import tune_allocator

tune_allocator()

import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from emaki.models.bundle import bundle_from_networks  # noqa: E402
from emaki.models.loading import load_model  # noqa: E402
from emaki.pipelines.txt2img import Pipeline  # noqa: E402
from emaki.request import GenerationRequest  # noqa: E402
from emaki.text.minilm import load_minilm  # noqa: E402
from emaki.train.recipe import load_recipe  # noqa: E402
from emaki.train.tasks import scheduler_config, unet_from_config, vae_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "grinning face, twemoji style"


def random_default_bundle():  # type: ignore[no-untyped-def]
    unet_recipe = load_recipe(ROOT / "recipes" / "default-unet.toml")
    vae_recipe = load_recipe(ROOT / "recipes" / "default-vae.toml")
    tok, text = load_minilm()
    torch.manual_seed(0)
    vae = vae_from_config(vae_recipe.model).eval()
    factor = 2 ** (len(vae_recipe.model.block_out_channels) - 1)
    unet = unet_from_config(
        unet_recipe.model, vae.config.latent_channels, unet_recipe.data.resolution // factor, 384
    ).eval()
    return bundle_from_networks(
        "sd1", unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
        scheduler_config=scheduler_config(unet_recipe.model), name="default-architecture",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    bundle = load_model(args.model) if args.model else random_default_bundle()
    pipe = Pipeline(bundle)
    size = pipe.native_size
    ref = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(dict(bundle.scheduler_config)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    unet_params = sum(p.numel() for p in bundle.unet.parameters()) / 1e6
    vae_params = sum(p.numel() for p in bundle.vae.parameters()) / 1e6
    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}; {bundle.name}: "
          f"UNet {unet_params:.1f}M, VAE {vae_params:.1f}M params, {size}x{size}")  # fmt: skip

    def emaki_once(seed: int) -> float:
        req = GenerationRequest(prompt=PROMPT, steps=args.steps, cfg_scale=5.0, seed=seed, width=size,
                                height=size, sampler="DPM++ 2M", schedule="karras")  # fmt: skip
        t0 = time.perf_counter()
        pipe.generate(req)
        return time.perf_counter() - t0

    def diffusers_once(seed: int) -> float:
        t0 = time.perf_counter()
        ref(PROMPT, num_inference_steps=args.steps, guidance_scale=5.0, height=size, width=size,
            generator=torch.Generator().manual_seed(seed), output_type="pil")  # fmt: skip
        return time.perf_counter() - t0

    emaki_once(0), diffusers_once(0)  # warm-up
    ours, theirs = [], []
    for r in range(args.runs):
        first, second = (emaki_once, diffusers_once) if r % 2 == 0 else (diffusers_once, emaki_once)
        a, b = first(r), second(r)
        e, d = (a, b) if r % 2 == 0 else (b, a)
        ours.append(e)
        theirs.append(d)
        print(f"run {r}: emaki {e:.3f} s, diffusers {d:.3f} s, ratio {e / d:.3f}")
    me, md = statistics.median(ours), statistics.median(theirs)
    print(
        f"{args.steps} steps: emaki median {me:.3f} s/image, diffusers {md:.3f} s/image, ratio {me / md:.3f}"
    )


if __name__ == "__main__":
    main()
