"""LoRA files from kohya's sd-scripts / the A1111 web UI and from diffusers / peft, applied to clones.

A LoRA adapts a Linear or Conv2d layer with weight ``W`` by a low-rank update::

    W' = W + multiplier * (alpha / rank) * up @ down

``down`` is ``[rank, in]`` (a conv: ``[rank, in, kh, kw]``, "LoCon"/"C3Lier" for 3x3 kernels),
``up`` is ``[out, rank]`` (a conv: ``[out, rank, 1, 1]``). A LyCORIS Tucker ("cp") LoCon adds
``mid`` ``[rank, rank, kh, kw]`` between a 1x1 ``down`` and a 1x1 ``up``. A missing alpha means
``alpha = rank`` (scale 1). :func:`read_lora` normalises every format into :class:`LoraModule`\\ s
that name a layer of one model; :func:`apply_loras` merges them into weight-sharing clones
(:mod:`emaki.adapters.clone`) in float32 and never writes the shared model's tensors.

Formats, detected from the keys:

* ``kohya`` (sd-scripts, A1111, most files in the wild):
  ``lora_unet_<module path, "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (a scalar) and ``lora_te_<...>`` for the text encoder. UNet names are diffusers module paths
  (``lora_unet_down_blocks_0_attentions_0_proj_in``) or, from some trainers, CompVis/LDM ones
  (``lora_unet_input_blocks_1_1_proj_in``); text-encoder names carry transformers'
  ``text_model_`` prefix, which is optional here (transformers 5 dropped that submodule).
  ``lora_mid.weight`` (Tucker LoCon) and A1111's ``lora_A``/``lora_B`` spelling are accepted.
* ``diffusers`` (older diffusers): ``unet.<path>.lora.down.weight`` / ``.lora.up.weight``,
  ``text_encoder.<path>.lora_linear_layer.down.weight``, and the attention-processor files of
  ``save_attn_procs`` (``<path>.processor.to_q_lora.down.weight``; ``to_out_lora`` is
  ``to_out.0``, or ``out_proj`` in the text encoder).
* ``peft`` (diffusers >= 0.24 ``save_lora_weights``, peft): ``<prefix>.<path>.lora_A.weight`` /
  ``.lora_B.weight`` with prefix ``unet.``, ``text_encoder.``, ``base_model.model.`` or none.

Alpha of the diffusers formats: a ``<path>.alpha`` tensor if present; else diffusers' safetensors
metadata ``lora_adapter_metadata`` (JSON of peft's ``LoraConfig``, keys prefixed ``unet.`` /
``text_encoder.``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``); else, for peft's
``adapter_model.safetensors``, the ``adapter_config.json`` beside it; else ``alpha = rank``.

Refused with a one-line :class:`LoraError` naming the file and the first offending key: keys
that name no layer of this model, SDXL keys (``lora_te1_``/``lora_te2_``), shapes that do not fit
(a LoRA for another model family), and network types other than LoRA/LoCon (LoHa, LoKr, IA3, OFT,
DoRA, GLoRA, full/diff, norm). Not read: OpenCLIP-named SD 2 text-encoder keys
(``lora_te_model_transformer_resblocks_*``); LoRAs on a 9-channel inpainting ``conv_in``.

``LoraFile.hash`` is what A1111 writes in ``Lora hashes``: the first 12 hex digits of the
kohya/"addnet" SHA-256 of a safetensors file, taken over the bytes after the JSON header (so
editing metadata keeps it), or of the whole file for a pickle. A1111 prefers the
``sshs_model_hash`` that kohya writes into the metadata, which kohya computes the same way; emaki
always hashes the bytes, so a stale or forged value cannot stand for other weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emaki.adapters.clone import replace_parameter, share_clone
from emaki.errors import ModelLoadError
from emaki.models.bundle import ModelBundle
from emaki.models.files import looks_pickled, read_json, read_tensors, sha256_file

_HASH_CHUNK = 1 << 20
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_NETWORK_PART = {"unet": "unet", "text": "text_encoder"}  # target prefix -> diffusers component

# Tensor-name parts of other network types (kohya: after the first "."; diffusers: last two).
_UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("oft_", "OFT"),
    ("on_input", "IA3"),
    ("w_norm", "norm"),
    ("b_norm", "norm"),
    ("a1.weight", "GLoRA"),
    ("b1.weight", "GLoRA"),
    ("lora_embedding_", "embedding LoRA"),
)
_KOHYA_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "alpha": "alpha",
}
# Longest first: ".lora.down.weight" also ends with ".down.weight".
_DIFFUSERS_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    (".down.weight", "down", "diffusers"),  # only after "<name>_lora" (attention processors)
    (".up.weight", "up", "diffusers"),
    (".alpha", "alpha", ""),
)
_TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraError(ModelLoadError):
    """A LoRA file cannot be used with this model (unknown keys, wrong shapes, other type)."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer, normalised.

    ``target`` is ``"unet.<module path>"`` or ``"text.<module path>"`` (as in
    ``named_modules()``); ``shape`` is that layer's weight shape (set by :func:`read_lora`; the
    update is reshaped to it, which lets a 1x1-conv LoRA adapt a Linear layer and back).
    """

    target: str
    down: Tensor
    up: Tensor
    alpha: float
    mid: Tensor | None = None
    shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        """The LoRA's rank (rows of ``down``)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor between ``up @ down`` and the weight update."""
        return float(self.alpha) / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """The weight update ``scale * up @ down`` in float32, shaped like the layer's weight."""
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32).reshape(self.up.shape[0], -1)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=torch.float32)
            update = torch.einsum("on,nmhw,mi->oihw", up, mid, down.reshape(down.shape[0], -1))
        else:
            update = (up @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])
        update = update * self.scale
        return update.reshape(self.shape) if self.shape is not None else update


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read for one model: its layers, A1111 short hash and detected format."""

    name: str
    path: Path | None
    hash: str
    modules: tuple[LoraModule, ...]
    format: str  # "kohya" | "diffusers" | "peft"


# --- reading -----------------------------------------------------------------------------------


def read_lora(path: Path, bundle: ModelBundle, *, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file and map every key to a layer of ``bundle`` (see the module docstring)."""
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle=allow_pickle)
    index = _LayerIndex(bundle)
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl"):
        raise LoraError(f"{path.name}: an SDXL LoRA (metadata ss_base_model_version); {index.what}")
    if any(key.split(".", 1)[0].startswith("lora_") for key in tensors):
        modules, fmt = _read_kohya(path, tensors, index), "kohya"
    else:
        modules, fmt = _read_diffusers(path, tensors, metadata, index)
    if not modules:
        raise LoraError(f"{path.name}: the file holds no LoRA layers")
    return LoraFile(path.stem, path, _a1111_hash(path), tuple(modules), fmt)


