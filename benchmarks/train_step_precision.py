"""Seconds per training step of the default denoiser, fp32 against bf16 autocast, side by side.

The default model trains on 2 CPU cores, so a faster step is more training per session. This
times what dominates one step of ``recipes/default-unet-*.toml``: the UNet's forward pass on a
batch of noisy latents (32 x 4 x 16 x 16, MiniLM contexts of 32 x 384: the default model's
tokenizer takes 32 tokens, one 30-token chunk with its start and end), the MSE loss, the
backward pass and an AdamW update, in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``
(what ``[train] mixed_precision = "bf16"`` turns on through accelerate). The two modes
alternate over the same batches on two copies of the same weights; the medians and their ratio
are printed, with the two modes' losses on the first batch (they should agree to about 1e-2).

    python benchmarks/train_step_precision.py --steps 12
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from emaki.models.default import default_model_path
from emaki.train.recipe import load_recipe
from emaki.train.tasks import unet_from_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=None,
                    help="context tokens (default: the shipped default model's tokenizer length)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(ROOT / "recipes" / "default-unet.toml")
    torch.manual_seed(0)
    side = recipe.data.resolution // 4  # the default VAE downsamples 4x
    base = unet_from_config(recipe.model, 4, side, 384).train()
    nets = {"fp32": base, "bf16": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(n.parameters(), lr=1e-4) for k, n in nets.items()}
    g = torch.Generator().manual_seed(1)
    if (tokens := args.context) is None:
        config = default_model_path() / "tokenizer" / "tokenizer_config.json"
        tokens = int(json.loads(config.read_text())["model_max_length"])

    def batch() -> tuple[torch.Tensor, ...]:
        x = torch.randn(args.batch, 4, side, side, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        ctx = torch.randn(args.batch, tokens, 384, generator=g)
        eps = torch.randn(args.batch, 4, side, side, generator=g)
        return x, t, ctx, eps

    def step(mode: str, data: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        x, t, ctx, eps = data
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            pred = nets[mode](x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        loss.backward()
        opts[mode].step()
        opts[mode].zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss.detach())

    first = batch()
    losses = {m: step(m, first)[1] for m in nets}  # also the warm-up
    times: dict[str, list[float]] = {m: [] for m in nets}
    for _ in range(args.steps):
        data = batch()
        for mode in nets:
            times[mode].append(step(mode, data)[0])
    med = {m: statistics.median(v) for m, v in times.items()}
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; UNet {params:.1f}M parameters, batch {args.batch} "
          f"of {side}x{side} latents, {tokens}-token contexts; {args.steps} timed steps per mode")  # fmt: skip
    for mode in nets:
        print(f"{mode}: {med[mode]:.3f} s/step (median), first-batch loss {losses[mode]:.5f}")
    print(f"bf16 / fp32 time: {med['bf16'] / med['fp32']:.3f} (below 1: bf16 is faster)")


if __name__ == "__main__":
    main()
