"""LoRA files written the way the ecosystem writes them, for tests on tiny models.

:func:`kohya_layers` picks layers as kohya's sd-scripts ``networks/lora.py`` does: every Linear
and 1x1 conv inside the UNet's ``Transformer2DModel`` blocks, with ``conv=True`` ("LoCon" /
``conv_dim``) also every conv and Linear inside ``ResnetBlock2D`` / ``Downsample2D`` /
``Upsample2D``, and every Linear of the text encoder's attention and MLP blocks. Names are kohya's:
``lora_unet_`` / ``lora_te_`` plus the module path with "." replaced by "_"; text-encoder names
get transformers 4's ``text_model.`` prefix, which is what kohya (on transformers 4) writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class Layer:
    """One layer kohya would adapt: its kohya name, the module path and the module."""

    kohya: str
    network: str  # "unet" | "text"
    path: str
    module: nn.Module


def kohya_layers(bundle, *, conv: bool = True) -> list[Layer]:
    """The layers kohya's LoRA network targets in ``bundle`` (see the module docstring)."""
    layers: dict[str, Layer] = {}
    unet_blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
    for network, model, blocks, prefix in (
        ("unet", bundle.unet, unet_blocks, "lora_unet"),
        ("text", bundle.text_encoder, TEXT_BLOCKS, "lora_te"),
    ):
        for name, block in model.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for child_name, child in block.named_modules():
                if not isinstance(child, (nn.Linear, nn.Conv2d)):
                    continue
                path = f"{name}.{child_name}"
                spelled = path if network == "unet" else f"text_model.{path}"
                kohya = f"{prefix}.{spelled}".replace(".", "_")
                layers[kohya] = Layer(kohya, network, path, child)
    return list(layers.values())


def random_pair(module: nn.Module, rank: int, g: torch.Generator, std: float = 0.2):
    """(down, up) of a LoRA for ``module`` in kohya's layout (LoCon for kxk convs)."""
    weight = module.weight
    out, inp = weight.shape[:2]
    if weight.dim() == 4:
        down = torch.randn(rank, inp, *weight.shape[2:], generator=g) * std
        up = torch.randn(out, rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, inp, generator=g) * std
        up = torch.randn(out, rank, generator=g) * std
    return down, up


def kohya_tensors(
    layers: list[Layer], *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0
) -> dict[str, Tensor]:
    """Random LoRA tensors for ``layers`` under kohya's key names."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for layer in layers:
        down, up = random_pair(layer.module, rank, g)
        tensors[f"{layer.kohya}.lora_down.weight"] = down
        tensors[f"{layer.kohya}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{layer.kohya}.alpha"] = torch.tensor(alpha)
    return tensors


def save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
