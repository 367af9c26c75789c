"""ModelBundle: one loaded Stable Diffusion model, everything a pipeline needs, as typed data.

The bundle is frozen (its fields cannot be reassigned) but the networks inside are ordinary
``torch.nn.Module``\\ s: patch clones of them, never the shared bundle (see the architecture notes).

Hashes, so that generation metadata can name the exact weights:

* a single file: A1111's new-style short hash, the first 10 hex digits of the file's SHA-256;
* a diffusers folder: the first 10 hex digits of SHA-256 over, for each weight file loaded
  (UNet, VAE, text encoder; shards included) in sorted order of its POSIX path relative to the
  folder, that path in UTF-8, a NUL byte, then the file's bytes;
* an in-memory bundle (e.g. :func:`~emaki.models.tiny.make_tiny_bundle`): the same over
  (key, dtype, shape, bytes) of every tensor, keys sorted.

``alphas_cumprod`` is float32 (shape ``(num_train_timesteps,)``), computed from the scheduler
config exactly as diffusers does, so emaki's sigmas match diffusers' schedulers bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emaki.models.families import ModelFamily, PredictionType, get_family


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A loaded model: the three networks, the tokenizer, the noise schedule and provenance.

    ``scheduler_config`` is a read-only mapping; ``SomeScheduler.from_config(dict(...))`` builds
    a diffusers scheduler from it for comparisons. ``text_layers_skipped`` is 1 for SD 2.x: the
    original OpenCLIP tower's last layer was dropped at load (SD 2.x uses the penultimate one), so
    the text encoder's final output is already the right conditioning and ``clip_skip_default``
    is 1 (no further skip) for both families. ``source`` is None for in-memory bundles.
    """

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: PreTrainedModel  # CLIPTextModel for SD; BertModel for emaki's default model
    tokenizer: PreTrainedTokenizerBase
    alphas_cumprod: torch.Tensor
    prediction_type: PredictionType
    vae_scale_factor: float
    name: str
    hash: str
    source: Path | None
    scheduler_config: Mapping[str, Any]
    clip_skip_default: int = 1
    text_layers_skipped: int = 0
    vae_name: str | None = None
    vae_hash: str | None = None

    @property
    def spec(self) -> ModelFamily:
        """The family's data (configs, rules) this bundle belongs to."""
        return get_family(self.family)

    @property
    def latent_downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD and for the tiny models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent space the UNet denoises (4 for SD)."""
        return int(self.vae.config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the UNet's weights."""
        return self.unet.dtype


def bundle_from_networks(
    family: str,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheduler_config: Mapping[str, Any],
    name: str,
) -> ModelBundle:
    """An in-memory bundle (no source file) from networks: tiny test models, models in training.

    The prediction type comes from ``scheduler_config``; the hash is taken over the weights.
    """
    from types import MappingProxyType

    from emaki.models.families import (
        alphas_cumprod_from_scheduler_config,
        normalize_prediction_type,
    )
    from emaki.models.files import tensors_hash

    spec = get_family(family)
    scheduler = dict(scheduler_config)
    tensors = {
        f"{part}.{key}": value
        for part, model in (("unet", unet), ("vae", vae), ("text", text_encoder))
        for key, value in model.state_dict().items()
    }
    return ModelBundle(
        family=spec.name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(scheduler),
        prediction_type=normalize_prediction_type(scheduler.get("prediction_type", "epsilon")),
        vae_scale_factor=float(vae.config.scaling_factor),
        name=name,
        hash=tensors_hash(tensors),
        source=None,
        scheduler_config=MappingProxyType(scheduler),
        clip_skip_default=spec.clip_skip_default,
        text_layers_skipped=spec.text_layers_skipped,
    )
