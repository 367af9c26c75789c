"""What a 300-token prompt with editing and 3 LoRAs adds to a 20-step generation.

The issue's target: prompt parsing and conditioning of such a prompt (plus applying the LoRAs)
add less than 5% to a 20-step generation on the default model. Measured side by side in one run
on the same pipeline:

* ``full``: ``Pipeline.generate`` of the long prompt with three ``<lora:...>`` tags;
* ``stages``: the stages that the prompt language adds, timed on their own: resolving the
  request (comments, tags, reading the three LoRA files), the adapted model (LoRA clone; cached
  after the first request, so warm runs reuse it) and encoding every scheduled text;
* the ratio ``stages / (full - stages)``, i.e. the overhead on top of sampling and decoding.

Cold numbers (first request: LoRA files read, clone made, texts encoded) and warm numbers
(repeated requests: the clone is reused, texts encoded again) are both printed.

With ``--model`` it times a trained model folder (e.g. ``src/emaki/default_model``); without,
the default model if it is installed, else its architecture with random weights (speed does not
depend on the weights; see default_model_speed.py).

    python benchmarks/prompt_overhead.py --runs 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from emaki.runtime import tune_allocator

tune_allocator()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from emaki.errors import EmakiError  # noqa: E402
from emaki.models.loading import load_model  # noqa: E402
from emaki.pipelines.txt2img import Pipeline  # noqa: E402
from emaki.request import GenerationRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_speed import random_default_bundle  # noqa: E402

WORDS = (
    "grinning face, red apple, [cat:dog:0.3] face, (sun with face:1.2), rocket, "
    "[heart|star] shape, [green:blue:8] leaf, flat style, ((bright colors)), simple shapes, "
)


def long_prompt(pipe: Pipeline, tokens: int) -> str:
    """Repeat WORDS until the prompt has at least ``tokens`` tokens, then add 3 LoRA tags."""
    text = ""
    while len(pipe.text.tokenize(text)) < tokens:
        text += WORDS
    return text + "<lora:one:0.8> <lora:two:0.5> <lora:three:te=0.3:unet=0.7>"


def write_loras(pipe: Pipeline, folder: Path, rank: int = 8) -> None:
    """Three kohya-format LoRAs on every attention projection of the UNet and text encoder."""
    (folder / "lora").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name in ("one", "two", "three"):
        tensors = {}
        for prefix, net in (("lora_unet", pipe.bundle.unet), ("lora_te", pipe.bundle.text_encoder)):
            for path, module in net.named_modules():
                leaf = path.rsplit(".", 1)[-1]
                if not isinstance(module, torch.nn.Linear):
                    continue
                if leaf not in ("to_q", "to_k", "to_v", "query", "key", "value"):
                    continue
                key = f"{prefix}_{path.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = (
                    torch.randn(rank, module.in_features, generator=gen) * 0.01
                )
                tensors[f"{key}.lora_up.weight"] = (
                    torch.randn(module.out_features, rank, generator=gen) * 0.01
                )
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(folder / "lora" / f"{name}.safetensors"))


def stage_seconds(pipe: Pipeline, req: GenerationRequest) -> float:
    t = time.perf_counter()
    r = pipe.resolve(req)
    _, text = pipe.adapted(r)
    pipe.conditioning(r, text)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=300)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = args.model
    if model is None:
        from emaki.models.default import default_model_path

        try:
            model = default_model_path()
        except EmakiError:  # not packaged yet: time the architecture
            model = None
    bundle = load_model(model) if model is not None else random_default_bundle()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(bundle, models=Path(tmp))
        write_loras(pipe, Path(tmp))
        prompt = long_prompt(pipe, args.tokens)
        req = GenerationRequest(prompt=prompt, steps=args.steps, seed=1, cfg_scale=5.0)
        plain = GenerationRequest(prompt="grinning face", steps=args.steps, seed=1, cfg_scale=5.0)
        r = pipe.resolve(req)
        encoded = pipe.conditioning(r, pipe.adapted(r)[1])
        texts = len(encoded.tokens)
        counts = sorted({t.token_count for t in encoded.tokens.values()})

        cold_stages = stage_seconds(Pipeline(bundle, models=Path(tmp)), req)
        t = time.perf_counter()
        Pipeline(bundle, models=Path(tmp)).generate(req)
        cold_full = time.perf_counter() - t

        pipe.generate(req)  # warm-up
        fulls, stages, plains = [], [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            pipe.generate(req)
            fulls.append(time.perf_counter() - t)
            stages.append(stage_seconds(pipe, req))
            t = time.perf_counter()
            pipe.generate(plain)
            plains.append(time.perf_counter() - t)
    full, stage, short = (statistics.median(v) for v in (fulls, stages, plains))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model: {model or 'default architecture, random weights'}")  # fmt: skip
    print(f"prompt: {counts} tokens per scheduled text, {texts} distinct texts, 3 LoRAs, "
          f"{args.steps} steps")  # fmt: skip
    print(f"warm: generate {full:.3f} s, prompt+LoRA stages {stage:.3f} s, "
          f"overhead {stage / (full - stage):.2%}")  # fmt: skip
    print(f"cold: prompt+LoRA stages {cold_stages:.3f} s of {cold_full:.3f} s, "
          f"overhead {cold_stages / (cold_full - cold_stages):.2%}")  # fmt: skip
    print(f"plain short prompt, no LoRA: generate {short:.3f} s "
          f"(long prompt + LoRAs / plain = {full / short:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
