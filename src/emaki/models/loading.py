"""Load a Stable Diffusion model (single file or diffusers folder) into a :class:`ModelBundle`.

Strict and offline: every tensor of the file must land in a network and every network weight must
come from the file (keys known to be unused, like EMA copies or DDPM schedule buffers, are
skipped by name); no configuration or weight is ever downloaded; pickles need an explicit opt-in.
Every failure is a one-line :class:`~emaki.errors.ModelLoadError`.

Prediction type, first that applies: the ``prediction_type`` argument; a ``.yaml`` beside a single
file with ``parameterization: "v"`` (A1111's convention); the ``emaki.prediction_type`` metadata
emaki writes into single files; a diffusers folder's scheduler config; the family default
(epsilon). Nothing guesses it from the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    BertTokenizerFast,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emaki.errors import EmakiError, ModelLoadError
from emaki.models.bundle import ModelBundle
from emaki.models.components import (
    ModelT,
    assemble,
    describe_keys,
    empty_text_encoder,
    empty_unet,
    empty_vae,
)
from emaki.models.detect import (
    METADATA_PREFIX,
    ComponentConfigs,
    clip_has_text_model_level,
    configs_from_metadata,
    detect_family,
    infer_configs,
    infer_vae_config,
)
from emaki.models.families import (
    ModelFamily,
    PredictionType,
    alphas_cumprod_from_scheduler_config,
    config_dict,
    get_family,
    normalize_prediction_type,
)
from emaki.models.files import (
    files_hash,
    one_line,
    read_json,
    read_pickle,
    read_safetensors,
    read_tensors,
    short_hash,
)
from emaki.models.keymap import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMap,
    clip_keymap,
    is_vae_attention_weight,
    openclip_keymap,
    unet_keymap,
    vae_key_to_compvis,
    vae_keymap,
)
from emaki.models.provided import provided_weight_file
from emaki.text.tokenizer import load_clip_tokenizer

#: DDPM buffers that CompVis' LatentDiffusion saves with the weights; emaki recomputes them.
_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
#: Keys present in many single files that no network uses.
_UNUSED_KEYS = frozenset(
    {
        CLIP_PREFIX + "text_model.embeddings.position_ids",
        CLIP_PREFIX + "embeddings.position_ids",
        OPENCLIP_PREFIX + "text_projection",
        OPENCLIP_PREFIX + "logit_scale",
        OPENCLIP_PREFIX + "attn_mask",
    }
)
_EMA_PREFIX = "model_ema."
_YAML_PARAMETERIZATION = re.compile(
    r"""^\s*parameterization\s*:\s*["']?([A-Za-z0-9_]+)["']?\s*(?:#.*)?$""", re.MULTILINE
)


def load_model(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    vae_path: str | Path | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = torch.float32,
    prefer_ema: bool = False,
) -> ModelBundle:
    """Load an SD 1.x / 2.x model from a single file or a diffusers pipeline folder.

    ``prediction_type``: ``epsilon``/``v_prediction``/``sample`` (or ``eps``/``v``/``x0``); overrides
    what the files say. ``vae_path``: a VAE file (CompVis keys with or without
    ``first_stage_model.``, or diffusers keys) replacing the model's VAE. ``allow_pickle``: permit
    ``.ckpt``/``.pt``/``.pth``/``.bin`` through ``torch.load(weights_only=True)``. ``dtype``: cast
    floating weights to it; ``None`` keeps the file's dtypes (what conversion wants).
    ``prefer_ema``: use a single file's ``model_ema.*`` UNet weights instead of the raw ones.
    """
    source = Path(path)
    option = normalize_prediction_type(prediction_type) if prediction_type else None
    vae = Path(vae_path) if vae_path is not None else None
    try:
        if source.is_dir():
            if prefer_ema:
                raise ModelLoadError(f"{source.name}: prefer_ema applies to single files only")
            return _load_folder(source, option, vae, allow_pickle, dtype)
        if not source.exists():
            raise ModelLoadError(f"{source}: no such file or folder")
        return _load_single_file(source, option, vae, allow_pickle, dtype, prefer_ema)
    except EmakiError:
        raise
    except Exception as exc:  # a library failure we did not foresee: still one line, no traceback
        raise ModelLoadError(
            f"{source.name}: cannot load ({type(exc).__name__}: {one_line(exc)})"
        ) from None


# --- single files ----------------------------------------------------------------------------


