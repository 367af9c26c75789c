"""What a 300-token prompt with editing and 3 LoRAs adds to a 20-step generation.

The issue's target: prompt parsing and conditioning of such a prompt (plus applying the LoRAs)
add less than 5% to a 20-step generation on the default model. Measured side by side in one run
on the same pipeline:

* ``full``: ``Pipeline.generate`` of the long prompt with three ``<lora:...>`` tags;
* ``stages``: the stages that the prompt language adds, timed on their own: resolving the
  request (comments, tags, reading the three LoRA files), the adapted model (LoRA clone; cached
  after the first request, so warm runs reuse it) and encoding every scheduled text;
* the ratio ``stages / (full - stages)``, i.e. the overhead on top of sampling and decoding.

These cases are printed:

* cold: the first request (LoRA files read and hashed, clone made, every chunk encoded);
* new prompt: a warm pipeline (files read and clone made before) whose text-encoder cache is
  emptied before each run, so every chunk is encoded again, as for a prompt never seen before;
* one phrase edited: the prompt with its last phrase replaced by one never used before, as a
  user tweaks a prompt between generations: the chunks before it come from the text encoder's
  cache, the changed ones are encoded;
* repeated prompt: the same request again, whose chunks come from the text encoder's cache
  (A1111 likewise reuses the conditioning of an unchanged prompt);
* floor: one of the prompt's scheduled texts on its own (the same 300+ tokens, no editing, no
  alternation, no LoRA tags), never seen before: the least any new prompt of that length costs,
  one text-encoder pass over its own chunks.

The prompt grows until every scheduled text (the prompt with its editing resolved, as the text
encoder sees it) has at least ``--tokens`` tokens.

With ``--model`` it times a trained model folder (e.g. ``src/emaki/default_model``); without,
the default model if it is installed, else its architecture with random weights (speed does not
depend on the weights; see default_model_speed.py).

    python benchmarks/prompt_overhead.py --runs 5
"""

from __future__ import annotations

import argparse
import dataclasses
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

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
           "white", "grey", "gold", "silver")  # fmt: skip
NOUNS = ("apple", "cat", "dog", "rocket", "heart", "star", "sun", "moon", "tree", "flower",
         "fish", "car", "house", "face", "hand", "ball", "book", "cup", "leaf", "cloud", "bird")  # fmt: skip


def phrase(i: int) -> str:
    """The i-th phrase of the long prompt: no two alike, with prompt editing (switching at 30 %
    and 60 % of the steps), alternation and emphasis spread through it, so that every chunk of
    the prompt differs from the others and between the scheduled texts."""
    colour, noun = COLOURS[i % len(COLOURS)], NOUNS[(i * 5) % len(NOUNS)]
    other = NOUNS[(i * 5 + 3) % len(NOUNS)]
    if i % 4 == 0:
        return f"[{colour} {noun}:{other}:{0.3 if i % 8 == 0 else 0.6}]"
    if i % 4 == 2:
        return f"[{noun}|{other}] in {colour}"
    return f"({colour} {noun}:1.2)" if i % 3 == 0 else f"{colour} {noun}"


LORA_TAGS = " <lora:one:0.8> <lora:two:0.5> <lora:three:te=0.3:unet=0.7>"


def long_prompt(pipe: Pipeline, tokens: int) -> int:
    """How many phrases make each scheduled text at least ``tokens`` tokens long."""
    from emaki.prompts.encode import encode_prompts

    def shortest(text: str) -> int:  # the negative prompt "" is not one of the texts counted
        encoded = encode_prompts(pipe.text, text, "", 20).tokens
        return min(t.token_count for key, t in encoded.items() if key)

    count = 8
    while shortest(", ".join(phrase(i) for i in range(count))) < tokens:
        count += 4
    return count


def prompt_of(count: int, last: int | None = None) -> str:
    """``count`` phrases with 3 LoRA tags; ``last`` replaces the final phrase by phrase(last)."""
    phrases = [phrase(i) for i in range(count)]
    if last is not None:
        phrases[-1] = phrase(last)
    return ", ".join(phrases) + LORA_TAGS


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
        count = long_prompt(pipe, args.tokens)
        prompt = prompt_of(count)
        req = GenerationRequest(prompt=prompt, steps=args.steps, seed=1, cfg_scale=5.0)
        edits = iter(range(count, 10**6))  # phrases the prompt never had

        def edited() -> GenerationRequest:
            return dataclasses.replace(req, prompt=prompt_of(count, next(edits)))

        plain = GenerationRequest(prompt="grinning face", steps=args.steps, seed=1, cfg_scale=5.0)
        r = pipe.resolve(req)
        encoded = pipe.conditioning(r, pipe.adapted(r)[1])
        texts = len(encoded.tokens)
        counts = sorted({t.token_count for t in encoded.tokens.values()})
        chunks = len({c for t in encoded.tokens.values() for c in t.ids})
        # the first scheduled text: editing and alternation resolved, emphasis kept
        floor = GenerationRequest(
            prompt=next(k for k in encoded.tokens if k), steps=args.steps, seed=1, cfg_scale=5.0
        )

        cold_stages = stage_seconds(Pipeline(bundle, models=Path(tmp)), req)
        t = time.perf_counter()
        Pipeline(bundle, models=Path(tmp)).generate(req)
        cold_full = time.perf_counter() - t

        text = pipe.adapted(pipe.resolve(req))[1]  # the LoRA clone's text encoder
        base_text = pipe.adapted(pipe.resolve(floor))[1]  # the model's own, for the floor
        pipe.generate(req)  # warm-up
        requests = {"new": lambda: req, "edit": edited, "rep": lambda: req, "floor": lambda: floor}
        cases = tuple(requests)
        emptied = {"new": text, "floor": base_text}  # whose cache each fresh case empties
        times: dict[str, list[float]] = {k: [] for c in cases for k in (c, f"{c}_stages")}
        plains = []
        for _ in range(args.runs):
            for case in cases:
                if case in emptied:
                    emptied[case].clear_cache()
                t = time.perf_counter()
                pipe.generate(requests[case]())
                times[case].append(time.perf_counter() - t)
                pipe.conditioning(pipe.resolve(req), text)  # the unedited prompt is cached
                if case in emptied:
                    emptied[case].clear_cache()
                times[f"{case}_stages"].append(stage_seconds(pipe, requests[case]()))
            t = time.perf_counter()
            pipe.generate(plain)
            plains.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    short = statistics.median(plains)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model: {model or 'default architecture, random weights'}")  # fmt: skip
    print(f"prompt: {len(prompt)} characters, {counts} tokens per scheduled text, {texts} distinct "
          f"texts, {chunks} distinct chunks, 3 LoRAs, {args.steps} steps")  # fmt: skip
    print(f"cold: prompt+LoRA stages {cold_stages:.3f} s of {cold_full:.3f} s, "
          f"overhead {cold_stages / (cold_full - cold_stages):.2%}")  # fmt: skip
    labels = {
        "new": "new prompt",
        "edit": "one phrase edited",
        "rep": "repeated prompt",
        "floor": "floor (one scheduled text alone, new, no LoRA)",
    }
    for case, label in labels.items():
        full, stage = med[case], med[f"{case}_stages"]
        print(f"{label}: generate {full:.3f} s, prompt+LoRA stages {stage:.3f} s, "
              f"overhead {stage / (full - stage):.2%}")  # fmt: skip
    print(f"plain short prompt, no LoRA: generate {short:.3f} s "
          f"(long prompt + LoRAs, new / plain = {med['new'] / short:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
