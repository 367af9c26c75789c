"""Load ControlNet weights (Zhang et al. 2023) into diffusers' ``ControlNetModel``, offline.

A ControlNet is a trainable copy of a Stable Diffusion UNet's encoder (input blocks and middle
block) plus two things the UNet does not have: a small convolutional network that encodes the
control image down to latent resolution (the "hint block", paper section 3.2, "a tiny network
E(.) of four convolution layers"), and one zero-initialised 1x1 convolution per encoder output
("zero convolutions", section 3.1), whose outputs are added to the UNet's skip connections.

Two layouts are read, both strictly (every tensor used, every weight present):

* a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``.bin`` only
  with ``allow_pickle``);
* lllyasviel's original single file (ControlNet 1.0 / 1.1 ``.safetensors``, or ``.pth`` with
  ``allow_pickle``), keys with or without ``control_model.``::

      time_embed.*  input_blocks.*  middle_block.*      the UNet encoder copy (CompVis names)
      input_hint_block.{0,2,...,14}.*                   the hint encoder (convolutions; SiLUs
                                                        sit at the odd indices)
      zero_convs.{i}.0.*  middle_block_out.0.*          the zero convolutions

The encoder part uses the UNet key map of :mod:`emaki.models.keymap`; only the hint block and
the zero convolutions are mapped here. The config is inferred from the tensors' shapes (channels,
layers per block, transformer depth, context width, linear or 1x1-conv projections, hint-block
widths), so nothing is downloaded. What shapes cannot tell comes from the family: linear
transformer projections mean SD 2.x (64-dimensional attention heads), 1x1-conv projections SD
1.x (8 heads), as in every released ControlNet and in emaki's tiny test models. The shuffle
ControlNet's global average pooling is not visible in the weights either: it is read from
``global_average_pooling: true`` in a ``.yaml`` of the same name beside the file, where
ControlNet 1.1 ships it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel

from emaki.errors import EmakiError, ModelLoadError
from emaki.models.components import assemble, describe_keys
from emaki.models.families import NORM_NUM_GROUPS, get_family
from emaki.models.files import one_line, read_json, read_tensors
from emaki.models.keymap import KeyMap, KeyRule, unet_key_to_compvis
from emaki.models.loading import check_coverage

#: Prefix of the ControlNet's tensors in lllyasviel's files (absent in many re-saved ones).
CONTROL_PREFIX = "control_model."
#: Prefixes of a full SD model that ControlNet 1.0's ``.pth`` files bundle beside the ControlNet.
_BUNDLED_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
_HINT = "controlnet_cond_embedding."
_ZERO_CONV = re.compile(r"controlnet_down_blocks\.(\d+)\.(.+)")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_YAML_POOLING = re.compile(r"^\s*global_average_pooling\s*:\s*(true|True|TRUE)\b", re.MULTILINE)


def load_controlnet(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> ControlNetModel:
    """A ControlNet from a diffusers folder or an original single file, in eval mode.

    ``allow_pickle`` permits ``.pth``/``.ckpt``/``.bin`` files, read only with
    ``torch.load(weights_only=True)``; ``dtype`` casts floating weights (``None`` keeps the
    file's). Every failure is a one-line :class:`~emaki.errors.ModelLoadError` (a refused pickle
    a :class:`~emaki.errors.PickleRefusedError`) naming the file and, for bad keys, the keys.
    """
    source = Path(path)
    try:
        if source.is_dir():
            return _load_folder(source, allow_pickle, dtype)
        if not source.exists():
            raise ModelLoadError(f"{source}: no such file or folder")
        return _load_file(source, allow_pickle, dtype)
    except EmakiError:
        raise
    except Exception as exc:  # a library failure we did not foresee: still one line
        raise ModelLoadError(
            f"{source.name}: cannot load ControlNet ({type(exc).__name__}: {one_line(exc)})"
        ) from None


# --- diffusers folders -----------------------------------------------------------------------


def _load_folder(folder: Path, allow_pickle: bool, dtype: torch.dtype | None) -> ControlNetModel:
    config = read_json(folder / "config.json")
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            state, _ = read_tensors(folder / name, allow_pickle=allow_pickle)
            return _from_diffusers_state(config, state, dtype, folder.name)
    raise ModelLoadError(f"{folder.name}: no {' or '.join(_WEIGHT_NAMES)} in the folder")


def _from_diffusers_state(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    where: str,
) -> ControlNetModel:
    kind = config.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise ModelLoadError(f"{where}: config.json describes a {kind}, not a ControlNetModel")
    if config.get("addition_embed_type") is not None:
        raise ModelLoadError(
            f"{where}: an SDXL-style ControlNet (addition_embed_type="
            f"{config['addition_embed_type']!r}); emaki runs SD 1.x and 2.x ControlNets"
        )
    model = empty_controlnet(config)
    return assemble(model, state, dtype=dtype, where=where)


def empty_controlnet(config: Mapping[str, Any]) -> ControlNetModel:
    """A ControlNetModel with ``config`` on the meta device (shapes only, no memory)."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return ControlNetModel.from_config(fields)
    except Exception as exc:  # a config diffusers rejects (channels, heads, block types)
        raise ModelLoadError(f"unsupported ControlNet config ({one_line(exc)})") from None