def _load_single_file(
    path: Path,
    option: PredictionType | None,
    vae_path: Path | None,
    allow_pickle: bool,
    dtype: torch.dtype | None,
    prefer_ema: bool,
) -> ModelBundle:
    where = path.name
    state, metadata = read_tensors(path, allow_pickle=allow_pickle)
    family = detect_family(state.keys(), where)
    stored_family = metadata.get(METADATA_PREFIX + "family")
    if stored_family is not None and stored_family != family:
        raise ModelLoadError(
            f"{where}: metadata says family {stored_family!r}, keys say {family!r}"
        )
    spec = get_family(family)
    configs = configs_from_metadata(metadata, where) or infer_configs(
        state, family, where, with_vae=vae_path is None
    )
    if prefer_ema:
        state = _with_ema_unet(state, where)
    unet, text, vae = _single_file_networks(
        state, spec, configs, dtype, where, with_vae=vae_path is None
    )
    vae_name = vae_hash = None
    if vae is None:
        vae, vae_name, vae_hash = load_vae_file(
            vae_path, spec, allow_pickle=allow_pickle, dtype=dtype
        )

    scheduler = _stored_json(metadata, "scheduler_config", where)
    prediction = option or _yaml_prediction_type(path) or _metadata_prediction(metadata, where)
    return _bundle(
        spec,
        unet=unet,
        vae=vae,
        text=text,
        tokenizer=load_clip_tokenizer(spec.tokenizer_pad),
        scheduler=scheduler or config_dict(spec.scheduler_config),
        prediction=prediction or spec.prediction_type,
        name=path.stem,
        hash=short_hash(path),
        source=path,
        text_layers_skipped=spec.text_layers_skipped,
        vae_name=vae_name,
        vae_hash=vae_hash,
    )


def _single_file_networks(
    state: Mapping[str, torch.Tensor],
    spec: ModelFamily,
    configs: ComponentConfigs,
    dtype: torch.dtype | None,
    where: str,
    *,
    with_vae: bool,
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL | None]:
    """Build the networks on meta, check the whole file's keys at once, then fill them."""
    unet = empty_unet(configs.unet)
    text = empty_text_encoder(configs.text_encoder)
    maps = {
        "unet": unet_keymap(
            unet.state_dict(), unet.config.layers_per_block, unet.config.up_block_types
        ),
        "text": (
            clip_keymap(text.state_dict(), text_model_prefix=clip_has_text_model_level(state))
            if spec.text_encoder_kind == "clip"
            else openclip_keymap(text.state_dict())
        ),
    }
    vae = empty_vae(configs.vae) if with_vae else None
    if vae is not None:
        maps["vae"] = vae_keymap(vae.state_dict(), len(vae.config.block_out_channels))
    skip = _unused_key_filter(configs.text_ignored, skip_vae=not with_vae)
    check_coverage(state, maps.values(), skip, where)
    unet = _fill(unet, maps["unet"], state, dtype, where)
    text = _fill(text, maps["text"], state, dtype, where)
    if vae is not None:
        vae = _fill(vae, maps["vae"], state, dtype, where)
    return unet, text, vae


def _fill(
    model: ModelT,
    keymap: KeyMap,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    where: str,
) -> ModelT:
    """Convert ``state`` through ``keymap`` and assign it to the meta ``model``."""
    converted, _ = keymap.to_diffusers(state)
    names = {key: rule.compvis for rule in keymap.rules for key in rule.diffusers}
    return assemble(model, converted, dtype=dtype, where=where, display=lambda k: names.get(k, k))


def check_coverage(
    state: Mapping[str, torch.Tensor],
    maps: Iterable[KeyMap],
    skip: Callable[[str], bool],
    where: str,
) -> None:
    """Every key a map needs must be in ``state``; every key of ``state`` must be used or skipped."""
    maps = list(maps)
    covered = set().union(*(m.compvis_keys() for m in maps))
    missing = [rule.compvis for m in maps for rule in m.rules if rule.compvis not in state]
    unexpected = sorted(key for key in state if key not in covered and not skip(key))
    problems = []
    if missing:
        problems.append(describe_keys("missing key", missing))
    if unexpected:
        problems.append(describe_keys("unexpected key", unexpected))
    if problems:
        raise ModelLoadError(f"{where}: " + "; ".join(problems))


def _unused_key_filter(text_ignored: tuple[str, ...], *, skip_vae: bool) -> Callable[[str], bool]:
    prefixes = (_EMA_PREFIX, *text_ignored) + ((VAE_PREFIX,) if skip_vae else ())

    def skip(key: str) -> bool:
        return key in _SCHEDULE_BUFFERS or key in _UNUSED_KEYS or key.startswith(prefixes)

    return skip


