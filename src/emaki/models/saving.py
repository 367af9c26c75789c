"""Write a :class:`ModelBundle` as a CompVis single file or as a diffusers pipeline folder.

Both writers are atomic (temporary sibling, then ``os.replace``), refuse to replace an existing
destination unless ``overwrite=True``, never modify the bundle, and store tensors byte for byte
(optionally cast to ``dtype``), so single file -> diffusers -> single file and diffusers -> single
file -> diffusers round trips reproduce every tensor exactly.

A single file carries emaki metadata in its safetensors header (all strings): ``emaki.family``,
``emaki.prediction_type`` and the JSON configs ``emaki.unet_config``, ``emaki.vae_config``,
``emaki.text_encoder_config``, ``emaki.scheduler_config``. With them a model reloads with exactly
its configs (a tiny model, or fields shapes cannot tell); without them, configs are inferred.

Caveat for SD 2.x: the bundle holds the text layers SD 2.x uses (23 of OpenCLIP's 24, see
:mod:`emaki.models.families`); a single file written from it has 23 resblocks and no
``text_projection``, as diffusers' own exports do.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import save_file

from emaki.errors import ModelSaveError
from emaki.models.bundle import ModelBundle
from emaki.models.detect import METADATA_PREFIX
from emaki.models.files import atomic_write_file, atomic_write_folder
from emaki.models.keymap import KeyMap, clip_keymap, openclip_keymap, unet_keymap, vae_keymap

FORMAT_VERSION = "1"
_VOLATILE_TEXT_KEYS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


def bundle_keymaps(bundle: ModelBundle) -> dict[str, KeyMap]:
    """The UNet, VAE and text-encoder key maps of the bundle's networks."""
    unet, vae, text = bundle.unet, bundle.vae, bundle.text_encoder
    text_map = (
        clip_keymap(text.state_dict())
        if bundle.spec.text_encoder_kind == "clip"
        else openclip_keymap(text.state_dict())
    )
    return {
        "unet": unet_keymap(
            unet.state_dict(), unet.config.layers_per_block, unet.config.up_block_types
        ),
        "vae": vae_keymap(vae.state_dict(), len(vae.config.block_out_channels)),
        "text": text_map,
    }


def bundle_to_compvis(
    bundle: ModelBundle, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The bundle's weights in the CompVis single-file layout (floating tensors cast if ``dtype``)."""
    if type(bundle.text_encoder).__name__ != "CLIPTextModel":
        raise ModelSaveError(
            f"{bundle.name} conditions on a {type(bundle.text_encoder).__name__}; the CompVis "
            "single-file layout holds CLIP text encoders only: keep it as a diffusers folder"
        )
    maps = bundle_keymaps(bundle)
    tensors: dict[str, torch.Tensor] = {}
    for name, model in (("unet", bundle.unet), ("vae", bundle.vae), ("text", bundle.text_encoder)):
        tensors.update(
            maps[name].to_compvis({k: v.detach() for k, v in model.state_dict().items()})
        )
    return {key: _cast(tensor, dtype).contiguous() for key, tensor in tensors.items()}


def single_file_metadata(bundle: ModelBundle) -> dict[str, str]:
    """The safetensors header metadata emaki writes (see the module docstring)."""
    return {
        "format": "pt",
        METADATA_PREFIX + "format_version": FORMAT_VERSION,
        METADATA_PREFIX + "family": bundle.family,
        METADATA_PREFIX + "prediction_type": bundle.prediction_type,
        METADATA_PREFIX + "unet_config": _json(public_config(bundle.unet.config)),
        METADATA_PREFIX + "vae_config": _json(public_config(bundle.vae.config)),
        METADATA_PREFIX + "text_encoder_config": _json(text_config_dict(bundle)),
        METADATA_PREFIX + "scheduler_config": _json(dict(bundle.scheduler_config)),
    }


def save_single_file(
    bundle: ModelBundle,
    path: str | Path,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the bundle as one CompVis-layout ``.safetensors`` file with emaki metadata."""
    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise ModelSaveError(f"{target.name}: single files are written as .safetensors only")
    tensors = bundle_to_compvis(bundle, dtype)
    metadata = single_file_metadata(bundle)
    return atomic_write_file(
        target, lambda temp: save_file(tensors, str(temp), metadata), overwrite=overwrite
    )


def save_diffusers(
    bundle: ModelBundle,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (safetensors weights, no safety checker).

    ``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)`` opens it; emaki
    records the family in ``model_index.json`` under ``_emaki_family`` (diffusers ignores keys
    that start with an underscore).
    """
    return atomic_write_folder(
        Path(folder), lambda temp: _write_folder(bundle, temp, dtype), overwrite=overwrite
    )


def _write_folder(bundle: ModelBundle, root: Path, dtype: torch.dtype | None) -> None:
    for name, model in (("unet", bundle.unet), ("vae", bundle.vae)):
        (root / name).mkdir()
        model.save_config(root / name)
        _save_weights(
            model.state_dict(), root / name / "diffusion_pytorch_model.safetensors", dtype
        )
    (root / "text_encoder").mkdir()
    config = copy.deepcopy(bundle.text_encoder.config)
    config.dtype = dtype or bundle.text_encoder.dtype
    config.save_pretrained(root / "text_encoder")
    _save_weights(
        bundle.text_encoder.state_dict(), root / "text_encoder" / "model.safetensors", dtype
    )
    bundle.tokenizer.save_pretrained(str(root / "tokenizer"))
    (root / "scheduler").mkdir()
    scheduler = {"_diffusers_version": diffusers.__version__, **dict(bundle.scheduler_config)}
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(root / "model_index.json", _model_index(bundle, scheduler["_class_name"]))


def _model_index(bundle: ModelBundle, scheduler_class: str) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "_emaki_family": bundle.family,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", type(bundle.text_encoder).__name__],
        "tokenizer": ["transformers", type(bundle.tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _save_weights(state: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    tensors = {key: _cast(value.detach(), dtype).contiguous() for key, value in state.items()}
    save_file(tensors, str(path), {"format": "pt"})


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if not dtype.is_floating_point:
        raise ModelSaveError(f"cannot save weights as {dtype} (a floating dtype is needed)")
    return tensor.to(dtype)


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its private ``_*`` entries, as plain JSON-ready data."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def text_config_dict(bundle: ModelBundle) -> dict[str, Any]:
    """The text encoder's config without fields that describe the saving run, not the model."""
    config = bundle.text_encoder.config.to_dict()
    return {k: v for k, v in config.items() if k not in _VOLATILE_TEXT_KEYS}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
