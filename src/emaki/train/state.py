"""Training checkpoints as safetensors + JSON, written atomically, never pickled.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding the trainable weights
(``model.safetensors``), the EMA weights (``ema.safetensors``), the optimizer's tensors
(``optimizer.safetensors``) and everything else (step, optimizer hyperparameters, LR-scheduler
and data-order state, EMA counters) in ``state.json``. It is written into a temporary sibling and
renamed into place, so a crash never leaves a half-written checkpoint; only the newest ``keep``
are kept. Weights are checked to be finite before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emaki.errors import EmakiError
from emaki.models.files import atomic_write_folder

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(EmakiError):
    """A training checkpoint is missing, damaged or does not match the run."""


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    meta: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and prune older ones; refuses non-finite weights."""
    model = _contiguous(model)
    if not all_finite(model) or (ema is not None and not all_finite(ema)):
        raise CheckpointError(f"weights at step {step} are not finite; no checkpoint written")
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    dest = ckdir / f"step-{step:08d}"

    def write(tmp: Path) -> None:
        save_file(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
        save_file(_contiguous(opt_tensors), str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps({**meta, "step": step, "optimizer": opt_meta}, indent=1, sort_keys=True)
        )

    atomic_write_folder(dest, write, overwrite=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder: ``model``, ``ema`` (or None), ``optimizer`` and ``meta``."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        ema = (
            load_file(str(path / "ema.safetensors"))
            if (path / "ema.safetensors").is_file()
            else None
        )
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {e}") from e
    optimizer = optimizer_from_flat(opt_tensors, meta.pop("optimizer"))
    return {"model": model, "ema": ema, "optimizer": optimizer, "meta": meta}