class _LayerIndex:
    """The adaptable layers of one bundle, by target name and by kohya name."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.what = f"this model is {bundle.family}"
        self.layers: dict[str, nn.Module] = {}
        self.kohya: dict[str, str | None] = {}
        for name, module in _adaptable(bundle.unet):
            self._add("unet", name, module, [name, *_compvis_names(bundle.unet, name)])
        for name, module in _adaptable(bundle.text_encoder):
            bare = name.removeprefix("text_model.")
            self._add("text", name, module, [bare, f"text_model.{bare}"])

    def _add(self, net: str, name: str, module: nn.Module, spellings: list[str]) -> None:
        target = f"{net}.{name}"
        self.layers[target] = module
        prefix = "lora_unet_" if net == "unet" else "lora_te_"
        for spelling in spellings:
            key = prefix + spelling.replace(".", "_")
            # Two layers flattening to one kohya name would be ambiguous: refuse such a key.
            self.kohya[key] = target if self.kohya.get(key, target) == target else None


def _adaptable(network: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _compvis_names(unet: nn.Module, name: str) -> list[str]:
    """The CompVis (LDM) module name of a diffusers UNet module, if it has one."""
    from emaki.models.keymap import unet_key_to_compvis

    config = unet.config  # type: ignore[attr-defined]
    layers = config.layers_per_block
    if not isinstance(layers, int):
        return []
    up_attention = ["CrossAttn" in block for block in config.up_block_types]
    try:
        compvis = unet_key_to_compvis(f"{name}.weight", layers, up_attention)
    except ModelLoadError:
        return []
    return [compvis.removesuffix(".weight")]


def _refuse_type(path: Path, key: str, suffix: str) -> None:
    """Refuse keys of other network types, recognised by the tensor-name ``suffix`` of ``key``."""
    for marker, kind in _UNSUPPORTED_MARKERS:
        if marker in suffix:
            raise LoraError(
                f"{path.name}: {kind} networks are not supported, only LoRA and LoCon (key {key})"
            )


# kohya -----------------------------------------------------------------------------------------


def _read_kohya(path: Path, tensors: Mapping[str, Tensor], index: _LayerIndex) -> list[LoraModule]:
    groups: dict[str, dict[str, Tensor]] = {}
    first_key: dict[str, str] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        _refuse_type(path, key, suffix)
        part = _KOHYA_PARTS.get(suffix)
        if part is None:
            kind = "IA3" if suffix == "weight" else None
            if kind or suffix in ("diff", "diff_b"):
                raise LoraError(
                    f"{path.name}: {kind or 'full (diff)'} networks are not supported, only LoRA "
                    f"and LoCon (key {key})"
                )
            raise LoraError(f"{path.name}: unknown LoRA key {key}")
        if part in groups.setdefault(name, {}):
            raise LoraError(f"{path.name}: two {part} tensors for one layer (key {key})")
        groups[name][part] = tensor
        first_key.setdefault(name, key)
    modules = []
    for name, parts in groups.items():
        target = _kohya_target(path, name, first_key[name], index)
        modules.append(_make_module(path, first_key[name], target, parts, None, index))
    return modules


def _kohya_target(path: Path, name: str, key: str, index: _LayerIndex) -> str:
    if name.startswith(("lora_te1_", "lora_te2_")):
        raise LoraError(f"{path.name}: an SDXL LoRA ({index.what}; key {key})")
    target = index.kohya.get(name)
    if target is None:
        problem = "is ambiguous" if name in index.kohya else "names no layer"
        raise LoraError(f"{path.name}: key {key} {problem} of this model ({index.what})")
    return target


# diffusers / peft ------------------------------------------------------------------------------


def _read_diffusers(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], index: _LayerIndex
) -> tuple[list[LoraModule], str]:
    groups: dict[str, dict[str, Tensor]] = {}  # by target layer: one spelling per part
    origin: dict[str, tuple[str, str]] = {}  # target -> (first key, module path in the file)
    formats: set[str] = set()
    for key, tensor in tensors.items():
        _refuse_type(path, key, ".".join(key.split(".")[-2:]))
        nets, rest = _split_network(path, key)
        module_path, part, fmt = _split_suffix(path, key, rest)
        target = _diffusers_target(path, key, nets, module_path, index)
        formats.add(fmt)
        if part in groups.setdefault(target, {}):
            raise LoraError(f"{path.name}: two {part} tensors for layer {target} (key {key})")
        groups[target][part] = tensor
        origin.setdefault(target, (key, module_path))
    configs = _alpha_configs(path, metadata)
    modules = []
    for target, parts in groups.items():
        key, module_path = origin[target]
        config = configs.get(_NETWORK_PART[target.split(".", 1)[0]], {})
        modules.append(_make_module(path, key, target, parts, (config, module_path), index))
    return modules, "peft" if "peft" in formats else "diffusers"


def _split_network(path: Path, key: str) -> tuple[str, str]:
    """Which networks a diffusers key may address ("unet", "text" or "unet,text"), and the rest."""
    for prefix, nets in (("unet.", "unet"), ("text_encoder.", "text")):
        if key.startswith(prefix):
            return nets, key[len(prefix) :]
    if key.startswith("text_encoder_2."):
        raise LoraError(f"{path.name}: an SDXL LoRA (second text encoder; key {key})")
    return "unet,text", key.removeprefix("base_model.model.")


def _split_suffix(path: Path, key: str, rest: str) -> tuple[str, str, str]:
    for suffix, part, fmt in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix):
            module_path = rest[: -len(suffix)]
            if suffix in (".down.weight", ".up.weight") and not module_path.endswith("_lora"):
                continue
            return module_path.replace(".processor.", "."), part, fmt
    raise LoraError(f"{path.name}: unknown LoRA key {key}")


def _diffusers_target(path: Path, key: str, nets: str, module_path: str, index: _LayerIndex) -> str:
    for net in nets.split(","):
        for candidate in _path_candidates(net, module_path):
            if f"{net}.{candidate}" in index.layers:
                return f"{net}.{candidate}"
    raise LoraError(f"{path.name}: key {key} names no layer of this model ({index.what})")


def _path_candidates(net: str, module_path: str) -> list[str]:
    parent, _, leaf = module_path.rpartition(".")
    paths = [module_path]
    if leaf.endswith("_lora"):  # attention-processor naming: to_q_lora, to_out_lora
        base = leaf.removesuffix("_lora")
        if net == "unet":
            base = "to_out.0" if base == "to_out" else base
        else:
            base = _TEXT_ATTENTION.get(base, base)
        paths = [f"{parent}.{base}" if parent else base]
    if net == "text":
        paths = [v for p in paths for v in (p, p.removeprefix("text_model."), f"text_model.{p}")]
    return paths


def _alpha_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """peft LoraConfig fields per diffusers component ("unet", "text_encoder"), where known."""
    raw: dict[str, Any] | None = None
    if _ADAPTER_METADATA_KEY in metadata:
        try:
            raw = json.loads(metadata[_ADAPTER_METADATA_KEY])
        except ValueError:
            raise LoraError(f"{path.name}: unreadable {_ADAPTER_METADATA_KEY} metadata") from None
    elif path.name.startswith("adapter_model.") and (path.parent / "adapter_config.json").is_file():
        raw = read_json(path.parent / "adapter_config.json")
    if not isinstance(raw, dict):
        return {}
    components = tuple(_NETWORK_PART.values())
    if not any(k.startswith(tuple(f"{c}." for c in components)) for k in raw):
        return {c: raw for c in components}
    return {
        c: {k[len(c) + 1 :]: v for k, v in raw.items() if k.startswith(f"{c}.")} for c in components
    }


def _config_alpha(config: Mapping[str, Any], module_path: str, rank: int) -> float | None:
    """Alpha from a peft LoraConfig (pattern first, as peft matches them), scaled for rsLoRA."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = value
            break
    if alpha is None:
        return None
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # peft scales by alpha / sqrt(rank)
    return float(alpha)


