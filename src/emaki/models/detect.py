"""Recognise a single-file checkpoint's family and infer its network configs from tensor shapes.

Shapes tell almost everything: channels per level, layers per block, which levels have
transformers and how deep, the cross-attention width, linear vs 1x1-conv projections, the text
encoder's width, depth and vocabulary, the VAE's channels. What they cannot tell (attention heads,
activation functions, group-norm size, default sample size) comes from the family
(:mod:`emaki.models.families`). That is why one code path loads both a full-size SD 1.5 file and a
tiny test checkpoint built from :func:`~emaki.models.families.tiny_configs`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from emaki.errors import ModelLoadError
from emaki.models.families import TEXT_HEAD_DIM, ModelFamily, config_dict, get_family
from emaki.models.keymap import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

#: Key prefixes of architectures emaki recognises but does not run, with a name for the error.
_FOREIGN: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.", "an SDXL checkpoint (conditioner.embedders.*)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint (joint_blocks)"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint (double_blocks)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks)"),
    ("model.diffusion_model.label_emb.", "a class-conditioned SD 2.x model (unCLIP or upscaler)"),
    ("lora_unet_", "a LoRA, not a checkpoint"),
    ("lora_te_", "a LoRA, not a checkpoint"),
    ("string_to_param.", "a textual-inversion embedding, not a checkpoint"),
)

METADATA_PREFIX = "emaki."


@dataclass(frozen=True)
class ComponentConfigs:
    """diffusers configs of the three networks of a checkpoint (``text_ignored``: see below).

    ``text_ignored`` lists key prefixes of text-encoder layers present in the file but unused
    (SD 2.x's last OpenCLIP layer), which the strict loader must not report as unexpected.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_ignored: tuple[str, ...] = field(default=())


def detect_family(keys: Collection[str], where: str) -> str:
    """``"sd1"`` or ``"sd2"`` from a CompVis key set; anything else is a one-line ModelLoadError."""
    for prefix, what in _FOREIGN:
        if any(key.startswith(prefix) for key in keys):
            raise ModelLoadError(f"{where}: {what}; emaki loads SD 1.x and SD 2.x models")
    if not any(key.startswith(UNET_PREFIX + "input_blocks.") for key in keys):
        if any(key.startswith(("encoder.down.", VAE_PREFIX + "encoder.down.")) for key in keys):
            raise ModelLoadError(f"{where}: a VAE alone, not a model (pass it as the VAE instead)")
        sample = ", ".join(sorted(keys)[:3])
        raise ModelLoadError(
            f"{where}: unknown architecture, no {UNET_PREFIX}input_blocks.* keys (found {sample})"
        )
    if any(key.startswith(OPENCLIP_PREFIX + "transformer.resblocks.") for key in keys):
        return "sd2"
    if any(key.startswith(CLIP_PREFIX) for key in keys):
        return "sd1"
    raise ModelLoadError(
        f"{where}: no text encoder (cond_stage_model.*) keys; unknown architecture"
    )


def configs_from_metadata(metadata: Mapping[str, str], where: str) -> ComponentConfigs | None:
    """The exact configs emaki stored in a safetensors header, or None if it stored none."""
    names = ("unet_config", "vae_config", "text_encoder_config")
    if not all(METADATA_PREFIX + name in metadata for name in names):
        return None
    try:
        unet, vae, text = (json.loads(metadata[METADATA_PREFIX + name]) for name in names)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: malformed emaki metadata ({exc})") from None
    return ComponentConfigs(unet=unet, vae=vae, text_encoder=text)


def infer_configs(
    state: Mapping[str, torch.Tensor], family: str, where: str, *, with_vae: bool = True
) -> ComponentConfigs:
    """Configs of a CompVis single file, inferred from its shapes and the family's rules."""
    spec = get_family(family)
    unet = infer_unet_config(state, spec, where)
    vae = infer_vae_config(state, spec, where, VAE_PREFIX) if with_vae else {}
    if spec.text_encoder_kind == "clip":
        text, ignored = infer_clip_config(state, spec, where), ()
    else:
        text, ignored = infer_openclip_config(state, spec, where)
    return ComponentConfigs(unet=unet, vae=vae, text_encoder=text, text_ignored=ignored)


class _Shapes:
    """Shape lookups under a prefix that fail with a one-line error naming the missing key."""

    def __init__(self, state: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
        self.state, self.prefix, self.where = state, prefix, where

    def __call__(self, name: str) -> tuple[int, ...]:
        tensor = self.state.get(self.prefix + name)
        if tensor is None:
            raise ModelLoadError(f"{self.where}: missing key {self.prefix + name}")
        return tuple(tensor.shape)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.state

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by ``pattern`` (a regex on the unprefixed key)."""
        regex = re.compile(re.escape(self.prefix) + pattern)
        found = {int(m.group(1)) for key in self.state if (m := regex.match(key))}
        return sorted(found)


def infer_unet_config(
    state: Mapping[str, torch.Tensor], spec: ModelFamily, where: str
) -> dict[str, Any]:
    """UNet2DConditionModel config of the ``model.diffusion_model.*`` tensors."""
    shape = _Shapes(state, UNET_PREFIX, where)
    inputs = shape.indices(r"input_blocks\.(\d+)\.")
    outputs = shape.indices(r"output_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if shape.has(f"input_blocks.{i}.0.op.weight")]
    levels = len(downsamplers) + 1
    # conv_in + per level: `layers` entries + a downsampler (none after the last level)
    per_level, rest = divmod(len(inputs), levels)
    if rest or per_level < 2 or len(outputs) != levels * per_level:
        raise ModelLoadError(
            f"{where}: unsupported UNet layout ({len(inputs)} input blocks, {len(outputs)} output blocks)"
        )
    layers = per_level - 1
    channels = [
        shape(f"input_blocks.{1 + b * per_level}.0.out_layers.3.weight")[0] for b in range(levels)
    ]
    down_attn = [
        shape.has(f"input_blocks.{1 + b * per_level}.1.proj_in.weight") for b in range(levels)
    ]
    up_attn = [shape.has(f"output_blocks.{b * per_level}.1.proj_in.weight") for b in range(levels)]
    if not shape.has("middle_block.1.proj_in.weight"):
        raise ModelLoadError(f"{where}: unsupported UNet layout (no middle-block transformer)")
    depth = len(shape.indices(r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    proj_in = shape("middle_block.1.proj_in.weight")
    cross_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    if shape("time_embed.0.weight")[0] != 4 * channels[0]:
        raise ModelLoadError(f"{where}: unsupported UNet layout (time embedding width)")
    config = config_dict(spec.unet_config)
    config.update(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        transformer_layers_per_block=depth,
        cross_attention_dim=cross_dim,
        use_linear_projection=len(proj_in) == 2,
        attention_head_dim=spec.unet_attention_heads(tuple(channels)),
    )
    return config


def infer_vae_config(
    state: Mapping[str, torch.Tensor], spec: ModelFamily, where: str, prefix: str = VAE_PREFIX
) -> dict[str, Any]:
    """AutoencoderKL config of the CompVis VAE tensors under ``prefix``."""
    shape = _Shapes(state, prefix, where)
    levels = shape.indices(r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelLoadError(f"{where}: no VAE ({prefix}encoder.down.*) keys")
    layers = len(shape.indices(r"encoder\.down\.0\.block\.(\d+)\."))
    config = config_dict(spec.vae_config)
    config.update(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1],
        block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        layers_per_block=layers,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        mid_block_add_attention=shape.has("encoder.mid.attn_1.q.weight"),
        use_quant_conv=shape.has("quant_conv.weight"),
        use_post_quant_conv=shape.has("post_quant_conv.weight"),
    )
    return config


def clip_has_text_model_level(keys: Collection[str]) -> bool:
    """SD 1.x files mostly say ``...transformer.text_model.*``; some omit ``text_model.``."""
    return any(key.startswith(CLIP_PREFIX + "text_model.") for key in keys)


def _text_config(spec: ModelFamily, **fields: int) -> dict[str, Any]:
    config = config_dict(spec.text_encoder_config)
    config.update(fields)
    config["num_attention_heads"] = max(1, fields["hidden_size"] // TEXT_HEAD_DIM)
    return config


def infer_clip_config(
    state: Mapping[str, torch.Tensor], spec: ModelFamily, where: str
) -> dict[str, Any]:
    """CLIPTextModel config of SD 1.x's ``cond_stage_model.transformer.*`` tensors."""
    inner = "text_model." if clip_has_text_model_level(state.keys()) else ""
    shape = _Shapes(state, CLIP_PREFIX + inner, where)
    vocab, hidden = shape("embeddings.token_embedding.weight")
    return _text_config(
        spec,
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
        num_hidden_layers=len(shape.indices(r"encoder\.layers\.(\d+)\.")),
        intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
    )


def infer_openclip_config(
    state: Mapping[str, torch.Tensor], spec: ModelFamily, where: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """CLIPTextModel config of SD 2.x's OpenCLIP tower, keeping the layers SD 2.x uses.

    SD 2.x conditions on the penultimate layer, so the last resblock is dropped (and its keys
    ignored). Exception: a full-width (1024) tower with 23 resblocks was already trimmed by a
    diffusers-style export (ViT-H/14 has 24), so all of it is kept.
    """
    shape = _Shapes(state, OPENCLIP_PREFIX, where)
    vocab, hidden = shape("token_embedding.weight")
    blocks = shape.indices(r"transformer\.resblocks\.(\d+)\.")
    used = len(blocks) if (hidden == 1024 and len(blocks) == 23) else len(blocks) - 1
    if used < 1:
        raise ModelLoadError(
            f"{where}: the OpenCLIP text encoder has too few layers ({len(blocks)})"
        )
    config = _text_config(
        spec,
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=shape("positional_embedding")[0],
        num_hidden_layers=used,
        intermediate_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
    )
    ignored = tuple(f"{OPENCLIP_PREFIX}transformer.resblocks.{i}." for i in blocks[used:])
    return config, ignored