def _with_ema_unet(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Replace UNet weights by their EMA copies (CompVis LitEma: ``model_ema.`` + name sans dots)."""
    unet_keys = [key for key in state if key.startswith(UNET_PREFIX)]
    ema_keys = {key: _EMA_PREFIX + key.removeprefix("model.").replace(".", "") for key in unet_keys}
    missing = [ema for ema in ema_keys.values() if ema not in state]
    if len(missing) == len(ema_keys):
        raise ModelLoadError(f"{where}: no EMA weights ({_EMA_PREFIX}*) to prefer")
    if missing:
        raise ModelLoadError(
            f"{where}: incomplete EMA weights, " + describe_keys("missing key", missing)
        )
    return {**state, **{key: state[ema] for key, ema in ema_keys.items()}}


def _stored_json(metadata: Mapping[str, str], name: str, where: str) -> dict[str, Any] | None:
    text = metadata.get(METADATA_PREFIX + name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ModelLoadError(
            f"{where}: malformed {METADATA_PREFIX}{name} metadata ({exc})"
        ) from None
    return value if isinstance(value, dict) else None


def _metadata_prediction(metadata: Mapping[str, str], where: str) -> PredictionType | None:
    value = metadata.get(METADATA_PREFIX + "prediction_type")
    return normalize_prediction_type(value) if value else None


def _yaml_prediction_type(path: Path) -> PredictionType | None:
    """``parameterization`` of a CompVis-style ``<stem>.yaml`` beside the checkpoint, if any."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    try:
        text = yaml.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ModelLoadError(f"{yaml.name}: cannot read ({one_line(exc)})") from None
    match = _YAML_PARAMETERIZATION.search(text)
    return normalize_prediction_type(match.group(1)) if match else None


def _bundle(
    spec: ModelFamily,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheduler: dict[str, Any],
    prediction: PredictionType,
    **provenance: Any,
) -> ModelBundle:
    # the diffusers version that wrote a folder describes that run, not the model
    scheduler = {k: v for k, v in scheduler.items() if k != "_diffusers_version"}
    scheduler["prediction_type"] = prediction
    return ModelBundle(
        family=spec.name,
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(scheduler),
        prediction_type=prediction,
        vae_scale_factor=float(vae.config.scaling_factor),
        scheduler_config=MappingProxyType(scheduler),
        clip_skip_default=spec.clip_skip_default,
        **provenance,
    )


# --- VAE files -------------------------------------------------------------------------------


def load_vae_file(
    path: Path, spec: ModelFamily, *, allow_pickle: bool, dtype: torch.dtype | None
) -> tuple[AutoencoderKL, str, str]:
    """A VAE from a file with CompVis keys (± ``first_stage_model.``) or diffusers keys.

    A full checkpoint works too: only its ``first_stage_model.*`` part is read. Returns the VAE,
    its name (file stem) and its short hash. The family's scaling factor is kept.
    """
    where = path.name
    state, _ = read_tensors(path, allow_pickle=allow_pickle)
    if any(key.startswith(VAE_PREFIX) for key in state):
        state = {
            k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)
        }
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", _EMA_PREFIX))}
    if any(".down_blocks." in key or ".up_blocks." in key for key in state):
        state = diffusers_vae_to_compvis(state)
    config = infer_vae_config(state, spec, where, prefix="")
    vae = empty_vae(config)
    keymap = vae_keymap(vae.state_dict(), len(config["block_out_channels"]), prefix="")
    check_coverage(state, [keymap], lambda key: False, where)
    return _fill(vae, keymap, state, dtype, where), path.stem, short_hash(path)


