"""Seconds per SD-1.5-size image on this CPU, fp32 and bf16, against the FLOP floor.

An SD-1.5-architecture model with random weights (UNet 860M, CLIP ViT-L text encoder, KL VAE),
512x512, 20 steps of DPM++ 2M (Karras), CFG 7 (so 40 UNet evaluations), full VAE decode. Reports
the time of each stage, the total as a multiple of the compute floor from
shared/reference/perf.md section 2 (34.7-38.1 TFLOP per image; 384 GFLOP/s fp32 peak for two
Zen 5 cores with 2x512-bit FMA at 3 GHz, i.e. 90-99 s), and the difference between the bf16 and
fp32 outputs for the same seed.

    python benchmarks/sd15_cpu.py --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import platform
import time

from emaki.runtime import tune_allocator

# As the emaki command does: before torch's first large allocation (importing diffusers makes one).
tune_allocator()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from emaki.models.families import TinyConfigs, config_dict, get_family  # noqa: E402
from emaki.models.tiny import make_tiny_bundle  # noqa: E402
from emaki.pipelines.txt2img import Pipeline  # noqa: E402
from emaki.request import GenerationRequest  # noqa: E402

FLOOR_TFLOP = (34.7, 38.1)  # perf.md 2.1: SD1.5, 20 steps + CFG + VAE decode, 512 px
PEAK_GFLOPS = 384.0  # perf.md 2.2: 2 cores x 64 FP32 FLOP/cycle x 3.0 GHz


def sd15_pipeline() -> Pipeline:
    fam = get_family("sd1")
    configs = TinyConfigs(
        unet=config_dict(fam.unet_config),
        vae=config_dict(fam.vae_config),
        text_encoder=config_dict(fam.text_encoder_config),
    )
    return Pipeline(make_tiny_bundle("sd1", seed=0, configs=configs))


def measured_gemm_gflops(n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of a large matrix product on this machine (an empirical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def run(
    pipe: Pipeline, precision: str, size: int, steps: int
) -> tuple[float, list[float], np.ndarray]:
    step_times: list[float] = []
    last = [time.perf_counter()]

    def progress(info: object, n: int, total: int) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    req = GenerationRequest(
        prompt="a red apple on a wooden table",
        negative_prompt="blurry",
        sampler="DPM++ 2M",
        schedule="karras",
        steps=steps,
        cfg_scale=7.0,
        seed=1,
        width=size,
        height=size,
        precision=precision,  # type: ignore[arg-type]
    )
    start = time.perf_counter()
    last[0] = start
    image = pipe.generate(req, progress=progress).images[0]
    total = time.perf_counter() - start
    return total, step_times, np.asarray(image, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"measured GEMM: fp32 {measured_gemm_gflops():.0f} GFLOP/s, "
          f"bf16 {measured_gemm_gflops(dtype=torch.bfloat16):.0f} GFLOP/s")  # fmt: skip
    t0 = time.perf_counter()
    pipe = sd15_pipeline()
    print(f"built SD-1.5-size model in {time.perf_counter() - t0:.1f} s")
    outputs = {}
    for precision in args.precisions.split(","):
        total, steps, image = run(pipe, precision, args.size, args.steps)
        outputs[precision] = image
        step_median = float(np.median(steps[1:])) if len(steps) > 1 else steps[0]
        # Everything after the last step's callback is the VAE decode (and PNG conversion).
        floor_lo = FLOOR_TFLOP[0] * 1000 / PEAK_GFLOPS * (args.steps / 20) * (args.size / 512) ** 2
        floor_hi = FLOOR_TFLOP[1] * 1000 / PEAK_GFLOPS * (args.steps / 20) * (args.size / 512) ** 2
        print(
            f"{precision}: {total:.1f} s/image at {args.size}px, {args.steps} steps "
            f"(median {step_median:.2f} s per guided step, text encoding + first step "
            f"{steps[0]:.1f} s, VAE decode {total - sum(steps):.1f} s); "
            f"{total / floor_hi:.2f}-{total / floor_lo:.2f}x the FLOP floor "
            f"({floor_lo:.0f}-{floor_hi:.0f} s)"
        )
    if "fp32" in outputs and "bf16" in outputs:
        diff = np.abs(outputs["fp32"] - outputs["bf16"])
        print(
            f"bf16 vs fp32 output: mean abs pixel diff {diff.mean():.2f}/255, "
            f"max {diff.max():.0f}/255, PSNR "
            f"{10 * np.log10(255**2 / max(float((diff**2).mean()), 1e-12)):.1f} dB"
        )


if __name__ == "__main__":
    main()
