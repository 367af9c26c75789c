"""State-dict key maps between the original CompVis single-file layout and diffusers modules.

A single-file Stable Diffusion checkpoint (``*.safetensors`` as published by CompVis/Stability and
used by A1111 and ComfyUI) holds one flat dict with the three networks under prefixes::

    model.diffusion_model.*             UNet (openaimodel.UNetModel names)
    first_stage_model.*                 KL autoencoder (ldm.modules.diffusionmodules.model names)
    cond_stage_model.transformer.*      SD 1.x: transformers' CLIPTextModel names (± "text_model.")
    cond_stage_model.model.*            SD 2.x: OpenCLIP text tower names, fused q/k/v

A :class:`KeyMap` is a list of :class:`KeyRule`\\ s, each pairing one CompVis tensor with one or
more diffusers tensors. It is built from the *diffusers module's own state-dict keys* (so the map
is exactly as large as the model) by pure renaming functions, and converts in both directions
without touching bytes: ``copy`` keeps the tensor, ``conv1x1`` is a reshape between a 1x1
convolution ``(C, C, 1, 1)`` and a linear ``(C, C)`` (the VAE mid-block attention), and ``concat``
splits OpenCLIP's fused ``in_proj`` into q, k, v along dim 0 (and fuses them back).

Written from the layouts themselves (CompVis ``openaimodel.py`` / ``model.py``, OpenCLIP
``transformer.py``, diffusers ``unet_2d_blocks.py``), not from any converter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from emaki.errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

RuleKind = Literal["copy", "concat", "conv1x1"]


@dataclass(frozen=True)
class KeyRule:
    """One CompVis tensor and the diffusers tensor(s) it holds (several only for ``concat``)."""

    compvis: str
    diffusers: tuple[str, ...]
    kind: RuleKind = "copy"


@dataclass(frozen=True)
class KeyMap:
    """A bijection between the CompVis keys of one network and its diffusers state dict."""

    rules: tuple[KeyRule, ...]

    def compvis_keys(self) -> set[str]:
        """Every CompVis key this map reads or writes."""
        return {rule.compvis for rule in self.rules}

    def to_diffusers(
        self, compvis: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert CompVis tensors to diffusers names; also return the CompVis keys missing."""
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for rule in self.rules:
            tensor = compvis.get(rule.compvis)
            if tensor is None:
                missing.append(rule.compvis)
                continue
            if rule.kind == "copy":
                out[rule.diffusers[0]] = tensor
            elif rule.kind == "conv1x1":
                out[rule.diffusers[0]] = tensor.reshape(tensor.shape[0], -1)
            else:
                out.update(_split(rule, tensor))
        return out, missing

    def to_compvis(self, diffusers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert a complete diffusers state dict to CompVis names (a missing key is a bug)."""
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            tensors = [diffusers[key] for key in rule.diffusers]
            if rule.kind == "copy":
                out[rule.compvis] = tensors[0]
            elif rule.kind == "conv1x1":
                out[rule.compvis] = tensors[0].reshape(*tensors[0].shape, 1, 1)
            else:
                out[rule.compvis] = torch.cat(tensors, dim=0)
        return out


def _split(rule: KeyRule, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = len(rule.diffusers)
    if fused.shape[0] % parts:
        raise ModelLoadError(
            f"cannot split {rule.compvis} of shape {tuple(fused.shape)} into {parts} equal parts"
        )
    chunks = torch.chunk(fused, parts, dim=0)
    # clone: each diffusers tensor gets its own storage, as if it had been saved separately.
    return {key: chunk.clone() for key, chunk in zip(rule.diffusers, chunks)}


def _group(
    diffusers_keys: Iterable[str],
    rename: Callable[[str], str],
    kinds: Callable[[str], RuleKind] | None = None,
    order: Sequence[str] = (),
) -> KeyMap:
    """Build a KeyMap from diffusers keys and a renaming function; group keys sharing a target."""
    targets: dict[str, list[str]] = {}
    for key in diffusers_keys:
        targets.setdefault(rename(key), []).append(key)
    rules = []
    for compvis, keys in targets.items():
        if len(keys) > 1:
            keys.sort(key=lambda k: _order_index(k, order))
            rules.append(KeyRule(compvis, tuple(keys), "concat"))
        else:
            kind = kinds(keys[0]) if kinds else "copy"
            rules.append(KeyRule(compvis, (keys[0],), kind))
    return KeyMap(tuple(rules))


def _order_index(key: str, order: Sequence[str]) -> int:
    for index, marker in enumerate(order):
        if marker in key:
            return index
    raise ModelLoadError(f"internal key map error: {key} has no place in a fused tensor")


# --- UNet ------------------------------------------------------------------------------------

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key_to_compvis(key: str, layers_per_block: int, up_attention: Sequence[bool]) -> str:
    """CompVis name (without prefix) of a diffusers ``UNet2DConditionModel`` key.

    CompVis numbers blocks flatly: ``input_blocks[0]`` is conv_in, then each level has
    ``layers_per_block`` (resnet[, transformer]) entries and, except the last level, one
    downsampler entry; ``output_blocks`` have ``layers_per_block + 1`` entries per level, the
    upsampler riding in the last one after the resnet (index 1) or after the transformer (index 2).
    """
    per_level = layers_per_block + 1
    for diff, comp in _UNET_TOP.items():
        if key.startswith(diff + "."):
            return comp + key[len(diff) :]
    if match := _UNET_MID.fullmatch(key):
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_rename_first(rest, _RESNET_UNET)}"
    match = _UNET_BLOCK.fullmatch(key)
    if match is None:
        raise ModelLoadError(f"unsupported UNet layout: no CompVis name for diffusers key {key}")
    side, level, kind, index, rest = match.groups()
    level, index = int(level), int(index)
    if side == "down":
        entry = 1 + level * per_level + index
        if kind == "resnets":
            return f"input_blocks.{entry}.0.{_rename_first(rest, _RESNET_UNET)}"
        if kind == "attentions":
            return f"input_blocks.{entry}.1.{rest}"
        # downsamplers.0.conv.* -> input_blocks.N.0.op.*
        return f"input_blocks.{1 + level * per_level + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
    entry = level * per_level + index
    if kind == "resnets":
        return f"output_blocks.{entry}.0.{_rename_first(rest, _RESNET_UNET)}"
    if kind == "attentions":
        return f"output_blocks.{entry}.1.{rest}"
    slot = 2 if up_attention[level] else 1
    return f"output_blocks.{level * per_level + layers_per_block}.{slot}.{rest}"


def unet_keymap(
    diffusers_keys: Iterable[str], layers_per_block: int, up_block_types: Sequence[str]
) -> KeyMap:
    """Key map of a UNet whose diffusers state dict has ``diffusers_keys``."""
    up_attention = ["CrossAttn" in block for block in up_block_types]
    return _group(
        diffusers_keys,
        lambda k: UNET_PREFIX + unet_key_to_compvis(k, layers_per_block, up_attention),
    )


# --- VAE -------------------------------------------------------------------------------------

_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers < 0.14 (still found in older hub folders and VAE files)
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def vae_key_to_compvis(key: str, num_levels: int) -> str:
    """CompVis name (without prefix) of a diffusers ``AutoencoderKL`` key.

    The CompVis decoder numbers its ``up`` levels from the lowest resolution up, diffusers'
    ``up_blocks`` from the highest down: level ``i`` is ``up[num_levels - 1 - i]``.
    """
    if match := _VAE_MID.fullmatch(key):
        part, kind, index, rest = match.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(index) + 1}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
        for diff, comp in _VAE_ATTN.items():
            if rest.startswith(diff + "."):
                return f"{part}.mid.attn_1.{comp}{rest[len(diff) :]}"
        raise ModelLoadError(f"unsupported VAE layout: no CompVis name for diffusers key {key}")
    if match := _VAE_BLOCK.fullmatch(key):
        part, _, level, kind, index, rest = match.groups()
        if part == "encoder":
            where = f"encoder.down.{level}"
        else:
            where = f"decoder.up.{num_levels - 1 - int(level)}"
        if kind == "resnets":
            return f"{where}.block.{index}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
        name = "downsample" if kind == "downsamplers" else "upsample"
        return f"{where}.{name}.{rest}"
    part, _, rest = key.partition(".")
    if part in ("encoder", "decoder") and rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if part in ("encoder", "decoder") and rest.split(".")[0] in ("conv_in", "conv_out"):
        return key
    if part in ("quant_conv", "post_quant_conv"):
        return key
    raise ModelLoadError(f"unsupported VAE layout: no CompVis name for diffusers key {key}")


def is_vae_attention_weight(compvis_key: str) -> bool:
    """True for the mid-block attention projections stored as 1x1 convolutions by CompVis."""
    return _VAE_ATTN_WEIGHT.fullmatch(compvis_key) is not None


def vae_keymap(diffusers_keys: Iterable[str], num_levels: int, prefix: str = VAE_PREFIX) -> KeyMap:
    """Key map of an ``AutoencoderKL`` with ``num_levels`` resolution levels."""
    return _group(
        diffusers_keys,
        lambda k: prefix + vae_key_to_compvis(k, num_levels),
        kinds=lambda k: (
            "conv1x1" if is_vae_attention_weight(vae_key_to_compvis(k, num_levels)) else "copy"
        ),
    )


# --- Text encoders ---------------------------------------------------------------------------


def clip_keymap(diffusers_keys: Iterable[str], *, text_model_prefix: bool = True) -> KeyMap:
    """SD 1.x: the CompVis file stores transformers' own CLIPTextModel names under a prefix.

    Most files say ``cond_stage_model.transformer.text_model.*``; some older ones drop the
    ``text_model.`` level (``text_model_prefix=False``). transformers >= 5.6 flattened
    ``CLIPTextModel`` so its own keys have no ``text_model.`` either; both are handled.
    """
    inner = "text_model." if text_model_prefix else ""
    return _group(diffusers_keys, lambda k: CLIP_PREFIX + inner + k.removeprefix("text_model."))


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_QKV = re.compile(r"self_attn\.(q|k|v)_proj\.(weight|bias)")
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def openclip_key_to_compvis(key: str) -> str:
    """OpenCLIP name (without prefix) of a CLIPTextModel key; q/k/v share the fused ``in_proj``."""
    key = key.removeprefix("text_model.")
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if key in fixed:
        return fixed[key]
    match = _CLIP_LAYER.fullmatch(key)
    if match is None:
        raise ModelLoadError(f"unsupported text encoder layout: no OpenCLIP name for {key}")
    layer, rest = match.groups()
    where = f"transformer.resblocks.{layer}"
    if qkv := _OPENCLIP_QKV.fullmatch(rest):
        return f"{where}.attn.in_proj_{qkv.group(2)}"
    for diff, comp in _OPENCLIP_LAYER.items():
        if rest.startswith(diff + "."):
            return f"{where}.{comp}{rest[len(diff) :]}"
    raise ModelLoadError(f"unsupported text encoder layout: no OpenCLIP name for {key}")


def openclip_keymap(diffusers_keys: Iterable[str]) -> KeyMap:
    """SD 2.x: CLIPTextModel keys <-> OpenCLIP text tower keys (q, k, v fused in that order)."""
    return _group(
        diffusers_keys,
        lambda k: OPENCLIP_PREFIX + openclip_key_to_compvis(k),
        order=(".q_proj.", ".k_proj.", ".v_proj."),
    )