# building and checking one module ---------------------------------------------------------------


def _make_module(
    path: Path,
    key: str,
    target: str,
    parts: Mapping[str, Tensor],
    config: tuple[Mapping[str, Any], str] | None,
    index: _LayerIndex,
) -> LoraModule:
    for needed in ("down", "up"):
        if needed not in parts:
            raise LoraError(f"{path.name}: the {needed} weight of a layer is missing (key {key})")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    shape = tuple(index.layers[target].weight.shape)
    problem = _shape_problem(down, up, mid, shape)
    if problem:
        raise LoraError(
            f"{path.name}: {problem} for layer {target} of shape {list(shape)} "
            f"(key {key}); a LoRA for another model family? ({index.what})"
        )
    rank = int(down.shape[0])
    alpha = _alpha_value(path, key, parts.get("alpha"))
    if alpha is None and config is not None:
        if config[0].get("use_dora"):
            raise LoraError(f"{path.name}: DoRA networks are not supported, only LoRA and LoCon")
        alpha = _config_alpha(config[0], config[1], rank)
    return LoraModule(target, down, up, float(rank if alpha is None else alpha), mid, shape)


def _alpha_value(path: Path, key: str, alpha: Tensor | None) -> float | None:
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise LoraError(f"{path.name}: alpha is not a single number (key {key})")
    return float(alpha.reshape(-1)[0])


