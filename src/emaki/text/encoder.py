"""Text encoding: prompt text -> text-encoder hidden states, in 75-token chunks, with clip skip.

Prompts of any length are split into chunks of 75 tokens; each chunk is wrapped as
``[BOS] tokens [EOS] [PAD]...`` to 77 tokens, encoded independently, and the encoder states are
concatenated along the sequence axis (NovelAI's and A1111's "infinite prompt length"; 120 tokens
give a [1, 154, D] tensor). A prompt of at most 75 tokens gives exactly what diffusers'
``StableDiffusionPipeline`` gives. Clip skip N takes the hidden states N layers before the last
and applies the final layer norm, as A1111 does.

The same code serves BERT-style encoders (emaki's default model conditions on a frozen MiniLM):
``[CLS]``/``[SEP]`` take the place of BOS/EOS, chunks are ``model_max_length - 2`` tokens long,
padding is masked when the encoder's config says ``use_attention_mask`` (as diffusers does), and
clip skip takes an earlier layer's output as it is (BERT has no final layer norm).

Weighted text (the output of A1111's emphasis parser, :func:`emaki.prompts.parse_emphasis`) is
chunked as A1111 does (:meth:`TextEncoder.tokenize_weighted`): ``BREAK`` pads the current chunk
and starts a new one; when a chunk fills up and a comma occurred within its last
``comma_backtrack`` tokens (A1111's "prompt word wrap length limit", default 20) the text after
that comma moves to the next chunk; a textual-inversion embedding is never split across chunks.
Emphasis multiplies the encoder states of each token by its weight; in the "Original" mode the
chunk's mean is then restored, "No norm" leaves it, "Ignore" applies no weights. (A1111 takes that
mean over all texts it happens to encode in one batch; emaki takes it per text and chunk, so a
text always encodes to the same states whatever else is encoded with it.)

Textual-inversion vectors enter through placeholder token ids past the vocabulary: the encoder
runs on a weight-sharing clone of the text model whose input-embedding table is extended by the
library's vectors, so encoding stays a pure function of the ids (no hooks on the shared model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.request import EMPHASIS_MODES

if TYPE_CHECKING:
    from emaki.adapters.embeddings import Embedding, EmbeddingLibrary

CHUNK_TOKENS = 75


@dataclass(frozen=True)
class TokenChunks:
    """A weighted prompt as the encoder's chunks: ids and emphasis multipliers per position.

    Every chunk is ``chunk_tokens + 2`` long (start, text, end, padding). ``token_count`` is the
    number of text tokens (embedding vectors included, padding and start/end excluded), what
    A1111 shows as "75/150". ``embeddings`` names the textual-inversion embeddings used.
    """

    ids: tuple[tuple[int, ...], ...]
    multipliers: tuple[tuple[float, ...], ...]
    token_count: int
    embeddings: tuple[str, ...] = ()


class TextEncoder:
    """Tokenizer + text model, encoding one prompt at a time.

    Tokenization and the states of each distinct chunk are cached: a chunk's states depend only
    on its ids, the clip skip and the model's weights, so a prompt edited in one place re-encodes
    only the chunks that changed, and a repeated prompt none (A1111 caches whole conditionings of
    the last prompt; this is finer). The cache is dropped whenever a weight of the text model has
    changed in place (training), detected by the tensors' version counters.
    """

    #: Encoded chunks kept (each is one chunk's [tokens, width] states).
    cache_chunks = 128

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        *,
        embeddings: EmbeddingLibrary | None = None,
        comma_backtrack: int = 20,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.embeddings = embeddings
        self.comma_backtrack = comma_backtrack
        self._extended: tuple[PreTrainedModel, dict[str, int]] | None = None
        self.bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
        self.eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        length = int(tokenizer.model_max_length)
        self.chunk_tokens = (length if 8 <= length <= 1024 else CHUNK_TOKENS + 2) - 2
        self.use_mask = bool(getattr(model.config, "use_attention_mask", False))
        self.clip_style = hasattr(getattr(model, "text_model", model), "final_layer_norm")
        self._tokens: dict[str, tuple[int, ...]] = {}
        self._states: dict[tuple[int, tuple[int, ...]], Tensor] = {}
        self._states_of: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def tokenize(self, text: str) -> list[int]:
        """BPE token ids of the text, without start/end tokens."""
        ids = self._tokens.get(text)
        if ids is None:
            if len(self._tokens) >= 4096:
                self._tokens.clear()
            encoded = self.tokenizer(text, add_special_tokens=False, truncation=False)
            ids = self._tokens[text] = tuple(encoded.input_ids)
        return list(ids)

    @property
    def comma_id(self) -> int | None:
        """The id of a lone comma (",</w>" for CLIP, "," for BERT), None if it is not one token."""
        ids = self.tokenize(",")
        return ids[0] if len(ids) == 1 else None

    def tokenize_weighted(self, pieces: Sequence[tuple[str, float]]) -> TokenChunks:
        """Chunk weighted text as A1111 does (BREAK, comma backtracking, whole embeddings).

        ``pieces`` is :func:`emaki.prompts.parse_emphasis` output: ``(text, weight)`` pairs, with
        ``("BREAK", -1.0)`` marking a chunk break.
        """
        n = self.chunk_tokens
        comma = self.comma_id
        chunks: list[tuple[list[int], list[float]]] = []
        ids: list[int] = []
        mults: list[float] = []
        last_comma = -1
        count = 0
        used: list[str] = []

        def close() -> None:
            nonlocal ids, mults, last_comma, count
            count += len(ids)
            pad = n - len(ids)
            chunks.append(
                ([self.bos, *ids, self.eos] + [self.pad] * pad, [1.0, *mults] + [1.0] * (pad + 1))
            )
            ids, mults, last_comma = [], [], -1

        placeholders = self._placeholder_ids() if self.embeddings is not None else {}
        for text, weight in pieces:
            if text == "BREAK" and weight == -1.0:
                close()
                continue
            tokens = self.tokenize(text)
            pos = 0
            while pos < len(tokens):
                token = tokens[pos]
                if token == comma:
                    last_comma = len(ids)
                elif (
                    self.comma_backtrack
                    and len(ids) == n
                    and last_comma != -1
                    and len(ids) - last_comma <= self.comma_backtrack
                ):
                    cut = last_comma + 1
                    moved, moved_mults = ids[cut:], mults[cut:]
                    ids, mults = ids[:cut], mults[:cut]
                    close()
                    ids, mults = moved, moved_mults
                if len(ids) == n:
                    close()
                found = self.embeddings.match(tokens, pos) if self.embeddings is not None else None
                if found is None:
                    ids.append(token)
                    mults.append(weight)
                    pos += 1
                    continue
                emb, consumed = found
                vectors = len(emb.vectors)
                if vectors > n:
                    raise InvalidRequestError(
                        f"embedding {emb.name!r} has {vectors} vectors, more than a chunk ({n}) holds"
                    )
                if len(ids) + vectors > n:
                    close()
                base = placeholders[emb.name]
                ids.extend(range(base, base + vectors))
                mults.extend([weight] * vectors)
                used.append(emb.name)
                pos += consumed
        if ids or not chunks:
            close()
        return TokenChunks(
            ids=tuple(tuple(c) for c, _ in chunks),
            multipliers=tuple(tuple(m) for _, m in chunks),
            token_count=count,
            embeddings=tuple(dict.fromkeys(used)),
        )

    @torch.inference_mode()
    def encode_weighted(
        self, prompts: Sequence[TokenChunks], clip_skip: int = 1, emphasis: str = "Original"
    ) -> list[Conditioning]:
        """Encode tokenized prompts, applying emphasis, in one text-encoder call.

        Each 77-token chunk is encoded on its own (its own start and end tokens), so a chunk's
        states depend only on its ids: every distinct chunk of all the prompts is encoded once.
        The texts of a prompt-editing schedule differ in a few words, so most of their chunks
        are shared (a 300-token prompt with 7 scheduled variants encodes about 8 chunks, not
        28). Emphasis weights and the "Original" mean restoration then apply per occurrence.
        """
        if emphasis not in EMPHASIS_MODES:
            raise InvalidRequestError(
                f"unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}"
            )
        model = self._model_for_ids()
        states = self._chunk_states(
            list(dict.fromkeys(c for p in prompts for c in p.ids)), clip_skip, model
        )
        out: list[Conditioning] = []
        for p in prompts:
            z = torch.stack([states[c] for c in p.ids])  # [chunks, L, D]
            if emphasis in ("Original", "No norm"):
                weights = torch.tensor(p.multipliers, device=z.device)[:, :, None]
                if emphasis == "Original" and bool((weights != 1).any()):
                    before = z.mean(dim=(1, 2), keepdim=True)
                    z = z * weights
                    z = z * (before / z.mean(dim=(1, 2), keepdim=True))
                else:
                    z = z * weights
            out.append(Conditioning(z.reshape(1, -1, z.shape[-1])))
        return out

    def _chunk_states(
        self, chunks: list[tuple[int, ...]], clip_skip: int, model: PreTrainedModel
    ) -> dict[tuple[int, ...], Tensor]:
        """Each chunk's float states [L, D]: from the cache, the missing ones in one model call
        (``encode`` runs under inference mode, so no cached state carries an autograd graph)."""
        version = (id(model), tuple(_version(p) for p in model.parameters()))
        if version != self._states_of:
            self._states.clear()
            self._states_of = version
        missing = [c for c in chunks if (clip_skip, c) not in self._states]
        if missing:
            device = next(model.parameters()).device
            new = self._hidden_states(torch.tensor(missing, device=device), clip_skip, model)
            for c, z in zip(missing, new.float(), strict=True):
                self._states[(clip_skip, c)] = z
        found = {c: self._states.pop((clip_skip, c)) for c in chunks}
        self._states.update(((clip_skip, c), z) for c, z in found.items())  # most recent last
        while len(self._states) > max(self.cache_chunks, len(chunks)):
            self._states.pop(next(iter(self._states)))
        return found

    def clear_cache(self) -> None:
        """Forget the tokenized texts and encoded chunks (benchmarks time encoding with this)."""
        self._tokens.clear()
        self._states.clear()

    def _placeholder_ids(self) -> dict[str, int]:
        return self._extended_model()[1]

    def _model_for_ids(self) -> PreTrainedModel:
        return self._extended_model()[0] if self.embeddings is not None else self.model

    def _extended_model(self) -> tuple[PreTrainedModel, dict[str, int]]:
        """A weight-sharing clone of the text model whose id table also holds the embeddings."""
        if self._extended is None:
            from emaki.adapters.clone import share_clone

            assert self.embeddings is not None
            table = self.model.get_input_embeddings()
            base = int(table.num_embeddings)
            items: list[Embedding] = [self.embeddings.get(n) for n in self.embeddings.names()]
            starts: dict[str, int] = {}
            for emb in items:
                starts[emb.name] = base
                base += len(emb.vectors)
            extra = [e.vectors.to(table.weight.dtype) for e in items]
            clone = share_clone(self.model)
            clone.set_input_embeddings(_ExtendedEmbedding(table, extra))
            self._extended = (clone, starts)
        return self._extended

    def chunks(self, text: str) -> list[list[int]]:
        """The 77-token id sequences for the text (at least one, even for an empty prompt)."""
        ids = self.tokenize(text)
        n = self.chunk_tokens
        parts = [ids[i : i + n] for i in range(0, len(ids), n)] or [[]]
        return [[self.bos, *p, self.eos] + [self.pad] * (n - len(p)) for p in parts]

    @torch.inference_mode()
    def encode(self, text: str, clip_skip: int = 1) -> Conditioning:
        """Encode one prompt to a batch-1 :class:`Conditioning` of shape [1, 77 * chunks, D]."""
        return self.encode_chunks(self.chunks(text), clip_skip)

    @torch.inference_mode()
    def encode_many(self, texts: Sequence[str], clip_skip: int = 1) -> list[Conditioning]:
        """Encode several prompts; those with the same number of chunks share one model call.

        (A prompt and its negative prompt usually do: one text-encoder pass instead of two.)
        """
        chunked = [self.chunks(t) for t in texts]
        out: list[Conditioning | None] = [None] * len(texts)
        for n in sorted({len(c) for c in chunked}):
            idx = [i for i, c in enumerate(chunked) if len(c) == n]
            flat = [chunk for i in idx for chunk in chunked[i]]
            device = next(self.model.parameters()).device
            states = self._hidden_states(torch.tensor(flat, device=device), clip_skip)
            states = states.reshape(len(idx), n * states.shape[1], states.shape[-1]).float()
            for row, i in enumerate(idx):
                out[i] = Conditioning(states[row : row + 1])
        return [c for c in out if c is not None]

    @torch.inference_mode()
    def encode_chunks(self, chunks: Sequence[Sequence[int]], clip_skip: int = 1) -> Conditioning:
        device = next(self.model.parameters()).device
        ids = torch.tensor(chunks, dtype=torch.long, device=device)  # [chunks, 77]
        states = self._hidden_states(ids, clip_skip)  # [chunks, 77, D]
        return Conditioning(states.reshape(1, -1, states.shape[-1]).float())

    def _hidden_states(
        self, ids: Tensor, clip_skip: int, model: PreTrainedModel | None = None
    ) -> Tensor:
        model = self.model if model is None else model
        kwargs = {}
        if self.use_mask:
            # Everything up to and including each chunk's end token is text; the rest is padding.
            is_end = (ids == self.eos).int()
            kwargs["attention_mask"] = (is_end.cumsum(1) - is_end == 0).long()
        if clip_skip <= 1:
            return model(ids, **kwargs).last_hidden_state
        out = model(ids, output_hidden_states=True, **kwargs)
        layers = len(out.hidden_states) - 1
        if clip_skip > layers:
            raise InvalidRequestError(
                f"clip skip {clip_skip} exceeds the text encoder's {layers} layers"
            )
        if not self.clip_style:
            return out.hidden_states[-clip_skip]
        # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
        final_norm = getattr(model, "text_model", model).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip])


def _version(t: Tensor) -> tuple[int, int]:
    """Where a tensor's data lives and how often it was changed in place (inference tensors,
    such as the weights of a LoRA clone made under inference mode, count no changes)."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


def _first_id(tokenizer: PreTrainedTokenizerBase, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise InvalidRequestError(f"the tokenizer has none of {', '.join(names)}")


class _ExtendedEmbedding(torch.nn.Module):
    """An input-embedding table extended past the vocabulary by fixed extra rows.

    Ids below the vocabulary size look up the original (shared, untouched) table; ids past it
    look up the extra rows (textual-inversion vectors). ``weight`` is the original table, for code
    that reads the vocabulary size or dtype from it.
    """

    def __init__(self, table: torch.nn.Module, extra: Sequence[Tensor]) -> None:
        super().__init__()
        self.table = table
        self.vocab = int(table.num_embeddings)
        width = table.weight.shape[1]
        rows = torch.cat(list(extra)) if extra else table.weight.new_zeros(0, width)
        self.register_buffer("extra", rows, persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.vocab + int(self.extra.shape[0])

    def forward(self, ids: Tensor) -> Tensor:
        known = ids < self.vocab
        out = self.table(torch.where(known, ids, torch.zeros_like(ids)))
        if bool((~known).any()):
            picked = self.extra[(ids - self.vocab).clamp(min=0)]
            out = torch.where(known[..., None], out, picked.to(out.dtype))
        return out
