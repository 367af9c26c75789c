"""txt2img speed: emaki vs diffusers' StableDiffusionPipeline on the same weights and work.

Both sides get the same randomly initialised model (shared module objects, so the weights are the
same tensors), prompt, negative prompt, sampler (DPM++ 2M, Karras sigmas), steps, CFG scale, seed
and size, and both decode to a PIL image. Runs alternate (emaki first on even runs, diffusers
first on odd runs) so that drift in machine speed affects both; the script prints each pair and
the median ratio emaki/diffusers.

    python benchmarks/txt2img_vs_diffusers.py --model tiny --size 64 --runs 7
    python benchmarks/txt2img_vs_diffusers.py --model sd15 --size 256 --runs 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from emaki.models.families import TinyConfigs, config_dict, get_family
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest

PROMPT = "a red apple on a wooden table, detailed, soft light"
NEGATIVE = "blurry, lowres"


def build(model: str) -> tuple[Pipeline, StableDiffusionPipeline]:
    if model == "tiny":
        bundle = make_tiny_bundle("sd1", seed=0)
    else:
        fam = get_family("sd1")
        configs = TinyConfigs(
            unet=config_dict(fam.unet_config),
            vae=config_dict(fam.vae_config),
            text_encoder=config_dict(fam.text_encoder_config),
        )
        bundle = make_tiny_bundle("sd1", seed=0, configs=configs)
    scheduler = DPMSolverMultistepScheduler.from_config(
        dict(bundle.scheduler_config),
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    ref = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return Pipeline(bundle), ref


def time_emaki(pipe: Pipeline, size: int, steps: int, seed: int) -> float:
    req = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler="DPM++ 2M",
        schedule="karras",
        steps=steps,
        cfg_scale=7.0,
        seed=seed,
        width=size,
        height=size,
    )
    start = time.perf_counter()
    pipe.generate(req)
    return time.perf_counter() - start


def time_diffusers(ref: StableDiffusionPipeline, size: int, steps: int, seed: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.0,
            width=size,
            height=size,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    pipe, ref = build(args.model)
    time_emaki(pipe, args.size, 2, 0)  # warm-up both (allocator, oneDNN kernels)
    time_diffusers(ref, args.size, 2, 0)
    ratios = []
    for run in range(args.runs):
        order = ["emaki", "diffusers"] if run % 2 == 0 else ["diffusers", "emaki"]
        times: dict[str, float] = {}
        for side in order:
            if side == "emaki":
                times[side] = time_emaki(pipe, args.size, args.steps, seed=run)
            else:
                times[side] = time_diffusers(ref, args.size, args.steps, seed=run)
        ratio = times["emaki"] / times["diffusers"]
        ratios.append(ratio)
        print(
            f"run {run}: emaki {times['emaki']:.3f} s, diffusers {times['diffusers']:.3f} s, "
            f"ratio {ratio:.3f}"
        )
    print(
        f"{args.model} {args.size}px {args.steps} steps DPM++ 2M Karras CFG 7: "
        f"median ratio emaki/diffusers = {statistics.median(ratios):.3f} over {args.runs} runs"
    )


if __name__ == "__main__":
    main()