def diffusers_vae_to_compvis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict (new or pre-0.14 attention names) to CompVis."""
    ups = {int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")}
    levels = max(ups) + 1 if ups else 0
    out = {}
    for key, tensor in state.items():
        name = vae_key_to_compvis(key, levels)
        if is_vae_attention_weight(name) and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor
    return out


# --- diffusers folders -----------------------------------------------------------------------


def _load_folder(
    folder: Path,
    option: PredictionType | None,
    vae_path: Path | None,
    allow_pickle: bool,
    dtype: torch.dtype | None,
) -> ModelBundle:
    index = read_json(folder / "model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ModelLoadError(
            f"{folder.name}: an SDXL pipeline; emaki loads SD 1.x and SD 2.x models"
        )
    text_config = read_json(folder / "text_encoder" / "config.json")
    family = index.get("_emaki_family") or (
        "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"
    )
    spec = get_family(family)
    used: list[tuple[str, Path]] = []
    unet = _folder_network(folder, "unet", allow_pickle, dtype, used)
    text = _folder_network(folder, "text_encoder", allow_pickle, dtype, used, text_config)
    vae_name = vae_hash = None
    if vae_path is None:
        vae = _folder_network(folder, "vae", allow_pickle, dtype, used)
    else:
        vae, vae_name, vae_hash = load_vae_file(
            vae_path, spec, allow_pickle=allow_pickle, dtype=dtype
        )

    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = (
        read_json(scheduler_file)
        if scheduler_file.is_file()
        else config_dict(spec.scheduler_config)
    )
    stored = scheduler.get("prediction_type")
    prediction = option or (normalize_prediction_type(stored) if stored else spec.prediction_type)
    return _bundle(
        spec,
        unet=unet,
        vae=vae,
        text=text,
        tokenizer=_folder_tokenizer(folder, spec, text_config.get("model_type", "")),
        scheduler=scheduler,
        prediction=prediction,
        name=folder.name,
        hash=files_hash(used),
        source=folder,
        text_layers_skipped=spec.text_layers_skipped,
        vae_name=vae_name,
        vae_hash=vae_hash,
    )


def _folder_network(
    folder: Path,
    component: str,
    allow_pickle: bool,
    dtype: torch.dtype | None,
    used: list[tuple[str, Path]],
    config: dict[str, Any] | None = None,
) -> Any:
    """One network of a pipeline folder, built from its config.json and strictly filled."""
    config = config or read_json(folder / component / "config.json")
    where = f"{folder.name}/{component}"
    if component == "text_encoder":
        model = empty_text_encoder(config)
        provided = provided_weight_file(folder / component)
        if provided is not None:
            used.append((f"{component}/{provided.name}", provided))
            state = read_safetensors(provided)[0]
        else:
            state = _component_state(
                folder, component, ("model", "pytorch_model"), allow_pickle, used
            )
        if not any(k.startswith("text_model.") for k in model.state_dict()):
            # transformers >= 5.6 flattened CLIPTextModel; older saves say "text_model.*"
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        if "embeddings.position_ids" not in model.state_dict():
            state = {k: v for k, v in state.items() if k != "embeddings.position_ids"}
    else:
        model = empty_unet(config) if component == "unet" else empty_vae(config)
        state = _component_state(
            folder, component, ("diffusion_pytorch_model",), allow_pickle, used
        )
        if component == "vae":
            state = _modern_vae_names(state)
    return assemble(model, state, dtype=dtype, where=where)


def _component_state(
    folder: Path,
    component: str,
    stems: tuple[str, ...],
    allow_pickle: bool,
    used: list[tuple[str, Path]],
) -> dict[str, torch.Tensor]:
    """Weights of one pipeline component: safetensors (plain, sharded or fp16 variant), else .bin."""
    where = folder / component
    if not where.is_dir():
        raise ModelLoadError(f"{folder.name}: no {component}/ folder")
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (where / name).is_file():
                used.append((f"{component}/{name}", where / name))
                return read_safetensors(where / name)[0]
        shard_index = where / f"{stem}.safetensors.index.json"
        if shard_index.is_file():
            return _read_shards(where, shard_index, component, used)
    for stem in stems:
        for name in (f"{stem}.bin", f"{stem}.fp16.bin"):
            if (where / name).is_file():
                state = read_pickle(where / name, allow_pickle=allow_pickle)
                used.append((f"{component}/{name}", where / name))
                return state
    raise ModelLoadError(
        f"{folder.name}: no weights in {component}/ (expected {stems[0]}.safetensors)"
    )


def _read_shards(
    where: Path, shard_index: Path, component: str, used: list[tuple[str, Path]]
) -> dict[str, torch.Tensor]:
    weight_map = read_json(shard_index).get("weight_map", {})
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = where / shard
        if shard_path.parent != where:
            raise ModelLoadError(f"{shard_index.name}: shard {shard!r} is outside {where.name}/")
        used.append((f"{component}/{shard}", shard_path))
        state.update(read_safetensors(shard_path)[0])
    return state


_OLD_VAE_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def _modern_vae_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers < 0.14 VAE attention names (and 1x1-conv shapes) to today's linear layers."""
    out = {}
    for key, tensor in state.items():
        if ".mid_block.attentions." in key:
            for old, new in _OLD_VAE_ATTENTION.items():
                key = key.replace(old, new)
            if tensor.dim() == 4 and key.endswith(
                ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
            ):
                tensor = tensor.reshape(tensor.shape[0], -1)
        out[key] = tensor
    return out


def _folder_tokenizer(folder: Path, spec: ModelFamily, text_kind: str) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer (offline); the shipped CLIP one if a CLIP model's folder has none."""
    where = folder / "tokenizer"
    if not where.is_dir():
        if text_kind == "bert":
            raise ModelLoadError(f"{folder.name}: no tokenizer/ folder for its BERT text encoder")
        return load_clip_tokenizer(spec.tokenizer_pad)
    try:
        if text_kind == "bert":
            return BertTokenizerFast.from_pretrained(str(where), local_files_only=True)
        return CLIPTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as exc:  # missing vocab files, malformed JSON
        raise ModelLoadError(f"{folder.name}/tokenizer: cannot load ({one_line(exc)})") from None
