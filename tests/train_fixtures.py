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