def _shape_problem(down: Tensor, up: Tensor, mid: Tensor | None, weight: tuple[int, ...]) -> str:
    """Why ``up @ (mid) @ down`` cannot update a weight of shape ``weight`` ("" if it can)."""
    if not all(t.is_floating_point() for t in (down, up, *([mid] if mid is not None else []))):
        return "LoRA weights are not floating point"
    if (
        down.dim() not in (2, 4)
        or up.dim() not in (2, 4)
        or (up.dim() == 4 and up.shape[2:] != (1, 1))
    ):
        return f"LoRA weights of shapes {list(down.shape)} / {list(up.shape)} are not a LoRA"
    if up.shape[1] != (mid.shape[0] if mid is not None else down.shape[0]):
        return f"LoRA ranks differ ({list(down.shape)} / {list(up.shape)})"
    kernel = tuple(down.shape[2:])
    if mid is not None:
        if mid.dim() != 4 or mid.shape[1] != down.shape[0] or kernel not in ((), (1, 1)):
            return f"a Tucker LoRA of shapes {list(down.shape)} / {list(mid.shape)} is not valid"
        kernel = tuple(mid.shape[2:])
    natural = (int(up.shape[0]), int(down.shape[1]))
    if natural != weight[:2]:
        return f"the LoRA maps {natural[1]} to {natural[0]} channels"
    pointwise = all(k == 1 for k in kernel) and all(k == 1 for k in weight[2:])
    if kernel != weight[2:] and not pointwise:
        return f"the LoRA's kernel is {list(kernel)}"
    return ""