# --- original single files -------------------------------------------------------------------


def _load_file(path: Path, allow_pickle: bool, dtype: torch.dtype | None) -> ControlNetModel:
    where = path.name
    raw, _ = read_tensors(path, allow_pickle=allow_pickle)
    if any(key.startswith(_HINT) for key in raw):
        config_path = path.with_name("config.json")
        if not config_path.is_file():
            raise ModelLoadError(
                f"{where}: diffusers-format ControlNet weights need their config.json; put both "
                "in one folder and load the folder"
            )
        return _from_diffusers_state(read_json(config_path), raw, dtype, where)
    state, shown_prefix = original_controlnet_state(raw, where)
    config = infer_controlnet_config(state, where)
    config["global_pool_conditions"] = _yaml_global_pooling(path)
    model = empty_controlnet(config)
    # Keys keep the file's own spelling, so that errors name what the user can find in it.
    keymap = controlnet_keymap(model.state_dict(), config["layers_per_block"], shown_prefix)
    state = {shown_prefix + key: tensor for key, tensor in state.items()}
    check_coverage(state, [keymap], lambda key: False, where)
    converted, _ = keymap.to_diffusers(state)
    names = {rule.diffusers[0]: rule.compvis for rule in keymap.rules}
    return assemble(
        model, converted, dtype=dtype, where=where, display=lambda key: names.get(key, key)
    )


def original_controlnet_state(
    raw: Mapping[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], str]:
    """The ControlNet tensors of an original file without ``control_model.``, and that prefix
    as the file spells it ("" if absent), for error messages in the file's own names.

    A file whose keys carry the prefix may also bundle a whole SD model (ControlNet 1.0's
    ``control_sd15_*.pth``); those tensors, and the DDPM schedule buffers that come with them
    (top-level names without a dot), are not the ControlNet's and are skipped. Any other key is
    reported as unexpected.
    """
    if "difference" in raw:
        raise ModelLoadError(
            f"{where}: a difference ControlNet (weights relative to a base model); extract it "
            "against its base model first"
        )
    if any("lora_controlnet" in key for key in raw):
        raise ModelLoadError(f"{where}: a Control-LoRA, which emaki does not load")
    if any(key.startswith(CONTROL_PREFIX) for key in raw):
        foreign = sorted(
            key
            for key in raw
            if not key.startswith((CONTROL_PREFIX, *_BUNDLED_PREFIXES)) and "." in key
        )
        if foreign:
            raise ModelLoadError(f"{where}: " + describe_keys("unexpected key", foreign))
        state = {
            key.removeprefix(CONTROL_PREFIX): tensor
            for key, tensor in raw.items()
            if key.startswith(CONTROL_PREFIX)
        }
        prefix = CONTROL_PREFIX
    else:
        state, prefix = dict(raw), ""
    if not any(key.startswith("input_hint_block.") for key in state):
        if any(key.startswith("model.diffusion_model.") for key in raw):
            raise ModelLoadError(f"{where}: a Stable Diffusion checkpoint, not a ControlNet")
        sample = ", ".join(sorted(raw)[:3])
        raise ModelLoadError(
            f"{where}: not a ControlNet (no {prefix}input_hint_block.* keys; found {sample})"
        )
    return state, prefix


