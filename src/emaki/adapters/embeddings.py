"""Textual-inversion embeddings: reading the files, finding trigger words in token ids.

An embedding is ``n`` learned input vectors ``[n, D]`` that stand in for a trigger word: where the
prompt's token ids spell the word, the encoder inserts the ``n`` vectors instead of the word's own
token embeddings (A1111 semantics). ``D`` must be the text encoder's token-embedding width.

File formats read by :func:`read_embedding` (the trigger word is always the file's stem, as in
A1111; a ``name`` stored inside the file is ignored):

* **A1111 ``.pt``** (pickled): a dict with ``string_to_param: {"*": tensor [n, D]}`` plus
  ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``string_to_token``, ...
* **A1111 / kohya ``.safetensors``**: one tensor under ``emb_params`` ``[n, D]``.
* **diffusers** (``learned_embeds.safetensors`` or the pickled ``learned_embeds.bin`` that A1111
  also reads): one tensor under the learned token, e.g. ``{"<cat-toy>": tensor [D] or [n, D]}``.
* SDXL embeddings (``clip_l`` and ``clip_g`` tensors) are refused: they belong to a two-encoder
  model.

Pickled files (``.pt``, ``.bin``, ...) are read only with ``allow_pickle=True``, and then only
with ``torch.load(weights_only=True)``. Vectors are returned as float32 ``[n, D]`` (a ``[D]``
tensor is one vector). The hash is the first 12 hex digits of the file's SHA-256, as in A1111's
``TI hashes`` infotext.

:class:`EmbeddingLibrary` holds the embeddings of a folder and finds them in token ids: at a
position, the embedding whose name's token ids (tokenized without start/end tokens) begin there
wins; when several do, the one with the longest token sequence wins (so ``foo-bar`` beats ``foo``).

Using embeddings in the text model: :func:`token_embeddings` builds the input vectors of a batch
of token ids with embedding vectors written over chosen positions, and :func:`run_text_model`
runs a CLIP or BERT text model on such vectors. BERT's ``forward`` takes ``inputs_embeds``
directly; transformers 5's ``CLIPTextModel.forward`` insists on ``input_ids``, so for CLIP the
same steps its forward takes (position embeddings, causal mask, encoder layers, final layer norm)
are run here on the given vectors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from emaki.errors import EmakiError, ModelLoadError, PickleRefusedError
from emaki.models.files import looks_pickled, one_line, read_safetensors, sha256_file

EMBEDDING_SUFFIXES = frozenset({".safetensors", ".pt", ".bin"})
HASH_DIGITS = 12


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: its trigger word and its ``[n, D]`` float32 vectors."""

    name: str
    vectors: Tensor
    hash: str
    path: Path | None

    @property
    def width(self) -> int:
        """D, the width of each vector."""
        return int(self.vectors.shape[-1])

    def __len__(self) -> int:
        """n, the number of token positions the embedding takes."""
        return int(self.vectors.shape[0])


# --- reading files ---------------------------------------------------------------------------


def read_pickled_object(path: Path, *, allow_pickle: bool) -> Any:
    """Whatever a pickled file holds, via ``torch.load(weights_only=True)``, only with the opt-in."""
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path.name} is a pickled file, which can run code when loaded; use a .safetensors "
            "file, or pass --allow-pickle to read it with torch.load(weights_only=True)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for bad zips
        raise ModelLoadError(
            f"{path.name}: cannot be read with torch.load(weights_only=True) ({_reason(exc)})"
        ) from None


