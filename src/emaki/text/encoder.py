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

The A1111 prompt grammar (emphasis, editing, BREAK, comma backtracking) belongs to
:mod:`emaki.prompts`; this module encodes plain text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError

CHUNK_TOKENS = 75


class TextEncoder:
    """Tokenizer + text model, encoding one prompt at a time (results are cacheable)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
        self.eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        length = int(tokenizer.model_max_length)
        self.chunk_tokens = (length if 8 <= length <= 1024 else CHUNK_TOKENS + 2) - 2
        self.use_mask = bool(getattr(model.config, "use_attention_mask", False))
        self.clip_style = hasattr(getattr(model, "text_model", model), "final_layer_norm")

    def tokenize(self, text: str) -> list[int]:
        """BPE token ids of the text, without start/end tokens."""
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

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

    def _hidden_states(self, ids: Tensor, clip_skip: int) -> Tensor:
        kwargs = {}
        if self.use_mask:
            # Everything up to and including each chunk's end token is text; the rest is padding.
            is_end = (ids == self.eos).int()
            kwargs["attention_mask"] = (is_end.cumsum(1) - is_end == 0).long()
        if clip_skip <= 1:
            return self.model(ids, **kwargs).last_hidden_state
        out = self.model(ids, output_hidden_states=True, **kwargs)
        layers = len(out.hidden_states) - 1
        if clip_skip > layers:
            raise InvalidRequestError(
                f"clip skip {clip_skip} exceeds the text encoder's {layers} layers"
            )
        if not self.clip_style:
            return out.hidden_states[-clip_skip]
        # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
        final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip])


def _first_id(tokenizer: PreTrainedTokenizerBase, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise InvalidRequestError(f"the tokenizer has none of {', '.join(names)}")
