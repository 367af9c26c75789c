"""Tiny, randomly initialised models with the real architecture, for tests and benchmarks.

:func:`make_tiny_bundle` builds a :class:`ModelBundle` from :func:`~emaki.models.families.tiny_configs`
in a fraction of a second. The same ``(family, seed, prediction_type)`` always gives the same
weights (on the same torch build): initialisation runs under a forked, seeded global RNG, so the
caller's random state is left untouched.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from emaki.models.bundle import ModelBundle, bundle_from_networks
from emaki.models.families import (
    TinyConfigs,
    config_dict,
    get_family,
    normalize_prediction_type,
    tiny_configs,
)
from emaki.text.tokenizer import load_clip_tokenizer


def make_tiny_bundle(
    family: str,
    seed: int = 0,
    prediction_type: str = "epsilon",
    *,
    configs: TinyConfigs | None = None,
) -> ModelBundle:
    """A deterministic tiny model of ``family`` (``"sd1"`` or ``"sd2"``), float32, eval mode.

    The networks are random, so images are noise; what is real is every shape rule, key name,
    tokenizer and noise schedule, which is what pipelines, samplers and loaders are tested on.
    ``configs`` replaces :func:`tiny_configs` (e.g. a deeper UNet to cover more key-map cases).
    """
    spec = get_family(family)
    prediction = normalize_prediction_type(prediction_type)
    configs = configs or tiny_configs(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs.unet).eval()
        vae = AutoencoderKL.from_config(configs.vae).eval()
        text = CLIPTextModel(CLIPTextConfig.from_dict(configs.text_encoder)).eval()
    scheduler = {**config_dict(spec.scheduler_config), "prediction_type": prediction}
    return bundle_from_networks(
        spec.name,
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=load_clip_tokenizer(spec.tokenizer_pad),
        scheduler_config=scheduler,
        name=f"tiny-{spec.name}-seed{seed}",
    )
