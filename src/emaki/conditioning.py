"""Conditioning: the text-encoder states a denoiser is conditioned on, as typed data.

This is the value that travels from the text stage to the model: the prompt has been parsed and
encoded; what is left is tensors. Guidance batches a positive and a negative conditioning into
one model call when their shapes allow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Encoder hidden states for a batch: ``context`` has shape [B, L, D].

    L is 77 per 75-token chunk; prompts of different lengths have different L. ``negative``
    (bool [B], or None for all False) marks the rows that are classifier-free guidance's
    unconditional side, for model hooks that treat them differently (ControlNet's guess mode,
    self-attention guidance).
    """

    context: Tensor
    negative: Tensor | None = None

    def negative_rows(self) -> Tensor:
        """Bool [B]: which rows are the negative (unconditional) side."""
        if self.negative is None:
            return torch.zeros(self.batch_size, dtype=torch.bool)
        return self.negative

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def can_cat(self, other: Conditioning) -> bool:
        """Whether two conditionings can share one batched model call."""
        return self.context.shape[1:] == other.context.shape[1:]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis (shapes past the batch axis must match)."""
        context = torch.cat([p.context for p in parts])
        if all(p.negative is None for p in parts):
            return Conditioning(context)
        return Conditioning(context, torch.cat([p.negative_rows() for p in parts]))

    def repeat_to(self, batch_size: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to ``batch_size`` (no copy of distinct rows)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot repeat a batch of {self.batch_size} to {batch_size}")
        context = self.context.expand(batch_size, *self.context.shape[1:])
        negative = None if self.negative is None else self.negative.expand(batch_size)
        return Conditioning(context, negative)

    def as_negative(self) -> Conditioning:
        """The same states, every row marked as the unconditional side."""
        return Conditioning(self.context, torch.ones(self.batch_size, dtype=torch.bool))
