"""Checkpoint merger: A1111's "Checkpoint Merger" tab as a function (``emaki merge`` on the CLI).

Methods (alpha = A1111's "multiplier", any finite number)::

    weighted_sum       (1 - alpha) * A + alpha * B
    add_difference     A + alpha * (B - C)
    no_interpolation   A unchanged (to bake in a VAE, convert to fp16 or discard weights)

Inputs are SD 1.x / 2.x models: CompVis single files (safetensors; ``.ckpt``/``.pt``/``.bin``
only with ``allow_pickle``, read through ``torch.load(weights_only=True)``) or diffusers folders,
which are loaded by emaki's loader and turned into CompVis keys by its key map. The output is one
CompVis-layout ``.safetensors`` file that :func:`emaki.models.loading.load_model` opens.

Which tensors are merged follows A1111 (``modules/extras.py`` ``run_modelmerger``):

* a key of A is merged when B has it and its name contains ``model`` (every network key does;
  DDPM schedule buffers such as ``alphas_cumprod`` do not and are copied from A); non-floating
  tensors (``position_ids``, EMA ``num_updates``) are copied from A;
* keys only in A are copied; keys only in B (or C) are dropped; with add_difference, a key of
  A and B that C lacks is copied from A (A1111 takes the difference as zero there);
* EMA copies (``model_ema.*``) are treated like any other weight, as A1111 does: merged when both
  A and B have them, copied from A when only A has them. emaki's loader ignores them unless asked
  for (``prefer_ema``), so they cost space only; ``--discard 'model_ema'`` drops them;
* inpainting: when A's tensor has 9 (inpainting) or 8 (instruct-pix2pix) input channels where B's
  has 4, with every other dimension equal (the UNet's first convolution), the first 4 channels
  are merged and the extra ones kept from A. The other way round (B the inpainting model) is an
  error, as in A1111: A must be the inpainting model.

Anything else that does not fit is a one-line error naming the key: models of different families
(SD 1.x with SD 2.x), a shape mismatch, a VAE whose keys or shapes are not A's. All checks run
before the output is opened, and the output is written to a temporary sibling and renamed, so a
failure never leaves a partial file.

Numerics and memory: each merged tensor is computed in float32 from the inputs' tensors, read
one key at a time (safetensors inputs are memory-mapped, never loaded whole), and written to the
output immediately: one tensor of each input is in memory at a time, not three models.
Output dtype: ``fp32`` / ``fp16`` cast every floating tensor; ``keep`` gives each tensor A's
dtype for that key (the VAE file's dtype for VAE keys A lacks).

``bake_vae``: the ``first_stage_model.*`` tensors are replaced by a VAE file's (CompVis keys with
or without ``first_stage_model.``, or diffusers ``AutoencoderKL`` keys, or a diffusers VAE
folder); A1111 does the same after merging. ``discard``: a regular expression; every output key
it matches (``re.search``) is dropped, as A1111's "Discard weights".

Metadata (safetensors header, all strings):

* ``sd_merge_recipe`` (JSON): A1111's fields (``type``, ``primary_model_hash``,
  ``secondary_model_hash``, ``tertiary_model_hash`` as full SHA-256, ``interp_method``,
  ``multiplier``, ``save_as_half``, ``bake_in_vae``, ``discard_weights``, ``is_inpainting``,
  ``is_instruct_pix2pix``) with ``type: "emaki"``, plus emaki's ``method``, ``alpha``, ``models``
  (``{"A": {"name", "hash"}, ...}`` with 10-digit short hashes), ``vae``, ``dtype``, ``discard``,
  ``emaki_version``;
* ``sd_merge_models`` (JSON): as A1111 writes it, ``{sha256: {"name", "legacy_hash",
  "sd_merge_recipe"}}`` for each input, where ``sd_merge_recipe`` is that input's own recipe (or
  null) and the inputs' own ``sd_merge_models`` entries are carried over, so the history of merges
  of merges is kept. A1111 keys it by the full SHA-256 of the file; a diffusers folder, which has
  no such hash, is keyed by emaki's folder hash (10 digits) and has no ``legacy_hash``;
* ``format: "pt"`` and emaki's ``emaki.*`` entries (family, prediction type, network configs;
  see :mod:`emaki.models.saving`): taken from A when A is a diffusers folder or an emaki file,
  otherwise the family and, if a ``.yaml`` beside A says so, the prediction type.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from emaki.errors import EmakiError, InvalidRequestError, ModelLoadError, ModelSaveError
from emaki.models.detect import METADATA_PREFIX, detect_family
from emaki.models.files import (
    atomic_write_file,
    check_destination,
    looks_pickled,
    one_line,
    read_pickle,
    read_tensors,
)
from emaki.models.keymap import VAE_PREFIX, is_vae_attention_weight

Method = Literal["weighted_sum", "add_difference", "no_interpolation"]
DType = Literal["fp32", "fp16", "keep"]
METHODS: tuple[str, ...] = ("weighted_sum", "add_difference", "no_interpolation")
DTYPES: tuple[str, ...] = ("fp32", "fp16", "keep")
#: A1111's names of the methods (its UI labels, and ``interp_method`` in its recipes).
A1111_METHOD_NAMES = {
    "weighted_sum": "Weighted sum",
    "add_difference": "Add difference",
    "no_interpolation": "No interpolation",
}
#: Keys A1111 never merges (``checkpoint_dict_skip_on_merge``).
_SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
#: Input channels of a first convolution that A1111 merges with a 4-channel one.
_EXTRA_CHANNELS = {9: "inpainting", 8: "instruct-pix2pix"}
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPES["U" + _name[4:]] = getattr(torch, _name)
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class MergeSpec:
    """What to merge: method, multiplier, the models A, B, C, and the output options."""

    method: Method
    alpha: float
    a: Path
    b: Path | None
    c: Path | None
    bake_vae: Path | None = None
    dtype: DType = "keep"
    discard: str | None = None  # regex of keys to drop from the output (A1111 "discard weights")


def merge_checkpoints(
    spec: MergeSpec, out: Path, *, overwrite: bool = False, allow_pickle: bool = False
) -> Path:
    """Merge the models of ``spec`` into one new ``.safetensors`` file at ``out``; return ``out``."""
    out = Path(out)
    discard = _check_spec(spec, out)
    check_destination(out, overwrite)
    try:
        return _merge(spec, out, discard, overwrite, allow_pickle)
    except (EmakiError, OSError):
        raise
    except Exception as exc:  # a library failure we did not foresee: still one line
        raise ModelSaveError(
            f"{out.name}: merge failed ({type(exc).__name__}: {one_line(exc)})"
        ) from None


def _merge(
    spec: MergeSpec,
    out: Path,
    discard: re.Pattern[str] | None,
    overwrite: bool,
    allow_pickle: bool,
) -> Path:
    with ExitStack() as stack:
        a = _open_input(Path(spec.a), "A", stack, allow_pickle)
        b = _open_input(Path(spec.b), "B", stack, allow_pickle) if spec.b is not None else None
        c = _open_input(Path(spec.c), "C", stack, allow_pickle) if spec.c is not None else None
        _check_families(a, b, c)
        vae = _read_vae(Path(spec.bake_vae), allow_pickle) if spec.bake_vae is not None else None
        plan = _Plan(spec, a, b, c, vae, discard)
        items = plan.items()
        if not items:
            raise InvalidRequestError(f"discard pattern {spec.discard!r} drops every tensor of A")
        metadata = _metadata(spec, plan, a, b, c, vae)
        atomic_write_file(
            out, lambda temp: write_safetensors(temp, items, metadata), overwrite=overwrite
        )
    return out


# --- the request -----------------------------------------------------------------------------


def _check_spec(spec: MergeSpec, out: Path) -> re.Pattern[str] | None:
    if spec.method not in METHODS:
        raise InvalidRequestError(
            f"unknown merge method {spec.method!r} (methods: {', '.join(METHODS)})"
        )
    if spec.dtype not in DTYPES:
        raise InvalidRequestError(
            f"unknown merge dtype {spec.dtype!r} (dtypes: {', '.join(DTYPES)})"
        )
    if not isinstance(spec.alpha, int | float) or not math.isfinite(spec.alpha):
        raise InvalidRequestError(f"merge alpha must be a finite number, not {spec.alpha!r}")
    label = A1111_METHOD_NAMES[spec.method]
    if spec.method != "no_interpolation" and spec.b is None:
        raise InvalidRequestError(f"{label} needs a second model (B)")
    if spec.method == "add_difference" and spec.c is None:
        raise InvalidRequestError(f"{label} needs a third model (C): A + alpha * (B - C)")
    if spec.method == "weighted_sum" and spec.c is not None:
        raise InvalidRequestError(f"{label} merges two models; a third (C) was given")
    if spec.method == "no_interpolation" and (spec.b is not None or spec.c is not None):
        raise InvalidRequestError(f"{label} takes one model (A); B or C was given")
    if out.suffix.lower() != ".safetensors":
        raise ModelSaveError(f"{out.name}: merged models are written as .safetensors only")
    if spec.discard is None or spec.discard == "":
        return None
    try:
        return re.compile(spec.discard)
    except re.error as exc:
        raise InvalidRequestError(
            f"discard pattern {spec.discard!r}: not a regular expression ({exc})"
        ) from None


# --- inputs ----------------------------------------------------------------------------------


@dataclass
class _Input:
    """One model to merge: its tensors' shapes and dtypes up front, the tensors on demand."""

    role: str
    path: Path
    family: str
    info: dict[str, tuple[tuple[int, ...], torch.dtype]]
    load: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    emaki_metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    short_hash: str = ""
    legacy_hash: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _open_input(path: Path, role: str, stack: ExitStack, allow_pickle: bool) -> _Input:
    where = f"{role} ({path.name})"
    if path.is_dir():
        return _folder_input(path, role, allow_pickle)
    if not path.is_file():
        raise ModelLoadError(f"{where}: {path} is no such file or folder")
    if looks_pickled(path):
        tensors = read_pickle(path, allow_pickle=allow_pickle)
        source = _dict_input(path, role, tensors, {})
    else:
        source = _safetensors_input(path, role, stack)
    source.family = detect_family(source.info.keys(), where)
    source.emaki_metadata = _file_emaki_metadata(source)
    _hash_file(source)
    return source


