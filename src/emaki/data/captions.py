"""Captions for emoji and clipart from their names, keywords and styles.

Icon sets name their icons in CLDR style (``grinning-face-with-big-eyes``); iconify's ``chars.json``
maps code points to those names. From the code point, npm ``emojilib`` gives keywords ("happy",
"joy", "smile"), and npm ``emoji-datasource`` gives CLDR names and categories. A caption is the
name in words, a few keywords and the source's style::

    grinning face with big eyes, happy, joy, haha, smile, twemoji style

Names of other spellings (Mozilla's ``alarmclock``) are matched to CLDR names with the hyphens
removed. Skin-tone variants are recognised by name so that a build can subsample them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
_TONE_WORDS = {t: t.replace("-", " ") + " skin tone" for t in TONES}
_SKIN_RE = re.compile(r"(?:-(?:light|medium-light|medium|medium-dark|dark)-skin-tone)+$")
_NUM_SUFFIX = re.compile(r"-\d+$")
_EMOTICON = re.compile(r"^[^a-z]*$")


def codepoints_to_text(cp: str) -> str:
    """``"1f600"`` or ``"1f468-200d-1f469"`` → the emoji string."""
    return "".join(chr(int(h, 16)) for h in cp.split("-") if h)


def _norm_cp(cp: str) -> str:
    return "-".join(h for h in cp.lower().split("-") if h and h != "fe0f")


@dataclass
class SkinTone:
    """The skin-tone part of an icon name: the base name and the tone words (or ``None``)."""

    base: str
    tone: str | None


def split_skin_tone(name: str, names_in_set: set[str]) -> SkinTone:
    """Split ``waving-hand-medium-skin-tone`` or Fluent's ``waving-hand-medium`` into base and tone.

    Fluent's short suffixes (``-dark``, ``-light``…) are only read as tones when the set also has
    the base name or three other tones of it, so that ``traffic-light`` stays a traffic light.
    """
    m = _SKIN_RE.search(name)
    if m:
        base = name[: m.start()]
        tones = m.group(0)[1:].replace("-skin-tone", "").split("-")
        return SkinTone(base, " and ".join(_merge_tones(tones)) + " skin tone")
    for tone in sorted(TONES, key=len, reverse=True):
        suffix = "-" + tone
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            siblings = sum(f"{base}-{t}" in names_in_set for t in TONES)
            if base in names_in_set or siblings >= 3:
                return SkinTone(base, _TONE_WORDS[tone])
    return SkinTone(name, None)


def _merge_tones(parts: list[str]) -> list[str]:
    """``["medium", "dark", "light"]`` → ``["medium-dark", "light"]`` (tones of couples)."""
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "medium" and i + 1 < len(parts) and parts[i + 1] in ("light", "dark"):
            out.append(f"medium {parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def segment_words(text: str, vocabulary: frozenset[str] | set[str]) -> list[str] | None:
    """Split run-together words (``fishingpoleandfish``) into the fewest words of ``vocabulary``.

    Dynamic programming over prefixes; returns None when the text cannot be covered entirely.
    """
    n = len(text)
    best: list[list[str] | None] = [None] * (n + 1)
    best[0] = []
    for end in range(1, n + 1):
        for start in range(max(0, end - 24), end):
            prev = best[start]
            piece = text[start:end]
            if prev is not None and piece in vocabulary:
                cand = [*prev, piece]
                if best[end] is None or len(cand) < len(best[end]):
                    best[end] = cand
    return best[n]


def name_words(name: str) -> str:
    """``grinning-face-with-big-eyes`` → ``grinning face with big eyes`` (numbered variants unnumbered)."""
    return _NUM_SUFFIX.sub("", name).replace("-", " ").replace("_", " ").strip()


@dataclass
class EmojiLexicon:
    """Names, keywords and categories of emoji, keyed by CLDR icon name."""

    name_to_cp: dict[str, str] = field(default_factory=dict)
    keywords: dict[str, list[str]] = field(default_factory=dict)  # normalised code point → words
    category: dict[str, str] = field(default_factory=dict)  # normalised code point → category
    _squashed: dict[str, str] = field(default_factory=dict)
    _vocab: frozenset[str] | None = None

    def add_chars(self, chars: dict[str, str]) -> None:
        for cp, name in chars.items():
            self.name_to_cp.setdefault(name, cp)
            self._squashed.setdefault(name.replace("-", ""), name)
        self._vocab = None

    @classmethod
    def load(
        cls, chars_files: list[Path], emojilib_dir: Path | None, datasource_dir: Path | None
    ) -> EmojiLexicon:
        lex = cls()
        for f in chars_files:
            lex.add_chars(json.loads(f.read_text()))
        if emojilib_dir is not None:
            data = json.loads((emojilib_dir / "dist" / "emoji-en-US.json").read_text())
            for emoji, words in data.items():
                cp = "-".join(f"{ord(c):x}" for c in emoji)
                lex.keywords[_norm_cp(cp)] = list(words)
        if datasource_dir is not None:
            for rec in json.loads((datasource_dir / "emoji.json").read_text()):
                cat = rec.get("category") or ""
                for key in ("unified", "non_qualified"):
                    if rec.get(key):
                        lex.category.setdefault(_norm_cp(rec[key]), cat)
        return lex

    def canonical(self, name: str) -> str:
        """The CLDR name for an icon name, matching hyphen-less spellings.

        A run-together name that matches no CLDR name (Mozilla's ``fishingpoleandfish``) is split
        into known words where it can be (``fishing-pole-and-fish``); otherwise it is unchanged.
        """
        if name in self.name_to_cp:
            return name
        hit = self._squashed.get(name.replace("-", ""))
        if hit is not None:
            return hit
        parts = [segment_words(p, self._vocabulary()) or [p] for p in name.split("-")]
        return "-".join(w for ws in parts for w in ws)

    def _vocabulary(self) -> frozenset[str]:
        if self._vocab is None:
            words = {w for n in self.name_to_cp for w in n.split("-") if len(w) > 1}
            self._vocab = frozenset(words)
        return self._vocab

    def keywords_for(self, name: str, limit: int = 5) -> list[str]:
        cp = self.name_to_cp.get(name)
        if cp is None:
            return []
        words = self.keywords.get(_norm_cp(cp), [])
        base_words = set(name_words(name).split())
        out: list[str] = []
        for w in words[1:]:  # the first entry is the snake_case name itself
            w = w.replace("_", " ").strip().lower()
            if not w or _EMOTICON.match(w) or w in base_words or w in out:
                continue
            out.append(w)
            if len(out) == limit:
                break
        return out

    def category_for(self, name: str) -> str:
        cp = self.name_to_cp.get(name)
        return self.category.get(_norm_cp(cp), "") if cp else ""


def emoji_caption(
    base_name: str, tone: str | None, style: str, lexicon: EmojiLexicon, keywords: int = 5
) -> str:
    """The caption of one icon: name words, tone, keywords, style."""
    parts = [name_words(base_name)]
    if tone:
        parts.append(tone)
    parts.extend(lexicon.keywords_for(base_name, keywords))
    parts.append(style)
    return ", ".join(p for p in parts if p)


_CLIPART_NOISE = re.compile(r"(?i)\b(?:openclipart|clipart|clip art|svg|\d{2,})\b")


def clipart_title(path: Path) -> str:
    """A caption from a clipart file name: ``Red_Apple_01.svg`` → ``red apple``."""
    stem = path.stem
    stem = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    stem = re.sub(r"[_\-.]+", " ", stem)
    stem = _CLIPART_NOISE.sub(" ", stem)
    return re.sub(r"\s+", " ", stem).strip().lower()
