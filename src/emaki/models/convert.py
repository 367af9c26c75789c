"""Convert a model between the CompVis single-file layout and a diffusers pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from emaki.errors import ModelSaveError
from emaki.models.loading import load_model
from emaki.models.saving import save_diffusers, save_single_file

ConvertTarget = Literal["diffusers", "single-file"]


def convert(
    src: str | Path,
    dst: str | Path,
    to: ConvertTarget,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    **load_opts: Any,
) -> Path:
    """Load ``src`` (any format :func:`load_model` reads) and write it to ``dst`` as ``to``.

    Weights keep their stored dtype unless ``dtype`` is given (e.g. ``torch.float16`` to halve the
    size), so a conversion without ``dtype`` is lossless. ``load_opts`` go to :func:`load_model`
    (``prediction_type``, ``vae_path``, ``allow_pickle``, ``prefer_ema``).
    """
    if to not in ("diffusers", "single-file"):
        raise ModelSaveError(f"unknown target format {to!r} (accepted: diffusers, single-file)")
    destination = Path(dst)
    if destination.exists() and not overwrite:
        # fail before spending seconds to minutes loading a large model
        raise ModelSaveError(
            f"{destination} already exists (choose another name, or pass --overwrite)"
        )
    load_opts.setdefault("dtype", None)
    bundle = load_model(src, **load_opts)
    if to == "diffusers":
        return save_diffusers(bundle, destination, dtype, overwrite=overwrite)
    return save_single_file(bundle, destination, dtype, overwrite=overwrite)