def _dict_input(
    path: Path, role: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> _Input:
    info = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
    return _Input(role, path, "", info, tensors.__getitem__, metadata)


def _safetensors_input(path: Path, role: str, stack: ExitStack) -> _Input:
    from safetensors import safe_open

    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        metadata = dict(handle.metadata() or {})
        info = {}
        for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
            view = handle.get_slice(key)
            info[key] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
    except KeyError as exc:
        raise ModelLoadError(f"{path.name}: unsupported tensor dtype {exc}") from None
    except Exception as exc:  # SafetensorError, OSError: all mean "unreadable"
        raise ModelLoadError(
            f"{path.name}: not a readable safetensors file ({one_line(exc)})"
        ) from None
    if not info:
        raise ModelLoadError(f"{path.name}: the file holds no tensors")
    return _Input(role, path, "", info, handle.get_tensor, metadata)


def _folder_input(path: Path, role: str, allow_pickle: bool) -> _Input:
    """A diffusers folder through emaki's loader, then in CompVis keys via its key map."""
    from emaki.models.loading import load_model
    from emaki.models.saving import bundle_to_compvis, single_file_metadata

    bundle = load_model(path, dtype=None, allow_pickle=allow_pickle)
    tensors = bundle_to_compvis(bundle)
    source = _dict_input(path, role, tensors, {})
    source.family = bundle.family
    source.emaki_metadata = {
        k: v for k, v in single_file_metadata(bundle).items() if k.startswith(METADATA_PREFIX)
    }
    source.sha256 = source.short_hash = bundle.hash
    return source


def _hash_file(source: _Input) -> None:
    from emaki.models.library import sha256_cached

    source.sha256 = sha256_cached(source.path)
    source.short_hash = source.sha256[:10]
    source.legacy_hash = legacy_hash(source.path)


def legacy_hash(path: Path) -> str:
    """A1111's old 8-digit model hash: SHA-256 of the 64 KiB that start 1 MiB into the file."""
    import hashlib

    with path.open("rb") as handle:
        handle.seek(_LEGACY_OFFSET)
        return hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]