def _reason(exc: BaseException) -> str:
    """The useful line of a torch.load error: the forbidden class, when that is the cause."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"it contains a {found.group(1)} object, which is not plain data"
    return one_line(exc)


def _file_content(path: Path, allow_pickle: bool) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if looks_pickled(path):
        return read_pickled_object(path, allow_pickle=allow_pickle)
    return read_safetensors(path)[0]


def _single_tensor(path: Path, entries: Mapping[Any, Any], what: str) -> Tensor:
    if len(entries) != 1:
        raise ModelLoadError(
            f"{path.name}: {what} holds {len(entries)} entries; an embedding file holds one"
        )
    value = next(iter(entries.values()))
    if not isinstance(value, Tensor):
        raise ModelLoadError(f"{path.name}: {what} holds a {type(value).__name__}, not a tensor")
    return value


def _raw_vectors(path: Path, data: Any) -> Tensor:
    """The embedding tensor of a file's content, whichever of the known layouts it has."""
    if not isinstance(data, Mapping):
        raise ModelLoadError(f"{path.name}: not an embedding (holds a {type(data).__name__})")
    if "clip_l" in data or "clip_g" in data:
        raise ModelLoadError(f"{path.name}: SDXL embedding, not supported by this model")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping):
            raise ModelLoadError(f"{path.name}: string_to_param is not a mapping of tensors")
        return _single_tensor(path, params, "string_to_param")
    if "emb_params" in data:
        return _single_tensor(path, {"emb_params": data["emb_params"]}, "emb_params")
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path.name}: not an embedding (no tensors in it)")
    return _single_tensor(path, tensors, "the file")


def _as_vectors(path: Path, raw: Tensor, width: int | None) -> Tensor:
    if not raw.is_floating_point():
        raise ModelLoadError(f"{path.name}: embedding vectors have dtype {raw.dtype}, not float")
    vectors = raw.detach().to("cpu", torch.float32)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ModelLoadError(
            f"{path.name}: embedding has shape {tuple(raw.shape)}, expected [n, D] or [D]"
        )
    if width is not None and vectors.shape[1] != width:
        raise ModelLoadError(
            f"{path.name}: embedding vectors are {vectors.shape[1]} wide, but this model's text "
            f"encoder expects {width}"
        )
    return vectors.contiguous()


def read_embedding(
    path: Path, *, width: int | None = None, allow_pickle: bool = False
) -> Embedding:
    """Read an embedding file (A1111 ``.pt``/``.safetensors``, diffusers); see the module notes.

    ``width`` is the text encoder's token-embedding width; vectors of another width are refused.
    """
    path = Path(path)
    raw = _raw_vectors(path, _file_content(path, allow_pickle))
    vectors = _as_vectors(path, raw, width)
    return Embedding(
        name=path.stem, vectors=vectors, hash=sha256_file(path)[:HASH_DIGITS], path=path
    )


# --- a library of embeddings and matching in token ids ---------------------------------------


