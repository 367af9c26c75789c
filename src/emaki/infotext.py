"""Generation metadata in the AUTOMATIC1111 "infotext" format, and NovelAI metadata read into it.

An infotext is the plain-text record of how an image was made, as A1111 writes it into the PNG
``parameters`` text chunk (and into EXIF ``UserComment`` for JPEG/WEBP)::

    a photo of an astronaut riding a horse, (highly detailed:1.2)
    Negative prompt: lowres, blurry
    Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768

Lines 1..n are the prompt; an optional ``Negative prompt:`` line (continued on the following lines)
holds the negative prompt; the last line holds ``Key: value`` pairs separated by ``", "``. We write
and read this exact format so that images move freely between emaki, A1111, Forge and the many
tools that read A1111's PNG info.

Reading follows A1111's ``parse_generation_parameters``: the last line counts as parameters only if
it holds at least three ``key: value`` matches of :data:`PARAM_PATTERN`; otherwise the whole text is
prompt. Every line is stripped of surrounding whitespace, and any line starting with
``Negative prompt:`` switches to the negative prompt.

Round-trip rule. ``parse_infotext(format_infotext(p, n, params))`` gives back ``p``, ``n`` and every
parameter as the string :func:`format_value` wrote, plus the ``Key-1``/``Key-2`` entries derived from
``WxH`` values, provided that

* ``params`` holds at least three non-None entries (:func:`format_infotext` refuses fewer: with
  fewer, a reader would take a prompt line that looks like ``a: b, c: d, e: f`` for the parameters,
  or the parameters for prompt text; emaki always writes Steps, Sampler, CFG scale, Seed and Size);
* the prompts are in the form the format can carry: no whitespace around any line or around the
  whole text, ``\\n`` line ends, and no line starting with ``Negative prompt:`` (A1111 reads the same
  text the same way, so this is the format's limit, not ours). Prompts with surrounding whitespace
  or ``\\r\\n`` come back normalised, and a second round trip is then exact; a prompt line starting
  with ``Negative prompt:`` is read as the start of the negative prompt.

Values are written as-is unless they contain ``,`` ``:`` or a line break, when they are JSON-quoted
(A1111's rule). We also quote values that start with ``"`` or have surrounding whitespace, which
A1111 leaves bare and then misreads; A1111 reads our quoted form correctly.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from emaki.errors import InfotextError

__all__ = [
    "A1111_DEFAULTS",
    "NOVELAI_SAMPLERS",
    "PARAM_PATTERN",
    "Infotext",
    "format_infotext",
    "format_value",
    "infotext_from_novelai",
    "params_float",
    "params_int",
    "parse_infotext",
    "quote",
]

PARAM_PATTERN = re.compile(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
"""One ``Key: value`` entry of the parameters line, as A1111 matches it (value quoted or bare)."""

_KEY = re.compile(r"\w[\w \-/]+")
_SIZE_VALUE = re.compile(r"^(\d+)x(\d+)$")
_INT_TEXT = re.compile(r"^[+-]?\d+$")
_FLOAT_TEXT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_NEGATIVE_PREFIX = "Negative prompt:"
_MIN_PARAMS = 3  # A1111 needs this many matches to recognise the last line as parameters.

A1111_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "Clip skip": "1",
        "RNG": "GPU",
        "Schedule type": "Automatic",
        "Hires sampler": "Use same sampler",
        "Hires checkpoint": "Use same checkpoint",
        "Hires prompt": "",
        "Hires negative prompt": "",
        "Mask mode": "Inpaint masked",
        "Masked content": "original",
        "Inpaint area": "Whole picture",
        "Masked area padding": "32",
        "FP8 weight": "Disable",
        "Emphasis": "Original",
    }
)
"""What A1111 assumes for a key its infotext leaves out (it writes e.g. ``Clip skip`` only if > 1).

:func:`parse_infotext` does not fill these in, so a parse reports exactly what the text says; a
consumer that applies an infotext uses ``params.get(key, A1111_DEFAULTS.get(key))``.
"""

NOVELAI_SAMPLERS: Mapping[str, str] = MappingProxyType(
    {
        "k_euler_ancestral": "Euler a",
        "k_euler_a": "Euler a",
        "k_euler": "Euler",
        "k_lms": "LMS",
        "k_heun": "Heun",
        "k_dpm_2": "DPM2",
        "k_dpm_2_a": "DPM2 a",
        "k_dpm_2_ancestral": "DPM2 a",
        "k_dpmpp_2s_a": "DPM++ 2S a",
        "k_dpmpp_2s_ancestral": "DPM++ 2S a",
        "k_dpmpp_2m": "DPM++ 2M",
        "k_dpmpp_sde": "DPM++ SDE",
        "k_dpmpp_2m_sde": "DPM++ 2M SDE",
        "k_dpm_fast": "DPM fast",
        "k_dpm_adaptive": "DPM adaptive",
        "ddim": "DDIM",
        "ddim_v3": "DDIM",
        "plms": "PLMS",
    }
)
"""NovelAI sampler ids → A1111 sampler names.

