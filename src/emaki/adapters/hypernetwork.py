"""NovelAI / A1111 hypernetworks: small MLPs that rewrite the keys' and values' context.

A hypernetwork holds, for some context widths (768, 1024, 320, 640, 1280, ...), a pair of MLPs
``(mlp_k, mlp_v)`` mapping ``[.., width] -> [.., width]``. At inference, in every attention layer
of the UNet whose key/value input has one of those widths, keys are computed from
``context + multiplier * mlp_k(context)`` and values from ``context + multiplier * mlp_v(context)``;
queries are unchanged, dropout is off. Several hypernetworks are applied one after the other in
the order given, each to the previous one's output (A1111's ``apply_hypernetworks``).

Which layers: A1111 (and ComfyUI) patch *every* attention layer of the UNet's transformer blocks,
the cross-attention ``attn2`` (context = text states, e.g. 768 wide) and the self-attention
``attn1`` (context = the image tokens themselves, 320/640/1280 wide). The NovelAI files carry
modules for 320/640/1280 exactly for that. So does emaki: a layer is changed when a hypernetwork
has a module for its context width, and left untouched (its original processor) otherwise.

File format (A1111 ``modules/hypernetworks/hypernetwork.py``; NovelAI's files are the same with
the defaults): a pickled dict, read only with ``allow_pickle=True`` and
``torch.load(weights_only=True)``, mapping each width (an ``int``) to a pair
``[k_state_dict, v_state_dict]`` of ``torch.nn.Sequential`` state dicts under ``linear.N.*``,
plus options (A1111's defaults for a missing key in brackets):

* ``layer_structure`` [``[1, 2, 1]``]: layer widths as multiples of the width, starting and ending
  at 1; ``[1, 2, 1]`` is ``Linear(w, 2w), Linear(2w, w)``.
* ``activation_func`` [none]: after every linear layer but the last (the last too when
  ``activate_output`` [true]); ``linear`` means none, ``swish`` is ``Hardswish`` (A1111's table),
  other names are torch.nn activation classes in lower case (``relu``, ``leakyrelu``, ``elu``,
  ``tanh``, ``sigmoid``, ``silu``, ``gelu``, ``mish``, ``prelu``, ...).
* ``is_layer_norm`` [false]: a ``LayerNorm`` after every linear layer (after its activation).
* ``dropout_structure`` or ``use_dropout`` [false] + ``last_layer_dropout`` [false]: a ``Dropout``
  after linear layer ``i`` when entry ``i + 1`` of the dropout structure is non-zero; without a
  stored structure it is 0.3 after every hidden layer but the last, which has it only with
  ``last_layer_dropout``. Dropout does nothing at inference, but it takes a ``Sequential`` index.
* ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``weight_initialization``,
  ``optional_info``: informative only.

The Sequential indices in the keys follow from these options; the module is rebuilt from them and
the file's keys must match exactly (old NovelAI files' ``linear1``/``linear2`` names are read as
``linear.0``/``linear.1``, as A1111 does).

**safetensors form** (emaki's, so that pickles are not needed): tensor keys
``"<width>.<0|1>.<state-dict key>"``, ``0`` for the key MLP and ``1`` for the value MLP (e.g.
``"768.0.linear.0.weight"``); the options as ``__metadata__`` entries under the same names, each
value JSON text (``"[1, 2, 1]"``, ``"\\"relu\\""`` or just ``"relu"``, ``"true"``).
:func:`convert_hypernetwork` writes it from a pickled file.

The name is the file's stem (what ``<hypernet:name:multiplier>`` refers to); the hash is the first
10 hex digits of the file's SHA-256 (A1111's hypernetwork short hash).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from emaki.adapters.clone import share_clone
from emaki.adapters.embeddings import read_pickled_object
from emaki.errors import InvalidRequestError, ModelLoadError, ModelSaveError
from emaki.models.bundle import ModelBundle
from emaki.models.files import atomic_write_file, looks_pickled, read_safetensors, sha256_file

HASH_DIGITS = 10
OPTION_KEYS = (
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "activate_output",
    "weight_initialization",
    "name",
    "step",
    "sd_checkpoint",
    "sd_checkpoint_name",
)
_OLD_KEYS = {"linear1.": "linear.0.", "linear2.": "linear.1."}
_DEFAULT_DROPOUT = 0.3
_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.SiLU, nn.GELU, nn.Mish,
    nn.CELU, nn.SELU, nn.ReLU6, nn.RReLU, nn.PReLU, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
#: Activation names accepted in ``activation_func`` (A1111: "swish" is Hardswish).
ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {cls.__name__.lower(): cls for cls in _ELEMENTWISE} | {"swish": nn.Hardswish}
)


@dataclass(frozen=True)
class MLPOptions:
    """How the MLPs of one hypernetwork file are built (see the module notes)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str | None = None
    layer_norm: bool = False
    dropout: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = True


