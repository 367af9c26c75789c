"""Model families as data: what SD 1.x and SD 2.x are made of.

A :class:`ModelFamily` holds the full-size diffusers configs of the three networks (UNet, KL
autoencoder, CLIP text encoder), the DDPM training noise schedule, the default prediction type and
the rules that a checkpoint's tensor shapes cannot tell (attention heads, activation, group norm
size). The single-file loader infers everything else from shapes (``emaki.models.detect``), so the
same code loads a full-size checkpoint and the tiny test models built from :func:`tiny_configs`.

Sources: the CompVis ``v1-inference.yaml`` / Stability ``v2-inference(-v).yaml`` configs and the
matching diffusers hub configs (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-2-1``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from emaki.errors import ModelLoadError

if TYPE_CHECKING:
    pass

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
#: Short spellings used by CompVis yaml files (``parameterization``) and users.
PREDICTION_ALIASES: Mapping[str, str] = MappingProxyType(
    {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
)

#: Group-norm size of every SD UNet and VAE; shapes cannot tell it, tiny models obey it too.
NORM_NUM_GROUPS = 32
#: CLIP text encoders use 64-dimensional attention heads (ViT-L/14: 768/12, ViT-H/14: 1024/16).
TEXT_HEAD_DIM = 64


def _frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(mapping)


def config_dict(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh, mutable deep copy of a frozen family config (tuples become lists)."""
    return {key: _thaw(value) for key, value in mapping.items()}


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return config_dict(value)
    return copy.deepcopy(value)


