"""Prompt sets for evaluation: paraphrases of identities, and which of them use unseen words."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

STOPWORDS = frozenset(["a", "an", "the", "in", "with", "of", "from", "on", "and"])
_WORD = re.compile(r"[a-z0-9']+")


def paraphrases() -> list[dict[str, Any]]:
    """``[{"prompt": ..., "targets": [CLDR names]}, ...]`` shipped with emaki."""
    text = resources.files("emaki.eval").joinpath("paraphrases.json").read_text(encoding="utf-8")
    return list(json.loads(text)["prompts"])


def caption_vocabulary(captions: list[str]) -> set[str]:
    return {w for c in captions for w in _WORD.findall(c.lower())}


def unseen(prompt: str, vocabulary: set[str]) -> bool:
    """Whether every content word of ``prompt`` is absent from ``vocabulary``."""
    words = [w for w in _WORD.findall(prompt.lower()) if w not in STOPWORDS]
    return bool(words) and not any(w in vocabulary for w in words)
