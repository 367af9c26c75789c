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

    L is 77 per 75-token chunk; prompts of different lengths have different L.
    """

    context: Tensor

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def can_cat(self, other: Conditioning) -> bool:
        """Whether two conditionings can share one batched model call."""
        return self.context.shape[1:] == other.context.shape[1:]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis (shapes past the batch axis must match)."""
        return Conditioning(torch.cat([p.context for p in parts]))

    def repeat_to(self, batch_size: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to ``batch_size`` (no copy of distinct rows)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot repeat a batch of {self.batch_size} to {batch_size}")
        return Conditioning(self.context.expand(batch_size, *self.context.shape[1:]))