class _Shapes:
    """Shape lookups that fail with a one-line error naming the missing key."""

    def __init__(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        self.state, self.where = state, where

    def __call__(self, name: str) -> tuple[int, ...]:
        tensor = self.state.get(name)
        if tensor is None:
            raise ModelLoadError(f"{self.where}: missing key {name}")
        return tuple(tensor.shape)

    def has(self, name: str) -> bool:
        return name in self.state

    def indices(self, pattern: str) -> list[int]:
        regex = re.compile(pattern)
        return sorted({int(m.group(1)) for key in self.state if (m := regex.match(key))})


def infer_controlnet_config(state: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """The diffusers ``ControlNetModel`` config of original-layout tensors (no prefix)."""
    shape = _Shapes(state, where)
    inputs = shape.indices(r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if shape.has(f"input_blocks.{i}.0.op.weight")]
    levels = len(downsamplers) + 1
    # conv_in, then per level `layers` (resnet[, transformer]) entries and a downsampler (none
    # after the last level): levels * (layers + 1) entries in all.
    per_level, rest = divmod(len(inputs), levels)
    if rest or per_level < 2 or inputs != list(range(len(inputs))):
        raise ModelLoadError(f"{where}: unsupported ControlNet layout ({len(inputs)} input blocks)")
    first = [1 + b * per_level for b in range(levels)]
    channels = [shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    attention = [shape.has(f"input_blocks.{i}.1.proj_in.weight") for i in first]
    if not shape.has("middle_block.1.proj_in.weight"):
        raise ModelLoadError(f"{where}: unsupported ControlNet layout (no middle transformer)")
    depth = _transformer_depth(shape, "middle_block.1")
    for i, has_attention in zip(first, attention):
        if has_attention and _transformer_depth(shape, f"input_blocks.{i}.1") != depth:
            raise ModelLoadError(
                f"{where}: unsupported ControlNet layout (transformer depth differs per level)"
            )
    if shape("time_embed.0.weight")[0] != 4 * channels[0]:
        raise ModelLoadError(f"{where}: unsupported ControlNet layout (time embedding width)")
    linear = len(shape("middle_block.1.proj_in.weight")) == 2
    # Shapes cannot tell attention heads: linear projections are SD 2.x, convolutions SD 1.x.
    family = get_family("sd2" if linear else "sd1")
    common = family.unet_config
    return {
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "conditioning_channels": shape("input_hint_block.0.weight")[1],
        "conditioning_embedding_out_channels": _hint_channels(shape, channels[0], where),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "block_out_channels": channels,
        "layers_per_block": per_level - 1,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "attention_head_dim": family.unet_attention_heads(tuple(channels)),
        "use_linear_projection": linear,
        "upcast_attention": family.unet_upcast_attention,
        "norm_num_groups": NORM_NUM_GROUPS,
        **{
            key: common[key]
            for key in (
                "flip_sin_to_cos",
                "freq_shift",
                "downsample_padding",
                "mid_block_scale_factor",
                "act_fn",
                "norm_eps",
            )
        },
    }


def _transformer_depth(shape: _Shapes, where: str) -> int:
    return len(shape.indices(re.escape(where) + r"\.transformer_blocks\.(\d+)\."))


def _hint_channels(shape: _Shapes, model_channels: int, where: str) -> list[int]:
    """diffusers' ``conditioning_embedding_out_channels`` of the hint block's convolutions.

    The original hint block is ``conv, SiLU, (conv, SiLU, strided conv, SiLU) * (n - 1), conv``
    (convolutions at the even indices 0, 2, ..., 4n - 2); the widths diffusers records are the
    outputs of the first convolution and of each strided one, at indices 0, 4, ..., 4n - 4.
    """
    convs = shape.indices(r"input_hint_block\.(\d+)\.weight")
    n = len(convs) // 2
    if n < 1 or convs != list(range(0, 4 * n, 2)):
        raise ModelLoadError(
            f"{where}: unsupported ControlNet hint block (convolutions at {convs})"
        )
    out = shape(f"input_hint_block.{4 * n - 2}.weight")[0]
    if out != model_channels:
        raise ModelLoadError(
            f"{where}: hint block ends with {out} channels, the encoder starts with "
            f"{model_channels}"
        )
    return [shape(f"input_hint_block.{4 * i}.weight")[0] for i in range(n)]


def controlnet_key_to_original(key: str, layers_per_block: int, hint_blocks: int) -> str:
    """The original name (without ``control_model.``) of a diffusers ``ControlNetModel`` key.

    ``hint_blocks`` is ``len(controlnet_cond_embedding.blocks)``. The UNet-encoder part is the
    UNet's CompVis naming; the ControlNet-only parts are mapped here.
    """
    if key.startswith(_HINT):
        module, _, rest = key.removeprefix(_HINT).partition(".")
        if module == "conv_in":
            return f"input_hint_block.0.{rest}"
        if module == "conv_out":
            return f"input_hint_block.{2 * (hint_blocks + 1)}.{rest}"
        if module == "blocks":
            index, _, tail = rest.partition(".")
            return f"input_hint_block.{2 * (int(index) + 1)}.{tail}"
        raise ModelLoadError(f"unsupported ControlNet layout: no original name for {key}")
    if match := _ZERO_CONV.fullmatch(key):
        return f"zero_convs.{match.group(1)}.0.{match.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key.removeprefix("controlnet_mid_block.")
    # A ControlNet has no decoder, so no up blocks whose attention layout would matter.
    return unet_key_to_compvis(key, layers_per_block, ())


def controlnet_keymap(
    diffusers_keys: Iterable[str], layers_per_block: int, prefix: str = ""
) -> KeyMap:
    """Original <-> diffusers key map of a ControlNetModel whose state dict has these keys.

    ``prefix`` goes before every original name (``"control_model."`` for lllyasviel's files).
    """
    keys = list(diffusers_keys)
    hint_blocks = len({k.split(".")[2] for k in keys if k.startswith(_HINT + "blocks.")})
    return KeyMap(
        tuple(
            KeyRule(prefix + controlnet_key_to_original(k, layers_per_block, hint_blocks), (k,))
            for k in keys
        )
    )


def _yaml_global_pooling(path: Path) -> bool:
    """``global_average_pooling: true`` in ``<stem>.yaml`` beside the file (the shuffle model)."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return False
    try:
        text = yaml.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ModelLoadError(f"{yaml.name}: cannot read ({one_line(exc)})") from None
    return _YAML_POOLING.search(text) is not None