def _file_emaki_metadata(source: _Input) -> dict[str, str]:
    """emaki's header entries of a single-file A: its own, else the family and a .yaml's type."""
    from emaki.models.loading import _yaml_prediction_type
    from emaki.models.saving import FORMAT_VERSION

    stored = {k: v for k, v in source.metadata.items() if k.startswith(METADATA_PREFIX)}
    if METADATA_PREFIX + "family" in stored:
        return stored
    stored[METADATA_PREFIX + "format_version"] = FORMAT_VERSION
    stored[METADATA_PREFIX + "family"] = source.family
    prediction = _yaml_prediction_type(source.path)
    if prediction is not None:
        stored[METADATA_PREFIX + "prediction_type"] = prediction
    return stored


def _check_families(a: _Input, b: _Input | None, c: _Input | None) -> None:
    for other in (b, c):
        if other is not None and other.family != a.family:
            raise ModelLoadError(
                f"cannot merge models of different families: A ({a.name}) is {a.family}, "
                f"{other.role} ({other.name}) is {other.family}"
            )


# --- the VAE to bake in ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Vae:
    path: Path
    tensors: dict[str, torch.Tensor]  # CompVis keys without "first_stage_model."
    short_hash: str

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def _read_vae(path: Path, allow_pickle: bool) -> _Vae:
    from emaki.models.library import sha256_cached
    from emaki.models.loading import diffusers_vae_to_compvis

    file = _vae_weight_file(path)
    state, _ = read_tensors(file, allow_pickle=allow_pickle)
    if any(key.startswith(VAE_PREFIX) for key in state):
        state = {
            k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)
        }
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in key or ".up_blocks." in key for key in state):
        state = diffusers_vae_to_compvis(state)
    if not any(key.startswith("encoder.") for key in state):
        raise ModelLoadError(f"{path.name}: not a VAE (no encoder.* or first_stage_model.* keys)")
    return _Vae(path, state, sha256_cached(file)[:10])


