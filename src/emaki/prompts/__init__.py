"""The AUTOMATIC1111 prompt language and styles, as pure-Python functions (no torch).

:mod:`emaki.prompts.grammar` reads comments, extra-network tags, ``AND`` parts, prompt editing and
alternation (the step schedule), emphasis weights and ``BREAK`` exactly as A1111 does, and converts
NovelAI emphasis; :mod:`emaki.prompts.styles` reads, writes and applies A1111 ``styles.csv`` files.
"""

from __future__ import annotations

from emaki.prompts.grammar import (
    SCHEDULE_GRAMMAR,
    ExtraNetworkCall,
    ParsedPrompt,
    extract_extra_networks,
    novelai_to_a1111,
    parse_emphasis,
    parse_prompt,
    prompt_schedule,
    split_composable,
    strip_comments,
)
from emaki.prompts.styles import Style, StyleFileError, apply_styles, load_styles, save_styles

__all__ = [
    "SCHEDULE_GRAMMAR",
    "ExtraNetworkCall",
    "ParsedPrompt",
    "Style",
    "StyleFileError",
    "apply_styles",
    "extract_extra_networks",
    "load_styles",
    "novelai_to_a1111",
    "parse_emphasis",
    "parse_prompt",
    "prompt_schedule",
    "save_styles",
    "split_composable",
    "strip_comments",
]
