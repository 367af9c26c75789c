"""Prompts to scheduled conditioning: the stage between the prompt grammar and the sampler.

A prompt (after its extra-network tags are taken out) is split into composable ``AND`` parts;
each part, and the negative prompt, gets its prompt-editing schedule (:mod:`emaki.prompts.
grammar`); every distinct text of all those schedules is chunked and encoded exactly once
(texts with the same chunk count share one text-encoder call), then the schedules point at the
encoded states. During sampling :class:`ScheduledGuidance` hands classifier-free guidance the
conditioning of the current step, so editing and alternation cost no extra encoder passes.

Step semantics follow A1111: at sampling step ``i`` (0-based) a schedule entry ``(end, text)`` is
used when ``i <= end`` and no earlier entry qualifies, so ``[a:b:0.25]`` at 100 steps uses ``a``
for steps 0-25. The step advances when the sampler reports a finished step (its callback), so
every model evaluation inside one step (Heun's correction, DPM2's midpoint) sees that step's
conditioning. (A1111 counts denoiser calls instead, so its two-evaluation samplers switch
prompts after half the intended steps; emaki does not reproduce that accident.)

The negative prompt supports editing and alternation but not ``AND`` (as in A1111, where the
word is then plain text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.prompts.grammar import parse_emphasis, prompt_schedule, split_composable
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.types import StepInfo
from emaki.text.encoder import TextEncoder, TokenChunks


@dataclass(frozen=True)
class ScheduledCond:
    """One prompt's conditioning over the sampling steps: ``(end step, conditioning)`` entries."""

    ends: tuple[int, ...]
    conds: tuple[Conditioning, ...]

    def index_at(self, step: int) -> int:
        """Index of the entry used at 0-based sampling step ``step``."""
        for i, end in enumerate(self.ends):
            if step <= end:
                return i
        return len(self.ends) - 1


@dataclass(frozen=True)
class PromptConds:
    """Everything guidance needs for a job: weighted positive parts and the negative, scheduled."""

    parts: tuple[tuple[float, ScheduledCond], ...]
    negative: ScheduledCond

    def at(self, step: int) -> GuidedCond:
        """The guidance conditioning of sampling step ``step`` (the same object while it holds)."""
        key = (*(s.index_at(step) for _, s in self.parts), self.negative.index_at(step))
        cache = self.__dict__.setdefault("_at", {})  # frozen: cache outside the fields
        if key not in cache:
            conds = [(w, s.conds[i]) for (w, s), i in zip(self.parts, key, strict=False)]
            (weight, first), *more = conds
            cache[key] = GuidedCond(first, self.negative.conds[key[-1]], weight, tuple(more))
        return cache[key]


@dataclass(frozen=True)
class EncodedPrompt:
    """The encoded prompts of a job with what infotext and ``emaki prompt`` report."""

    conds: PromptConds
    tokens: dict[str, TokenChunks]  #: every distinct scheduled text and its chunks
    embeddings: tuple[str, ...]  #: textual-inversion embeddings used, in order of first use


def encode_prompts(
    encoder: TextEncoder,
    prompt: str,
    negative: str,
    steps: int,
    *,
    clip_skip: int = 1,
    emphasis: str = "Original",
) -> EncodedPrompt:
    """Encode a prompt (without extra-network tags) and a negative prompt for ``steps`` steps."""
    parts = [(w, prompt_schedule(text, steps)) for text, w in split_composable(prompt)]
    negative_schedule = prompt_schedule(negative, steps)
    texts = list(dict.fromkeys(t for _, s in parts for _, t in s))
    texts += [t for t in dict.fromkeys(t for _, t in negative_schedule) if t not in texts]
    tokens = {t: encoder.tokenize_weighted(_pieces(t, emphasis)) for t in texts}
    encoded = dict(
        zip(texts, encoder.encode_weighted([tokens[t] for t in texts], clip_skip, emphasis))
    )

    def scheduled(schedule: Sequence[tuple[int, str]]) -> ScheduledCond:
        return ScheduledCond(tuple(e for e, _ in schedule), tuple(encoded[t] for _, t in schedule))

    conds = PromptConds(tuple((w, scheduled(s)) for w, s in parts), scheduled(negative_schedule))
    used = tuple(dict.fromkeys(n for t in texts for n in tokens[t].embeddings))
    return EncodedPrompt(conds, tokens, used)


def stack_plain(encoded: Sequence[EncodedPrompt]) -> EncodedPrompt | None:
    """Several plain prompts' conditionings as one batch (row ``i`` is prompt ``i``), or None.

    "Plain" means one ``AND`` part of weight 1 without editing or alternation, and every prompt
    the same number of chunks; the negative prompt must be the same for all (the first one's is
    used). Rows are encoded independently, so a batch of stacked prompts is the same as each
    prompt on its own, with one model call per step for all of them.
    """
    if not encoded:
        return None
    rows: list[Conditioning] = []
    for e in encoded:
        parts = e.conds.parts
        if len(parts) != 1 or parts[0][0] != 1.0 or len(parts[0][1].conds) != 1:
            return None
        if not _same_schedule(e.conds.negative, encoded[0].conds.negative):
            return None
        rows.append(parts[0][1].conds[0])
    if any(not r.can_cat(rows[0]) or r.batch_size != 1 for r in rows):
        return None
    stacked = ScheduledCond((encoded[0].conds.parts[0][1].ends[0],), (Conditioning.cat(rows),))
    tokens = {t: c for e in encoded for t, c in e.tokens.items()}
    used = tuple(dict.fromkeys(n for e in encoded for n in e.embeddings))
    return EncodedPrompt(PromptConds(((1.0, stacked),), encoded[0].conds.negative), tokens, used)


def _same_schedule(a: ScheduledCond, b: ScheduledCond) -> bool:
    return a.ends == b.ends and all(
        torch.equal(x.context, y.context) for x, y in zip(a.conds, b.conds, strict=True)
    )


def _pieces(text: str, emphasis: str) -> list[tuple[str, float]]:
    """Weighted pieces of a text; the "None" mode reads brackets as plain text (A1111)."""
    return [(text, 1.0)] if emphasis == "None" else parse_emphasis(text)


class ScheduledGuidance:
    """CFG whose conditioning follows the prompt schedule, one step at a time.

    ``cfg`` is a :class:`CFGDenoiser` or another guided denoiser taking a :class:`GuidedCond`
    (self-attention guidance).

    Use as the sampler's denoiser with ``cond=`` a :class:`PromptConds`, and pass
    :meth:`on_step` as (or inside) the sampler's step callback.
    """

    def __init__(
        self,
        cfg: CFGDenoiser,
        also: tuple[Callable[[StepInfo], None], ...] = (),
        windows: tuple[Callable[[Any], None], ...] = (),
    ) -> None:
        self.cfg = cfg
        self.step = 0
        self.also = also  #: more step listeners (e.g. ControlNet start/end windows)
        #: told which MultiDiffusion window the next calls are for (ControlNet hint crops)
        self.windows = windows

    def on_window(self, window: Any) -> None:
        """Pass the MultiDiffusion window of the next calls (None: the whole latent) on."""
        for listener in self.windows:
            listener(window)

    def __call__(self, x: Tensor, sigma: Tensor, cond: PromptConds) -> Tensor:
        return self.cfg(x, sigma, cond.at(self.step))

    def on_step(self, info: StepInfo) -> None:
        """Advance to the step after the one the sampler just finished."""
        self.step = info.i + 1
        for listener in self.also:
            listener(info)
