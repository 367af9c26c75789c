"""Model families, loading, saving and conversion of Stable Diffusion 1.x / 2.x models.

Public API (imported lazily: ``import emaki.models`` does not import torch or diffusers)::

    from emaki.models import load_model, make_tiny_bundle, save_diffusers, save_single_file
    from emaki.models.convert import convert
    bundle = load_model("v1-5-pruned-emaonly.safetensors")          # -> ModelBundle
    tiny = make_tiny_bundle("sd1", seed=0)                          # tests and benchmarks

``convert`` is not re-exported here: the package attribute ``emaki.models.convert`` is the
module of that name, which Python binds on import and a lazy re-export would be shadowed by.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emaki.models.bundle import ModelBundle
    from emaki.models.families import FAMILIES, ModelFamily, get_family, tiny_configs
    from emaki.models.loading import load_model
    from emaki.models.saving import save_diffusers, save_single_file
    from emaki.models.tiny import make_tiny_bundle

_EXPORTS = {
    "ModelBundle": "emaki.models.bundle",
    "FAMILIES": "emaki.models.families",
    "ModelFamily": "emaki.models.families",
    "get_family": "emaki.models.families",
    "tiny_configs": "emaki.models.families",
    "load_model": "emaki.models.loading",
    "save_diffusers": "emaki.models.saving",
    "save_single_file": "emaki.models.saving",
    "make_tiny_bundle": "emaki.models.tiny",
}

__all__ = [
    "FAMILIES",
    "ModelBundle",
    "ModelFamily",
    "get_family",
    "load_model",
    "make_tiny_bundle",
    "save_diffusers",
    "save_single_file",
    "tiny_configs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emaki.models' has no attribute {name!r}")
    return getattr(import_module(module), name)
