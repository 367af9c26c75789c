"""Small datasets and networks that the training tests build for themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast

from emaki.data.build import build_dataset


def shapes_dataset(root: Path, n: int = 12) -> Path:
    """``n`` captioned images of coloured rectangles on white, in two aspect ratios."""
    src = root / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["red", "green", "blue", "gold"]
    for i in range(n):
        w, h = (32, 32) if i % 3 else (48, 32)
        arr = np.full((h, w, 3), 255, np.uint8)
        c = rng.integers(0, 255, 3)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = c
        Image.fromarray(arr).save(src / f"{i:02d}.png")
        (src / f"{i:02d}.txt").write_text(f"a {names[i % 4]} shape {i}")
    out = root / "ds"
    build_dataset(out, [], [src], size=64)
    return out


WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "apple",
    "circle",
    "face",
    "happy",
    "sad",
    "yellow",
    "on",
    "the",
    "with",
]


def tiny_bert(
    tmp: Path, max_length: int = 16, use_mask: bool = True
) -> tuple[BertTokenizerFast, BertModel]:
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=max_length)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    cfg.use_attention_mask = use_mask
    return tok, BertModel(cfg).eval()


def denoiser_parts(root: Path) -> dict[str, Path]:
    """A shapes dataset, a tiny VAE (2x downsampling) and a tiny BERT text encoder, saved."""
    from emaki.train.recipe import VAEModelConfig
    from emaki.train.tasks import vae_from_config

    data = shapes_dataset(root / "data")
    torch.manual_seed(0)
    vae = vae_from_config(
        VAEModelConfig(block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4)
    )
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(root / "vae")
    tok, text = tiny_bert(root)
    tok.save_pretrained(str(root / "text" / "tokenizer"))
    text.save_pretrained(str(root / "text" / "text_encoder"))
    return {"data": data, "vae": root / "vae", "text": root / "text"}


def unet_recipe(
    parts: dict[str, Path], out: Path, steps: int = 4, prediction: str = "epsilon"
) -> str:
    """A UNet recipe on ``denoiser_parts`` (16 px, a 4-step run with EMA, checkpoints, samples)."""
    return f"""
kind = "unet"
output = "{out}"
[data]
path = "{parts["data"]}"
resolution = 16
caption_dropout = 0.3
[model]
vae = "{parts["vae"]}"
text_encoder = "{parts["text"]}"
block_out_channels = [16, 32]
cross_attention_levels = [false, true]
attention_head_dim = 4
norm_num_groups = 4
prediction_type = "{prediction}"
min_snr_gamma = 5
noise_offset = 0.05
[train]
steps = {steps}
batch_size = 3
ema_decay = 0.9
[optim]
lr = 1e-3
[checkpoint]
every = 2
[log]
every = 1
sample_every = 4
sample_prompts = ["a red shape", "a blue shape"]
sample_steps = 3
"""


def logged_losses(run: Path) -> list[str]:
    """The loss column of a run's log.csv, as written."""
    import csv

    with (run / "log.csv").open() as f:
        return [r["loss"] for r in csv.DictReader(f)]