class HypernetworkMLP(nn.Module):
    """One MLP of a hypernetwork; ``forward`` gives the change ``mlp(x)`` (not ``x + mlp(x)``)."""

    def __init__(self, width: int, options: MLPOptions) -> None:
        super().__init__()
        self.width = width
        self.linear = nn.Sequential(*_layers(width, options))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _layers(width: int, options: MLPOptions) -> list[nn.Module]:
    sizes = [int(width * factor) for factor in options.layer_structure]
    count = len(sizes) - 1
    layers: list[nn.Module] = []
    for i in range(count):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if options.activation is not None and (i < count - 1 or options.activate_output):
            layers.append(ACTIVATIONS[options.activation]())
        if options.layer_norm:
            layers.append(nn.LayerNorm(sizes[i + 1]))
        if options.dropout[i + 1] > 0:
            layers.append(nn.Dropout(options.dropout[i + 1]))
    return layers


@dataclass(frozen=True, eq=False)
class Hypernetwork:
    """A loaded hypernetwork: ``layers`` maps a context width to its (key MLP, value MLP)."""

    name: str
    hash: str
    path: Path | None
    layers: Mapping[int, tuple[nn.Module, nn.Module]]


# --- options ---------------------------------------------------------------------------------


def _flag(path: Path, raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool | int):
        raise ModelLoadError(f"{path.name}: hypernetwork option {key} is {value!r}, not a boolean")
    return bool(value)