A1111 looks the id up among its samplers' aliases and shows ``Euler a`` when there is none; its
aliases miss NovelAI's spellings ``k_dpm_2_ancestral``/``k_dpmpp_2s_ancestral``/``ddim_v3``, which
we map to the sampler they name. An id not listed here is kept as written rather than replaced by
``Euler a``, so that nobody reproduces an image with a sampler it was not made with.
"""

_NOVELAI_SCHEDULES: Mapping[str, str] = MappingProxyType(
    {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential"}
)


@dataclass(frozen=True)
class Infotext:
    """A parsed infotext: prompt, negative prompt and parameters, all as the text gave them.

    ``params`` maps each key to its (unquoted) string value in the order the text lists them; a
    ``WxH`` value under ``Key`` also gives ``Key-1`` (width) and ``Key-2`` (height). Use
    :func:`params_int` and :func:`params_float` to read numbers with a clear error.
    """

    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """Format back to infotext, leaving out the ``Key-1``/``Key-2`` entries a parse derived."""
        derived = set()
        for key, value in self.params.items():
            match = _SIZE_VALUE.match(value)
            if match is not None:
                if self.params.get(f"{key}-1") == match.group(1):
                    derived.add(f"{key}-1")
                if self.params.get(f"{key}-2") == match.group(2):
                    derived.add(f"{key}-2")
        written = {k: v for k, v in self.params.items() if k not in derived}
        return format_infotext(self.prompt, self.negative_prompt, written)


# ---------------------------------------------------------------------------------------- writing


def format_value(value: object) -> str:
    """Write one parameter value as text, the way A1111's infotexts show numbers.

    Integral floats lose their ``.0`` (``7.0`` → ``7``); other floats are rounded to 6 decimal places
    so that float noise (``0.30000000000000004``) does not reach the file, except values below that
    resolution, which keep 6 significant digits (``1e-07``). ``True``/``False`` are written as
    Python spells them, as A1111 does. NaN and infinities are refused: no sampler setting has them.
    """
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"cannot write the non-finite number {number!r} into an infotext")
        rounded = round(number, 6)
        if rounded == int(rounded) and abs(rounded) < 1e15 and (rounded != 0 or number == 0):
            return str(int(rounded))
        if rounded == 0:
            return repr(float(f"{number:.6g}"))
        return repr(rounded)
    return str(value)


def quote(value: object) -> str:
    """Write ``value`` as an infotext parameter value, JSON-quoting it when a reader needs that.

    A1111's rule: quote when the text holds ``,`` ``:`` or a line break (``\\n``; we count every
    line-breaking character, ``\\r`` included). We also quote text that starts with ``"`` or has
    whitespace around it, because A1111's reader would unquote or strip it. JSON escapes keep the
    quoted value on one line; non-ASCII text is written as-is (``ensure_ascii=False``), as A1111 does.
    """
    text = format_value(value)
    needs_quotes = (
        "," in text
        or ":" in text
        or len(text.splitlines()) > 1
        or text.startswith('"')
        or text != text.strip()  # also catches a single trailing line break
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Build the infotext A1111 would write for these prompts and parameters.

    ``params`` gives the keys in the order to write them (A1111's order is Steps, Sampler, Schedule
    type, CFG scale, Seed, Size, Model hash, Model, VAE hash, VAE, Variation seed, ..., Version);
    ``None`` values are left out. Keys must match A1111's key pattern (a word character, then at
    least one more word character, space, ``-`` or ``/``) and at least three values must be given,
    so that every reader finds the parameters line again (see the module docstring).

    Raises ``ValueError`` for a key a reader could not match or for fewer than three parameters:
    both are mistakes in the calling code, not in user input.
    """
    entries = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or _KEY.fullmatch(key) is None:
            raise ValueError(f"infotext key {key!r} does not match the pattern readers use")
        entries.append(f"{key}: {quote(value)}")
    if len(entries) < _MIN_PARAMS:
        raise ValueError(
            f"an infotext needs at least {_MIN_PARAMS} parameters for readers to find the "
            f"parameters line; got {len(entries)}"
        )
    negative_line = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_line}\n{', '.join(entries)}".strip()


# ---------------------------------------------------------------------------------------- reading


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        text = json.loads(value)
    except json.JSONDecodeError:
        return value
    return text if isinstance(text, str) else value