# --- hashes --------------------------------------------------------------------------------------


def _a1111_hash(path: Path) -> str:
    """A1111's short LoRA hash (12 hex digits); see the module docstring."""
    if looks_pickled(path):
        return sha256_file(path)[:12]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# --- applying ------------------------------------------------------------------------------------


def apply_loras(bundle: ModelBundle, loras: Sequence[tuple[LoraFile, float, float]]) -> ModelBundle:
    """A new bundle whose networks are clones with ``W + sum(multiplier * delta)`` merged in.

    ``loras`` holds ``(file, text-encoder multiplier, UNet multiplier)``. The sum is taken in
    float32 and cast back to each weight's dtype; layers no LoRA touches (and every layer of a
    network whose multipliers are all 0) keep sharing the input bundle's tensors, which are never
    written. An empty ``loras`` returns ``bundle`` itself.
    """
    if not loras:
        return bundle
    networks = {"unet": bundle.unet, "text": bundle.text_encoder}
    deltas: dict[str, dict[str, Tensor]] = {"unet": {}, "text": {}}
    for lora, te_multiplier, unet_multiplier in loras:
        for module in lora.modules:
            net, name = module.target.split(".", 1)
            multiplier = float(te_multiplier if net == "text" else unet_multiplier)
            if multiplier == 0.0:
                continue
            weight = _target_weight(lora, module, networks[net], name)
            update = module.delta(device=weight.device) * multiplier
            if update.numel() != weight.numel():
                raise LoraError(f"LoRA {lora.name}: its update does not fit {module.target}")
            previous = deltas[net].get(name)
            deltas[net][name] = update if previous is None else previous + update
    patched = {net: _patched(networks[net], deltas[net]) for net in networks}
    return dataclasses.replace(bundle, unet=patched["unet"], text_encoder=patched["text"])


def _target_weight(lora: LoraFile, module: LoraModule, network: nn.Module, name: str) -> Tensor:
    try:
        layer = network.get_submodule(name)
    except AttributeError:
        layer = None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or (
        module.shape is not None and tuple(weight.shape) != module.shape
    ):
        raise LoraError(
            f"LoRA {lora.name} was read for another model: it has no layer {module.target}"
        )
    return weight


def _patched(network: nn.Module, deltas: Mapping[str, Tensor]) -> nn.Module:
    if not deltas:
        return network
    clone = share_clone(network)
    with torch.no_grad():
        for name, update in deltas.items():
            weight = clone.get_submodule(name).weight
            merged = weight.to(torch.float32) + update.reshape(weight.shape)
            replace_parameter(clone, f"{name}.weight", merged.to(weight.dtype))
    return clone
