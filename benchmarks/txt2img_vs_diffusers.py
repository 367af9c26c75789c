"""txt2img speed: emaki vs diffusers' StableDiffusionPipeline on the same weights and work.

Both sides get the same randomly initialised model (built from the same seed, so the weights are
identical), prompt, negative prompt, sampler (DPM++ 2M, Karras sigmas), steps, CFG scale, seed
and size, and both decode to a PIL image.

By default each side runs in its own long-lived worker process, as a user runs it: the emaki
worker applies emaki's runtime settings (``emaki.runtime.tune_allocator``, as ``load_pipeline``
does), the diffusers worker runs plain. Each worker builds the model and warms up with a 2-step
generation; then the parent asks them for one generation at a time, alternating (emaki first on
even runs, diffusers first on odd runs), so that drift in machine speed affects both sides alike.
``--same-process`` instead runs both in one process without emaki's runtime settings, comparing
only the code paths.

    python benchmarks/txt2img_vs_diffusers.py --model tiny --size 64 --runs 15 --repeat 5
    python benchmarks/txt2img_vs_diffusers.py --model sd15 --size 256 --runs 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

# torch, diffusers and emaki's pipeline are imported inside functions: the emaki worker must
# apply emaki.runtime.tune_allocator before they are imported, as the emaki command does.
if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from emaki.pipelines.txt2img import Pipeline

PROMPT = "a red apple on a wooden table, detailed, soft light"
NEGATIVE = "blurry, lowres"


def build(model: str) -> tuple[Pipeline, StableDiffusionPipeline]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from emaki.models.families import TinyConfigs, config_dict, get_family
    from emaki.models.tiny import make_tiny_bundle
    from emaki.pipelines.txt2img import Pipeline

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
    from emaki.request import GenerationRequest

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
    import torch

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


def worker(args: argparse.Namespace) -> None:
    """One side in its own process: build, warm up, then time one generation per stdin line."""
    if args.side == "emaki":
        from emaki.runtime import tune_allocator

        tune_allocator()
    pipe, ref = build(args.model)

    def run(steps: int, seed: int) -> float:
        if args.side == "emaki":
            return time_emaki(pipe, args.size, steps, seed)
        return time_diffusers(ref, args.size, steps, seed)

    run(2, 0)
    print("READY", flush=True)
    for line in sys.stdin:
        times = [run(args.steps, int(line)) for _ in range(args.repeat)]
        print(f"TIME {statistics.median(times):.6f}", flush=True)


class Worker:
    """A worker process of one side, driven line by line."""

    def __init__(self, args: argparse.Namespace, side: str) -> None:
        cmd = [sys.executable, __file__, "--side", side, "--model", args.model]
        cmd += ["--size", str(args.size), "--steps", str(args.steps), "--repeat", str(args.repeat)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._expect("READY")

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise RuntimeError(f"worker exited before {word}")

    def time(self, seed: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return float(self._expect("TIME").split()[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--same-process", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="generations per worker request (median taken)"
    )
    parser.add_argument("--side", choices=["emaki", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        worker(args)
        return
    import torch

    mode = "same process" if args.same_process else "separate processes"
    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}, {mode}")
    if args.same_process:
        pipe, ref = build(args.model)
        time_emaki(pipe, args.size, 2, 0)  # warm-up both (allocator, oneDNN kernels)
        time_diffusers(ref, args.size, 2, 0)
    else:
        workers = {side: Worker(args, side) for side in ("emaki", "diffusers")}
    ratios = []
    for run in range(args.runs):
        order = ["emaki", "diffusers"] if run % 2 == 0 else ["diffusers", "emaki"]
        times: dict[str, float] = {}
        for side in order:
            if not args.same_process:
                # Let the other worker's OpenMP threads stop spinning before this one starts.
                time.sleep(0.5)
                times[side] = workers[side].time(seed=run)
            elif side == "emaki":
                times[side] = time_emaki(pipe, args.size, args.steps, seed=run)
            else:
                times[side] = time_diffusers(ref, args.size, args.steps, seed=run)
        ratio = times["emaki"] / times["diffusers"]
        ratios.append(ratio)
        print(
            f"run {run}: emaki {times['emaki']:.3f} s, diffusers {times['diffusers']:.3f} s, "
            f"ratio {ratio:.3f}",
            flush=True,
        )
    if not args.same_process:
        for w in workers.values():
            w.close()
    print(
        f"{args.model} {args.size}px {args.steps} steps DPM++ 2M Karras CFG 7 ({mode}): "
        f"median ratio emaki/diffusers = {statistics.median(ratios):.3f} over {args.runs} runs"
    )


if __name__ == "__main__":
    main()
