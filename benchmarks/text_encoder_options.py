"""Ways to encode a new long prompt faster on the CPU, each against the shipped fp32 encoder.

prompt_overhead.py shows that a never-seen 300-token prompt with editing costs about 30 % on top
of a 20-step default-model image, nearly all of it the MiniLM text encoder's pass over the 70
distinct chunks of its scheduled texts. This script measures, side by side in one run on those
same chunks, what the obvious ways out would give:

* ``fp32``: the encoder as emaki runs it (the reference for time and for the states);
* ``oneDNN linear``: every ``nn.Linear`` through oneDNN's fp32 kernel instead of MKL's;
* ``bf16 autocast`` and ``bf16 weights``: the encoder in bfloat16 (fast only on a CPU with
  AVX512_BF16 or AMX; the script prints which of those the CPU reports);
* ``int8 dynamic``: ``torch.ao`` dynamic int8 quantization of the linear layers;
* ``overlapped``: the fp32 encoder in a worker thread while the main thread runs the 20 UNet
  calls of a generation, against the two one after the other.

For each it prints the median time, the ratio to fp32 and the relative error of the last hidden
states (``|h - h_fp32| / |h_fp32|``), since a faster encoder that changes the states changes
the conditioning the default model was trained on.

    python benchmarks/text_encoder_options.py --runs 5
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from emaki.runtime import tune_allocator

tune_allocator()

import torch  # noqa: E402

from emaki.models.default import default_model_path  # noqa: E402
from emaki.models.loading import load_model  # noqa: E402
from emaki.pipelines.txt2img import Pipeline  # noqa: E402
from emaki.prompts.encode import encode_prompts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_overhead import long_prompt, prompt_of  # noqa: E402


class OneDNNLinear(torch.nn.Module):
    """An ``nn.Linear`` computed by oneDNN's fp32 matmul (``mkldnn._linear_pointwise``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def with_onednn_linears(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, OneDNNLinear(child))
    return model


def cpu_flags() -> str:
    """The CPU's vector extensions that matter for these kernels, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    wanted = [f for f in flags if f.startswith(("avx", "amx"))]
    return " ".join(wanted) or "none"


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    bundle = load_model(default_model_path())
    encoder = bundle.text_encoder
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(bundle, models=Path(tmp))
        prompt = prompt_of(long_prompt(pipe, 300)).split(" <lora:")[0]
        tokens = encode_prompts(pipe.text, prompt, "", args.steps).tokens
    chunks = sorted({tuple(c) for t in tokens.values() for c in t.ids})
    ids = torch.tensor(chunks)

    def states(model: torch.nn.Module) -> torch.Tensor:
        return model(ids).last_hidden_state.float()

    reference = states(encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        int8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8
        )
    bf16 = copy.deepcopy(encoder).to(torch.bfloat16)
    onednn = with_onednn_linears(encoder)

    def autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return states(encoder)

    options: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 (emaki)": lambda: states(encoder),
        "oneDNN linear": lambda: states(onednn),
        "bf16 autocast": autocast,
        "bf16 weights": lambda: states(bf16),
        "int8 dynamic": lambda: states(int8),
    }
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; CPU flags: {cpu_flags()}")  # fmt: skip
    print(f"{len(chunks)} distinct chunks of {ids.shape[1]} tokens (the benchmark prompt's)")
    base = median_seconds(options["fp32 (emaki)"], args.runs)
    for name, fn in options.items():
        seconds = base if name.startswith("fp32") else median_seconds(fn, args.runs)
        error = ((fn() - reference).norm() / reference.norm()).item()
        print(f"{name:14s} {seconds:.3f} s  x{seconds / base:.2f}  relative error {error:.1e}")

    # overlap: the encoder in a worker thread beside the UNet calls of one generation
    unet = bundle.unet
    latents = torch.randn(2, unet.config.in_channels, 16, 16)
    context = reference[:2].reshape(1, -1, reference.shape[-1])[:, :384].expand(2, -1, -1)
    timestep = torch.tensor([500.0, 500.0])

    def sampling() -> None:
        for _ in range(args.steps):
            unet(latents, timestep, encoder_hidden_states=context)

    def one_after_the_other() -> None:
        states(encoder)
        sampling()

    def overlapped() -> None:
        worker = threading.Thread(target=states, args=(encoder,))
        worker.start()
        sampling()
        worker.join()

    serial = median_seconds(one_after_the_other, args.runs)
    parallel = median_seconds(overlapped, args.runs)
    print(f"encode then {args.steps} UNet calls {serial:.3f} s; encode in a thread beside them "
          f"{parallel:.3f} s  x{parallel / serial:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
