"""Cheap clones of networks that share every tensor with the original.

A clone is a new module tree (new ``nn.Module`` objects, so attributes such as attention
processors or replaced parameters can differ) whose parameters and buffers are the original's
tensor objects. Replacing a parameter on the clone (:func:`replace_parameter`) leaves the
original's parameter untouched, which is how adapters are applied per request without copying a
multi-gigabyte model and without ever patching the shared one.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def share_clone(module: M) -> M:
    """A copy of ``module``'s tree that shares all parameters and buffers (no tensor copied)."""
    memo: dict[int, object] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def replace_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter ``name`` (dotted path) of ``root`` to a new frozen parameter holding ``value``.

    Only the owning submodule's attribute is rebound; the old tensor is not written to.
    """
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    old = getattr(owner, attr)
    if not isinstance(old, nn.Parameter):
        raise KeyError(f"{name} is not a parameter")
    if old.shape != value.shape:
        raise ValueError(
            f"{name}: new value has shape {tuple(value.shape)}, not {tuple(old.shape)}"
        )
    setattr(owner, attr, nn.Parameter(value.to(old.dtype), requires_grad=False))