@dataclass(frozen=True)
class ModelFamily:
    """Everything emaki knows about one Stable Diffusion family, as plain data.

    ``unet_heads`` / ``unet_head_dim``: exactly one is set. SD 1.x uses 8 heads in every
    transformer (diffusers' config calls that ``attention_head_dim=8``); SD 2.x uses 64-dimensional
    heads, so the head count grows with the block width.

    ``text_layers_skipped``: SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H/14 (then
    ``ln_final``). Like diffusers, emaki drops the unused last layer at load time, so the loaded
    text encoder's final output (after ``final_layer_norm``) *is* what the UNet was trained on and
    the default clip skip is 1 for both families.
    """

    name: str
    title: str
    text_encoder_kind: Literal["clip", "openclip"]
    unet_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    text_encoder_config: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    prediction_type: PredictionType
    vae_scaling_factor: float
    tokenizer_pad: Literal["eos", "zero"]
    text_hidden_act: str
    text_projection_dim: int
    unet_heads: int | None
    unet_head_dim: int | None
    unet_upcast_attention: bool
    text_layers_skipped: int
    clip_skip_default: int = 1

    def unet_attention_heads(self, block_out_channels: tuple[int, ...]) -> int | list[int]:
        """The value of diffusers' ``attention_head_dim`` (really: heads) for these block widths."""
        if self.unet_heads is not None:
            return self.unet_heads
        assert self.unet_head_dim is not None
        return [max(1, ch // self.unet_head_dim) for ch in block_out_channels]

    def alphas_cumprod(self) -> torch.Tensor:
        """Cumulative product of (1 - beta) of the DDPM training schedule, float32, shape (T,)."""
        return alphas_cumprod_from_scheduler_config(self.scheduler_config)


def alphas_cumprod_from_scheduler_config(config: Mapping[str, Any]) -> torch.Tensor:
    """ᾱ_t of a diffusers scheduler config, computed exactly as diffusers does (float32).

    diffusers builds betas in float32 (``linspace(√β₀, √β₁, T) ** 2`` for ``scaled_linear``) and
    takes the cumulative product in float32; CompVis did the same in float64 and then cast, which
    differs in the 7th digit. emaki follows diffusers so that its samplers can be compared with
    diffusers' schedulers bit for bit.
    """
    from diffusers import DDPMScheduler

    try:
        scheduler = DDPMScheduler.from_config(dict(config))
    except Exception as exc:  # diffusers raises NotImplementedError/ValueError for bad schedules
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"unsupported noise schedule in scheduler config: {message}") from None
    return scheduler.alphas_cumprod.detach().clone().to(torch.float32)


_SCHEDULE = _frozen(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
)

_VAE_FULL = _frozen(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": NORM_NUM_GROUPS,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
)

_UNET_COMMON = _frozen(
    {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": 1,
        "act_fn": "silu",
        "norm_num_groups": NORM_NUM_GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }
)

_TEXT_COMMON = _frozen(
    {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
)

SD1 = ModelFamily(
    name="sd1",
    title="Stable Diffusion 1.x (CLIP ViT-L/14 text encoder)",
    text_encoder_kind="clip",
    unet_config=_frozen(
        {
            **_UNET_COMMON,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "use_linear_projection": False,
            "upcast_attention": False,
            "sample_size": 64,
        }
    ),
    vae_config=_frozen(dict(_VAE_FULL)),
    text_encoder_config=_frozen(
        {
            **_TEXT_COMMON,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            "pad_token_id": 49407,
        }
    ),
    scheduler_config=_frozen(
        {
            "_class_name": "PNDMScheduler",
            **_SCHEDULE,
            "skip_prk_steps": True,
            "prediction_type": "epsilon",
        }
    ),
    prediction_type="epsilon",
    vae_scaling_factor=0.18215,
    tokenizer_pad="eos",
    text_hidden_act="quick_gelu",
    text_projection_dim=768,
    unet_heads=8,
    unet_head_dim=None,
    unet_upcast_attention=False,
    text_layers_skipped=0,
)

SD2 = ModelFamily(
    name="sd2",
    title="Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder, penultimate layer)",
    text_encoder_kind="openclip",
    unet_config=_frozen(
        {
            **_UNET_COMMON,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            # SD 2.1 computes attention scores in float32; a no-op when running in float32.
            "upcast_attention": True,
            "sample_size": 96,
        }
    ),
    vae_config=_frozen({**_VAE_FULL, "sample_size": 768}),
    text_encoder_config=_frozen(
        {
            **_TEXT_COMMON,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "hidden_act": "gelu",
            "projection_dim": 512,
            "pad_token_id": 0,
        }
    ),
    scheduler_config=_frozen(
        {"_class_name": "DDIMScheduler", **_SCHEDULE, "prediction_type": "epsilon"}
    ),
    prediction_type="epsilon",
    vae_scaling_factor=0.18215,
    tokenizer_pad="zero",
    text_hidden_act="gelu",
    text_projection_dim=512,
    unet_heads=None,
    unet_head_dim=64,
    unet_upcast_attention=True,
    text_layers_skipped=1,
)

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({"sd1": SD1, "sd2": SD2})


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``"sd1"`` or ``"sd2"``); a one-line error names the accepted."""
    try:
        return FAMILIES[name]
    except KeyError:
        accepted = ", ".join(FAMILIES)
        raise ModelLoadError(f"unknown model family {name!r} (accepted: {accepted})") from None


def normalize_prediction_type(value: str) -> PredictionType:
    """Map ``eps``/``v``/``x0`` and the diffusers names to the diffusers names, or raise."""
    name = PREDICTION_ALIASES.get(value, value)
    if name not in PREDICTION_TYPES:
        accepted = ", ".join(PREDICTION_TYPES + tuple(PREDICTION_ALIASES))
        raise ModelLoadError(f"unknown prediction type {value!r} (accepted: {accepted})")
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class TinyConfigs:
    """Configs of a tiny, randomly initialised model of a family (fresh dicts, free to modify)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]


def tiny_configs(family: str) -> TinyConfigs:
    """Small configs with the family's structure, for tests and benchmarks (milliseconds a step).

    They obey the family rules the single-file loader relies on (group norm 32, SD 1.x: 8 heads,
    SD 2.x: 64-dim heads and linear transformer projections, text heads = hidden / 64, at least 1)
    and keep the real vocabulary (49,408), so a tiny checkpoint loads through the same shape-based
    config inference as a full-size one. The UNet has two levels, the last without attention as
    in SD; the VAE has four levels so that latents are 1/8 of the image size, as in full-size SD.
    """
    spec = get_family(family)
    width = 32 if spec.name == "sd1" else 64
    blocks = (width, 2 * width)
    text_hidden = 32 if spec.name == "sd1" else 64
    unet = config_dict(spec.unet_config)
    unet.update(
        block_out_channels=list(blocks),
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=_thaw(spec.unet_attention_heads(blocks)),
        cross_attention_dim=text_hidden,
        sample_size=8,
    )
    vae = config_dict(spec.vae_config)
    vae.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
    text = config_dict(spec.text_encoder_config)
    text.update(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=max(1, text_hidden // TEXT_HEAD_DIM),
    )
    return TinyConfigs(unet=unet, vae=vae, text_encoder=text)