def _numbers(path: Path, key: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ModelLoadError(f"{path.name}: hypernetwork option {key} is {value!r}, not numbers")
    return tuple(float(v) for v in value)


def _layer_structure(path: Path, raw: Mapping[str, Any]) -> tuple[float, ...]:
    value = raw.get("layer_structure")
    if value is None:
        return MLPOptions.layer_structure
    structure = _numbers(path, "layer_structure", value)
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or min(structure) <= 0:
        raise ModelLoadError(
            f"{path.name}: hypernetwork layer_structure {list(value)} must start and end with 1 "
            "and be positive"
        )
    return structure


def _activation(path: Path, raw: Mapping[str, Any]) -> str | None:
    value = raw.get("activation_func")
    if value is None or value == "linear":
        return None
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        accepted = ", ".join(["linear", *sorted(ACTIVATIONS)])
        raise ModelLoadError(
            f"{path.name}: unsupported hypernetwork activation {value!r} (accepted: {accepted})"
        )
    return value.lower()


def _dropout(path: Path, raw: Mapping[str, Any], layers: int) -> tuple[float, ...]:
    """Dropout probability at each layer boundary (entry i + 1 follows linear layer i)."""
    stored = raw.get("dropout_structure")
    if stored is not None:
        dropout = _numbers(path, "dropout_structure", stored)
        if len(dropout) < layers + 1 or not all(0 <= p < 1 for p in dropout):
            raise ModelLoadError(
                f"{path.name}: hypernetwork dropout_structure {list(stored)} needs "
                f"{layers + 1} values in [0, 1)"
            )
        return dropout
    if not _flag(path, raw, "use_dropout", False):
        return (0.0,) * (layers + 1)
    last_hidden = _DEFAULT_DROPOUT if _flag(path, raw, "last_layer_dropout", False) else 0.0
    # A1111: 0 at the input, 0.3 after each hidden layer but the last, the flag after the last
    # hidden layer, 0 after the output (a one-layer [1, 1] net thus gets the flag's value).
    return (0.0, *(_DEFAULT_DROPOUT,) * max(layers - 2, 0), last_hidden, 0.0)


def mlp_options(path: Path, raw: Mapping[str, Any]) -> MLPOptions:
    """The MLP build options of a hypernetwork file's option entries, with A1111's defaults."""
    structure = _layer_structure(path, raw)
    return MLPOptions(
        layer_structure=structure,
        activation=_activation(path, raw),
        layer_norm=_flag(path, raw, "is_layer_norm", False),
        dropout=_dropout(path, raw, len(structure) - 1),
        activate_output=_flag(path, raw, "activate_output", True),
    )


# --- reading ---------------------------------------------------------------------------------


def _renamed(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in _OLD_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def _key_list(keys: set[str]) -> str:
    shown = sorted(keys)
    return ", ".join(shown[:4]) + (f" (+{len(shown) - 4} more)" if len(shown) > 4 else "")


def _build_mlp(
    path: Path, width: int, which: str, state: Any, options: MLPOptions
) -> HypernetworkMLP:
    label = f"{path.name}: hypernetwork module {width}/{which}"
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"{label} is not a state dict of tensors")
    given = _renamed({str(k): v for k, v in state.items()})
    mlp = HypernetworkMLP(width, options)
    expected = mlp.state_dict()
    missing, unexpected = set(expected) - set(given), set(given) - set(expected)
    if missing or unexpected:
        parts = [f"missing keys {_key_list(missing)}" if missing else "",
                 f"unexpected keys {_key_list(unexpected)}" if unexpected else ""]  # fmt: skip
        raise ModelLoadError(
            f"{label} does not match its options ({'; '.join(p for p in parts if p)})"
        )
    for key, tensor in expected.items():
        if given[key].shape != tensor.shape:
            raise ModelLoadError(
                f"{label}: {key} has shape {tuple(given[key].shape)}, expected {tuple(tensor.shape)}"
            )
    mlp.load_state_dict({k: v.to(torch.float32) for k, v in given.items()})
    return mlp.eval().requires_grad_(False)


def _module_pairs(path: Path, content: Mapping[Any, Any]) -> dict[int, Any]:
    pairs = {k: v for k, v in content.items() if isinstance(k, int) and not isinstance(k, bool)}
    if not pairs:
        raise ModelLoadError(f"{path.name}: not a hypernetwork (no width-keyed modules in it)")
    for width, pair in pairs.items():
        if width <= 0 or not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ModelLoadError(
                f"{path.name}: hypernetwork entry {width} is not a (key, value) module pair"
            )
    return pairs


def _from_safetensors(path: Path) -> dict[Any, Any]:
    """A safetensors hypernetwork in the same shape as the pickled dict (widths + options)."""
    tensors, metadata = read_safetensors(path)
    content: dict[Any, Any] = {}
    for key, tensor in tensors.items():
        width, which, rest = [*key.split(".", 2), "", ""][:3]
        if not width.isdigit() or which not in ("0", "1") or not rest:
            raise ModelLoadError(
                f"{path.name}: tensor {key!r} is not named <width>.<0|1>.<key> as a hypernetwork's"
            )
        content.setdefault(int(width), ({}, {}))[int(which)][rest] = tensor
    for key, text in metadata.items():
        if key in OPTION_KEYS:
            try:
                content[key] = json.loads(text)
            except ValueError:
                content[key] = text  # a bare string such as relu
    return content


def read_hypernetwork(path: Path, *, allow_pickle: bool = False) -> Hypernetwork:
    """Read an A1111/NovelAI hypernetwork (pickled dict, or emaki's safetensors form)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if looks_pickled(path):
        content = read_pickled_object(path, allow_pickle=allow_pickle)
    else:
        content = _from_safetensors(path)
    if not isinstance(content, Mapping):
        raise ModelLoadError(f"{path.name}: not a hypernetwork (holds a {type(content).__name__})")
    pairs = _module_pairs(path, content)
    options = mlp_options(path, content)
    layers = {
        width: (
            _build_mlp(path, width, "k", pair[0], options),
            _build_mlp(path, width, "v", pair[1], options),
        )
        for width, pair in sorted(pairs.items())
    }
    return Hypernetwork(
        name=path.stem,
        hash=sha256_file(path)[:HASH_DIGITS],
        path=path,
        layers=MappingProxyType(layers),
    )


def convert_hypernetwork(
    source: Path, destination: Path, *, allow_pickle: bool = False, overwrite: bool = False
) -> Path:
    """Write a pickled hypernetwork in the safetensors form (checked by loading it first)."""
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    if destination.suffix.lower() != ".safetensors":
        raise ModelSaveError(f"{destination.name}: the converted file must end in .safetensors")
    read_hypernetwork(source, allow_pickle=allow_pickle)  # validates the file
    content = read_pickled_object(source, allow_pickle=allow_pickle)
    tensors = {
        f"{width}.{index}.{key}": tensor.detach().contiguous()
        for width, pair in _module_pairs(source, content).items()
        for index, state in enumerate(pair)
        for key, tensor in _renamed(dict(state)).items()
    }
    metadata = {k: text for k in OPTION_KEYS if (text := _json_text(content.get(k))) is not None}
    return atomic_write_file(
        destination,
        lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
        overwrite=overwrite,
    )


def _json_text(value: Any) -> str | None:
    """``value`` as JSON text for safetensors metadata; None when absent or not plain data."""
    if value is None:
        return None
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


# --- applying --------------------------------------------------------------------------------


class HypernetworkAttnProcessor:
    """Scaled-dot-product attention whose key and value inputs pass through hypernetworks.

    ``chain`` is ``[(mlp_k, mlp_v, multiplier), ...]`` for this layer's context width, applied in
    order. Everything else is computed as diffusers' ``AttnProcessor2_0`` does.
    """

    def __init__(
        self,
        chain: Sequence[tuple[nn.Module, nn.Module, float]],
        copies: dict[tuple[torch.device, int], nn.Module] | None = None,
    ) -> None:
        self.chain = list(chain)
        self._copies = {} if copies is None else copies  # shared by one clone's processors

    def _on(self, mlp: nn.Module, device: torch.device) -> nn.Module:
        """``mlp`` itself, or a private copy on ``device`` (the loaded MLPs are shared)."""
        if next(mlp.parameters()).device == device:
            return mlp
        key = (device, id(mlp))
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(mlp).to(device)
        return self._copies[key]

    def contexts(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The key and value inputs: ``c + m * mlp(c)`` for each hypernetwork in turn."""
        ctx_k = ctx_v = context
        for mlp_k, mlp_v, mult in self.chain:
            ctx_k = _step(ctx_k, self._on(mlp_k, context.device), mult)
            ctx_v = _step(ctx_v, self._on(mlp_v, context.device), mult)
        return ctx_k, ctx_v

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        ctx_k, ctx_v = self.contexts(context)
        out = _attend(attn, query, attn.to_k(ctx_k), attn.to_v(ctx_v), attention_mask)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _step(context: Tensor, mlp: nn.Module, mult: float) -> Tensor:
    x = context.to(torch.float32)
    return (x + mlp(x) * mult).to(context.dtype)


def _attend(
    attn: Attention, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None
) -> Tensor:
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
    )
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def _check_multiplier(net: Hypernetwork, mult: float) -> float:
    if isinstance(mult, bool) or not isinstance(mult, int | float) or not math.isfinite(mult):
        raise InvalidRequestError(f"hypernetwork {net.name}: multiplier {mult!r} is not a number")
    return float(mult)


def apply_hypernetworks(
    bundle: ModelBundle, nets: Sequence[tuple[Hypernetwork, float]]
) -> ModelBundle:
    """A bundle whose UNet is a clone with the hypernetworks on its attention layers.

    Each attention layer whose key/value input width some hypernetwork has a module for gets a
    :class:`HypernetworkAttnProcessor`; the others, and the original bundle, are untouched. An
    empty list returns ``bundle`` itself.
    """
    if not nets:
        return bundle
    checked = [(net, _check_multiplier(net, mult)) for net, mult in nets]
    unet = share_clone(bundle.unet)
    copies: dict[tuple[torch.device, int], nn.Module] = {}
    for module in unet.modules():
        to_k = getattr(module, "to_k", None)
        if not isinstance(module, Attention) or not isinstance(to_k, nn.Linear):
            continue
        chain = [
            (*net.layers[to_k.in_features], mult)
            for net, mult in checked
            if to_k.in_features in net.layers
        ]
        if chain:
            module.set_processor(HypernetworkAttnProcessor(chain, copies))
    return dataclasses.replace(bundle, unet=unet)