def _vae_weight_file(path: Path) -> Path:
    """The weights of a VAE given as a file, a diffusers VAE folder or a pipeline folder."""
    if not path.is_dir():
        if not path.is_file():
            raise ModelLoadError(f"VAE {path}: no such file or folder")
        return path
    folder = path / "vae" if (path / "vae").is_dir() else path
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"VAE {path.name}: no diffusion_pytorch_model.safetensors in it")


# --- the plan: every output tensor, checked before anything is written -----------------------


@dataclass(frozen=True)
class Item:
    """One output tensor: its key, shape and dtype, and how to compute it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class _Plan:
    """Decides, key by key, what the output holds; raises on any mismatch before writing."""

    def __init__(
        self,
        spec: MergeSpec,
        a: _Input,
        b: _Input | None,
        c: _Input | None,
        vae: _Vae | None,
        discard: re.Pattern[str] | None,
    ) -> None:
        self.spec, self.a, self.b, self.c, self.vae, self.discard = spec, a, b, c, vae, discard
        self.extra_channels: set[str] = set()  # "inpainting" / "instruct-pix2pix"

    def items(self) -> list[Item]:
        items = [self._item(key) for key in sorted(self.a.info)]
        if self.vae is not None:
            items = self._with_vae(items)
        return [item for item in items if not (self.discard and self.discard.search(item.key))]

    def _item(self, key: str) -> Item:
        shape, dtype = self.a.info[key]
        out = _output_dtype(dtype, self.spec.dtype)
        kind = self._kind(key)
        if kind == "copy":
            return Item(key, shape, out, lambda: _cast(self.a.load(key), out))
        return Item(key, shape, out, lambda: _cast(self._merged(key, kind == "channels"), out))

    def _kind(self, key: str) -> Literal["copy", "full", "channels"]:
        a, b, c = self.a, self.b, self.c
        if b is None or "model" not in key or key in _SKIP_ON_MERGE or key not in b.info:
            return "copy"
        if self.vae is not None and key.startswith(VAE_PREFIX):
            return "copy"  # replaced by the baked VAE anyway
        (shape_a, dtype_a), (shape_b, dtype_b) = a.info[key], b.info[key]
        if not (dtype_a.is_floating_point and dtype_b.is_floating_point):
            return "copy"
        if c is not None:
            if key not in c.info:
                return "copy"  # A1111: no C counterpart means a zero difference
            shape_c, dtype_c = c.info[key]
            if shape_c != shape_b:
                raise ModelLoadError(
                    f"cannot merge {key}: shape {list(shape_b)} in B ({b.name}) but "
                    f"{list(shape_c)} in C ({c.name})"
                )
            if not dtype_c.is_floating_point:
                return "copy"
        if shape_a == shape_b:
            return "full"
        if _extra_channels(shape_a, shape_b):
            self.extra_channels.add(_EXTRA_CHANNELS[shape_a[1]])
            return "channels"
        if _extra_channels(shape_b, shape_a):
            raise ModelLoadError(
                f"cannot merge {key}: B ({b.name}) has {shape_b[1]} input channels and A "
                f"{shape_a[1]}; when merging an {_EXTRA_CHANNELS[shape_b[1]]} model with a "
                "normal one, A must be the inpainting model"
            )
        raise ModelLoadError(
            f"cannot merge {key}: shape {list(shape_a)} in A ({a.name}) but {list(shape_b)} "
            f"in B ({b.name})"
        )

    def _merged(self, key: str, channels_only: bool) -> torch.Tensor:
        """The merged tensor in float32 (A's extra input channels kept when ``channels_only``)."""
        assert self.b is not None
        theta_a = self.a.load(key).to(torch.float32)
        theta_b = self.b.load(key).to(torch.float32)
        theta_c = self.c.load(key).to(torch.float32) if self.c is not None else None
        if not channels_only:
            return self._formula(theta_a, theta_b, theta_c)
        result = theta_a.clone()
        result[:, :4] = self._formula(theta_a[:, :4], theta_b, theta_c)
        return result

    def _formula(
        self, theta_a: torch.Tensor, theta_b: torch.Tensor, theta_c: torch.Tensor | None
    ) -> torch.Tensor:
        alpha = float(self.spec.alpha)
        if theta_c is None:
            return (1 - alpha) * theta_a + alpha * theta_b
        return theta_a + alpha * (theta_b - theta_c)

    def _with_vae(self, items: list[Item]) -> list[Item]:
        """Replace A's first_stage_model.* tensors by the VAE file's (all of them, same shapes)."""
        assert self.vae is not None
        vae, a = self.vae, self.a
        ours = {key.removeprefix(VAE_PREFIX) for key in a.info if key.startswith(VAE_PREFIX)}
        if ours:
            self._check_vae_keys(ours)
            names = sorted(ours)
        else:
            names = sorted(vae.tensors)  # A carries no VAE: the baked one becomes its VAE
        baked = {VAE_PREFIX + name: self._vae_item(name) for name in names}
        kept = [item for item in items if item.key not in baked]
        return sorted(kept + list(baked.values()), key=lambda item: item.key)

    def _check_vae_keys(self, ours: set[str]) -> None:
        assert self.vae is not None
        vae, a = self.vae, self.a
        missing = sorted(ours - vae.tensors.keys())
        extra = sorted(vae.tensors.keys() - ours)
        if missing or extra:
            what = f"lacks {VAE_PREFIX}{missing[0]}" if missing else f"has an extra key {extra[0]}"
            raise ModelLoadError(f"VAE {vae.path.name} does not fit A ({a.name}): it {what}")
        for name in sorted(ours):
            shape = a.info[VAE_PREFIX + name][0]
            tensor = vae.tensors[name]
            if tuple(tensor.shape) != shape and not _same_attention_weight(name, tensor, shape):
                raise ModelLoadError(
                    f"VAE {vae.path.name} does not fit A ({a.name}): {VAE_PREFIX}{name} has "
                    f"shape {list(tensor.shape)} in the VAE but {list(shape)} in A"
                )

    def _vae_item(self, name: str) -> Item:
        assert self.vae is not None
        tensor = self.vae.tensors[name]
        key = VAE_PREFIX + name
        shape, dtype = self.a.info.get(key, (tuple(tensor.shape), tensor.dtype))
        out = _output_dtype(dtype, self.spec.dtype)
        return Item(key, shape, out, lambda: _cast(tensor.reshape(shape), out))


def _extra_channels(big: tuple[int, ...], small: tuple[int, ...]) -> bool:
    """True when ``big`` is a 9- (or 8-) input-channel version of a 4-channel convolution."""
    return (
        len(big) == len(small) == 4
        and small[1] == 4
        and big[1] in _EXTRA_CHANNELS
        and big[0] == small[0]
        and big[2:] == small[2:]
    )


def _same_attention_weight(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """A linear (C, C) VAE attention weight where A stores the (C, C, 1, 1) convolution, or back."""
    return is_vae_attention_weight(name) and tensor.numel() == math.prod(shape)


def _output_dtype(dtype: torch.dtype, policy: str) -> torch.dtype:
    if not dtype.is_floating_point or policy == "keep":
        return dtype
    return torch.float16 if policy == "fp16" else torch.float32


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


# --- metadata --------------------------------------------------------------------------------


def _metadata(
    spec: MergeSpec,
    plan: _Plan,
    a: _Input,
    b: _Input | None,
    c: _Input | None,
    vae: _Vae | None,
) -> dict[str, str]:
    from emaki import __version__

    inputs = [source for source in (a, b, c) if source is not None]
    recipe = {
        "type": "emaki",
        "primary_model_hash": a.sha256,
        "secondary_model_hash": b.sha256 if b else None,
        "tertiary_model_hash": c.sha256 if c else None,
        "interp_method": A1111_METHOD_NAMES[spec.method],
        "multiplier": spec.alpha,
        "save_as_half": spec.dtype == "fp16",
        "bake_in_vae": vae.name if vae else None,
        "discard_weights": spec.discard or "",
        "is_inpainting": "inpainting" in plan.extra_channels,
        "is_instruct_pix2pix": "instruct-pix2pix" in plan.extra_channels,
        "method": spec.method,
        "alpha": spec.alpha,
        "models": {s.role: {"name": s.name, "hash": s.short_hash} for s in inputs},
        "vae": {"name": vae.name, "hash": vae.short_hash} if vae else None,
        "dtype": spec.dtype,
        "discard": spec.discard or None,
        "emaki_version": __version__,
    }
    return {
        "format": "pt",
        **a.emaki_metadata,
        "sd_merge_recipe": json.dumps(recipe),
        "sd_merge_models": json.dumps(_merge_models(inputs)),
    }


def _merge_models(inputs: list[_Input]) -> dict[str, object]:
    """A1111's ``sd_merge_models``: each input, and the inputs' own merge history."""
    models: dict[str, object] = {}
    for source in inputs:
        history = _json_object(source.metadata.get("sd_merge_models"))
        models.update(history or {})
    for source in inputs:
        entry: dict[str, object] = {"name": source.name}
        if source.legacy_hash is not None:
            entry["legacy_hash"] = source.legacy_hash
        entry["sd_merge_recipe"] = _json_object(source.metadata.get("sd_merge_recipe"))
        models[source.sha256] = entry
    return models


def _json_object(text: str | None) -> dict[str, object] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- writing ---------------------------------------------------------------------------------


def write_safetensors(path: Path, items: list[Item], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file tensor by tensor (the whole model is never in memory at once).

    The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
    ``data_offsets`` per tensor, ``__metadata__``) padded with spaces to 8 bytes, then the tensor
    bytes back to back. Tensors are ordered by element size (largest first), then by key, as the
    safetensors library does, so every tensor's data is aligned to its element size.
    """
    ordered = sorted(items, key=lambda item: (-item.dtype.itemsize, item.key))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for item in ordered:
        if item.dtype not in _SAFETENSORS_NAMES:
            raise ModelSaveError(f"{item.key}: cannot store dtype {item.dtype} in safetensors")
        size = math.prod(item.shape) * item.dtype.itemsize
        header[item.key] = {
            "dtype": _SAFETENSORS_NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for item in ordered:
            tensor = item.make()
            if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
                raise ModelSaveError(
                    f"internal error: {item.key} came out as {tensor.dtype} {list(tensor.shape)}"
                )
            handle.write(_raw_bytes(tensor))


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