def _parse_params_line(line: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, raw_value in PARAM_PATTERN.findall(line):
        value = _unquote(raw_value)
        params[key] = value
        size = _SIZE_VALUE.match(value)
        if size is not None:
            params[f"{key}-1"] = size.group(1)
            params[f"{key}-2"] = size.group(2)
    return params


def parse_infotext(text: str) -> Infotext:
    """Read an infotext the way A1111's ``parse_generation_parameters`` does.

    The last line is the parameters line only if :data:`PARAM_PATTERN` matches it at least three
    times; otherwise all lines are prompt. Lines are stripped; the first line starting with
    ``Negative prompt:`` and every line after it (but the parameters line) form the negative prompt.
    Quoted values are unquoted with JSON; a ``WxH`` value under ``Key`` also gives ``Key-1`` and
    ``Key-2``; when a key repeats, the last value wins. A1111's defaults for missing keys are not
    filled in (see :data:`A1111_DEFAULTS`). Never raises: any text is at worst all prompt.
    """
    *lines, last_line = text.strip().split("\n")
    if len(PARAM_PATTERN.findall(last_line)) < _MIN_PARAMS:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        target = negative_lines if in_negative else prompt_lines
        if target or line:  # A1111 drops empty lines until the first text (and keeps them after)
            target.append(line)
    return Infotext(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        params=_parse_params_line(last_line),
    )


def _params_of(source: Infotext | Mapping[str, str]) -> Mapping[str, str]:
    return source.params if isinstance(source, Infotext) else source


def params_int(source: Infotext | Mapping[str, str], key: str, default: int | None = None) -> int:
    """The parameter ``key`` as an int; ``default`` when it is absent and a default is given.

    Raises :class:`InfotextError` naming the key when it is absent without a default, or when its
    value is not a plain integer (``"20"``, ``"-1"``; not ``"20.0"`` or ``"1_000"``).
    """
    params = _params_of(source)
    if key not in params:
        if default is None:
            raise InfotextError(f"infotext has no {key!r} parameter")
        return default
    value = params[key]
    if _INT_TEXT.match(value.strip()) is None:
        raise InfotextError(f"infotext parameter {key!r} is not an integer: {value!r}")
    return int(value)


def params_float(
    source: Infotext | Mapping[str, str], key: str, default: float | None = None
) -> float:
    """The parameter ``key`` as a finite float; ``default`` when it is absent and one is given.

    Raises :class:`InfotextError` naming the key when it is absent without a default, or when its
    value is not a decimal number (``"7"``, ``"0.45"``, ``"1e-07"``; not ``"nan"`` or ``"7,5"``).
    """
    params = _params_of(source)
    if key not in params:
        if default is None:
            raise InfotextError(f"infotext has no {key!r} parameter")
        return default
    value = params[key]
    if _FLOAT_TEXT.match(value.strip()) is None:
        raise InfotextError(f"infotext parameter {key!r} is not a number: {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------- NovelAI


def infotext_from_novelai(
    description: str,
    comment_json: str | Mapping[str, object],
    width: int | None = None,
    height: int | None = None,
) -> Infotext:
    """Convert NovelAI PNG metadata to the infotext an A1111 user sees for that image.

    NovelAI writes the prompt in the ``Description`` text chunk and a JSON object in ``Comment``
    (``steps``, ``sampler``, ``seed``, ``scale`` = CFG, ``uc`` = negative prompt, ``width``,
    ``height``, ``noise_schedule``...). Like A1111 we report ``Size`` from the image (``width`` and
    ``height``; the JSON's values when those are not given) and add ``Clip skip: 2, ENSD: 31337``,
    the settings NovelAI's SD1 models were run with. Differences from A1111, on purpose: samplers are
    mapped with :data:`NOVELAI_SAMPLERS` (an unknown id is kept, not turned into ``Euler a``), a
    ``noise_schedule`` of karras/exponential/polyexponential becomes ``Schedule type``, floats are
    written by :func:`format_value` (``5.0`` → ``5``), and a missing ``uc`` is an empty negative.

    NovelAI's emphasis syntax (``{word}`` ×1.05, ``[word]`` ÷1.05) is left as text: A1111's
    ``(word)``/``[word]`` use 1.1 and the same square brackets, so no faithful rewrite exists.

    Raises :class:`InfotextError` when ``comment_json`` is not a JSON object or no size is known.
    """
    if isinstance(comment_json, Mapping):
        comment: Mapping[str, object] = comment_json
    else:
        try:
            loaded = json.loads(comment_json)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InfotextError(f"NovelAI Comment is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise InfotextError("NovelAI Comment is not a JSON object")
        comment = loaded

    width = width if width is not None else _optional_int(comment.get("width"))
    height = height if height is not None else _optional_int(comment.get("height"))
    if width is None or height is None:
        raise InfotextError("NovelAI metadata gives no image size")

    sampler_id = comment.get("sampler")
    sampler = None if sampler_id is None else NOVELAI_SAMPLERS.get(str(sampler_id), str(sampler_id))
    schedule = _NOVELAI_SCHEDULES.get(str(comment.get("noise_schedule", "")))
    params: dict[str, object] = {
        "Steps": comment.get("steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": comment.get("scale"),
        "Seed": comment.get("seed"),
        "Size": f"{width}x{height}",
        "Clip skip": 2,
        "ENSD": 31337,
    }
    negative = comment.get("uc")
    text = format_infotext(description, "" if negative is None else str(negative), params)
    return parse_infotext(text)


def _optional_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)