class EmbeddingLibrary:
    """Embeddings by trigger word, with A1111's longest-match lookup in token ids.

    ``skipped`` lists ``(path, one-line reason)`` for files that could not be used (unreadable,
    wrong width, a duplicate name, a name that tokenizes to nothing).
    """

    def __init__(self, embeddings: Iterable[Embedding], tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.skipped: list[tuple[Path, str]] = []
        self._by_name: dict[str, Embedding] = {}
        self._by_first_id: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in embeddings:
            self._add(embedding)
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)  # stable: ties keep order

    def _add(self, embedding: Embedding) -> None:
        where = embedding.path or Path(embedding.name)
        first = self._by_name.get(embedding.name)
        if first is not None:
            origin = first.path or "memory"
            why = f"an embedding named {embedding.name!r} is already loaded from {origin}"
            self.skipped.append((where, why))
            return
        ids = tuple(self.tokenizer(embedding.name, add_special_tokens=False)["input_ids"])
        if not ids:
            self.skipped.append((where, f"the name {embedding.name!r} gives no tokens"))
            return
        self._by_name[embedding.name] = embedding
        self._by_first_id.setdefault(ids[0], []).append((ids, embedding))

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        tokenizer: PreTrainedTokenizerBase,
        *,
        width: int,
        allow_pickle: bool = False,
    ) -> EmbeddingLibrary:
        """Every ``.safetensors``/``.pt``/``.bin`` under ``folder`` (recursive, sorted by path).

        Files that cannot be read are listed in ``skipped`` instead of raising; of two files with
        the same stem, the first in path order wins.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: no such embeddings folder")
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES
        )
        loaded: list[Embedding] = []
        failed: list[tuple[Path, str]] = []
        for path in files:
            try:
                loaded.append(read_embedding(path, width=width, allow_pickle=allow_pickle))
            except EmakiError as exc:
                failed.append((path, one_line(exc)))
            except Exception as exc:  # never let one odd file break the listing
                failed.append((path, f"{path.name}: {one_line(exc)}"))
        library = cls(loaded, tokenizer)
        library.skipped = sorted(failed + library.skipped)
        return library

    def match(self, ids: Sequence[int], offset: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at ``ids[offset]`` (longest first), and the
        number of ids it spans; None when none does."""
        if not 0 <= offset < len(ids):
            return None
        for name_ids, embedding in self._by_first_id.get(int(ids[offset]), ()):
            window = ids[offset : offset + len(name_ids)]
            if len(window) == len(name_ids) and all(int(a) == b for a, b in zip(window, name_ids)):
                return embedding, len(name_ids)
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Embedding]:
        return iter(self._by_name.values())

    def get(self, name: str) -> Embedding | None:
        """The embedding with trigger word ``name``, or None."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """The trigger words, in load order (sorted path order for a folder)."""
        return list(self._by_name)


# --- feeding embeddings to the text model ----------------------------------------------------


def token_embeddings(
    text_model: nn.Module, ids: Tensor, inserts: Sequence[tuple[int, int, Tensor]]
) -> Tensor:
    """The model's token-embedding lookup of ``ids`` [B, L] -> [B, L, D] with rows replaced.

    Each insert ``(row, start, vectors [n, D])`` writes ``vectors`` over positions
    ``start .. start + n - 1`` of batch row ``row``. Position embeddings are not added here (the
    text model adds them to whatever input vectors it is given).
    """
    table = text_model.get_input_embeddings()
    out = table(ids)
    if not inserts:
        return out
    out = out.clone()
    batch, length, width = out.shape
    for row, start, vectors in inserts:
        n = int(vectors.shape[0])
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise ValueError(f"insert vectors have shape {tuple(vectors.shape)}, not [n, {width}]")
        if not (0 <= row < batch and start >= 0 and start + n <= length):
            raise ValueError(
                f"insert of {n} vectors at row {row}, position {start} does not fit in "
                f"[{batch}, {length}]"
            )
        out[row, start : start + n] = vectors.to(out.device, out.dtype)
    return out


def _clip_core(text_model: nn.Module) -> nn.Module | None:
    """The module holding CLIP's embeddings/encoder/final_layer_norm, or None for non-CLIP."""
    core = getattr(text_model, "text_model", text_model)  # transformers < 5 nests it
    if all(hasattr(core, part) for part in ("embeddings", "encoder", "final_layer_norm")):
        return core
    return None


def run_text_model(
    text_model: nn.Module,
    inputs_embeds: Tensor,
    *,
    attention_mask: Tensor | None = None,
    output_hidden_states: bool = False,
) -> BaseModelOutput:
    """Run a CLIP or BERT text model on input vectors instead of token ids.

    Returns ``last_hidden_state`` (and ``hidden_states``: the embedding output, then every layer's
    output, as transformers gives them) exactly as ``text_model(input_ids, ...)`` would when
    ``inputs_embeds`` is that model's lookup of ``input_ids``.
    """
    core = _clip_core(text_model)
    if core is None:
        return text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
        )
    return _run_clip(core, inputs_embeds, attention_mask, output_hidden_states)


def _run_clip(
    core: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None, keep: bool
) -> BaseModelOutput:
    from transformers.masking_utils import create_causal_mask

    hidden = core.embeddings(inputs_embeds=inputs_embeds)  # adds the position embeddings
    mask = create_causal_mask(
        config=core.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
    )
    states = [hidden]
    for layer in core.encoder.layers:
        hidden = layer(hidden, mask, is_causal=True)
        if isinstance(hidden, tuple):  # older transformers return (hidden_states, ...)
            hidden = hidden[0]
        states.append(hidden)
    return BaseModelOutput(
        last_hidden_state=core.final_layer_norm(hidden),
        hidden_states=tuple(states) if keep else None,
    )
