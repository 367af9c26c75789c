"""X/Y/Z plot axes: A1111's value syntax and the request field each axis type sets.

Values are a comma-separated list (CSV quoting allowed: ``"a, b", c``) whose items may be
ranges, as A1111's ``xyz_grid.py`` reads them:

* ``1-5`` -> 1, 2, 3, 4, 5; ``1-5 (+2)`` -> 1, 3, 5; ``10-5 (-3)`` -> 10, 7;
* ``1-10 [5]`` -> 5 values evenly spaced from 1 to 10 (integers: rounded);
* for numbers with a fraction: ``0.5-1.5 (+0.5)``, ``0.0-1.0 [6]``.

Each axis type is one entry of :data:`AXES`: how to read a value and how to apply it to a
:class:`~emaki.request.GenerationRequest`. Adding an axis is adding an entry.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from emaki.errors import InvalidRequestError
from emaki.request import GenerationRequest

_INT_RANGE = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)(?:\s*\(([+-]\d+)\s*\))?\s*$")
_INT_COUNT = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*\[(\d+)\]\s*$")
_NUM = r"[+-]?\d+(?:\.\d*)?"
_STEP = r"[+-]\d+(?:\.\d*)?"
_FLOAT_RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})(?:\s*\(({_STEP})\s*\))?\s*$")
_FLOAT_COUNT = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*\[(\d+)\]\s*$")


def split_values(text: str) -> list[str]:
    """Comma-separated items with CSV quoting, stripped; empty items dropped."""
    rows = list(csv.reader([text], skipinitialspace=True))
    return [v.strip() for v in (rows[0] if rows else []) if v.strip()]


def _int_items(item: str) -> list[int]:
    if m := _INT_COUNT.match(item):
        a, b, n = int(m[1]), int(m[2]), int(m[3])
        if n < 1:
            raise ValueError("a count must be at least 1")
        return [a] if n == 1 else [round(a + (b - a) * i / (n - 1)) for i in range(n)]
    if m := _INT_RANGE.match(item):
        a, b = int(m[1]), int(m[2])
        step = int(m[3]) if m[3] else (1 if b >= a else -1)
        if step == 0 or (b - a) * step < 0:
            raise ValueError(f"the step {step:+d} never gets from {a} to {b}")
        return list(range(a, b + (1 if step > 0 else -1), step))
    return [int(item)]


def _float_items(item: str) -> list[float]:
    if m := _FLOAT_COUNT.match(item):
        a, b, n = float(m[1]), float(m[2]), int(m[3])
        if n < 1:
            raise ValueError("a count must be at least 1")
        return [a] if n == 1 else [round(a + (b - a) * i / (n - 1), 10) for i in range(n)]
    if m := _FLOAT_RANGE.match(item):
        a, b = float(m[1]), float(m[2])
        step = float(m[3]) if m[3] else (1.0 if b >= a else -1.0)
        if step == 0 or (b - a) * step < 0:
            raise ValueError(f"the step {step:+g} never gets from {a:g} to {b:g}")
        n = int((b - a) / step + 1e-9) + 1
        return [round(a + i * step, 10) for i in range(n)]
    return [float(item)]


def parse_numbers(text: str, kind: type) -> list[Any]:
    out: list[Any] = []
    for item in split_values(text):
        out.extend(_int_items(item) if kind is int else _float_items(item))
    return out


@dataclass(frozen=True)
class AxisType:
    """One kind of axis: how its text becomes values and how a value changes a request."""

    name: str
    parse: Callable[[str], list[Any]]
    apply: Callable[[GenerationRequest, Any], GenerationRequest]
    label: Callable[[Any], str] = str
    model: bool = False  #: changes the model (run outermost: switching is expensive)


def _field(name: str) -> Callable[[GenerationRequest, Any], GenerationRequest]:
    return lambda r, v: replace(r, **{name: v})


def _nested(
    attr: str, name: str, what: str
) -> Callable[[GenerationRequest, Any], GenerationRequest]:
    def apply(r: GenerationRequest, v: Any) -> GenerationRequest:
        inner = getattr(r, attr)
        if inner is None:
            raise InvalidRequestError(f"the {what} axis needs a request with {what} on")
        return replace(r, **{attr: replace(inner, **{name: v})})

    return apply


def _samplers(text: str) -> list[str]:
    from emaki.sampling.registry import resolve_sampler

    values = split_values(text)
    for v in values:
        resolve_sampler(v)  # raises a clear error for unknown names
    return values


def _schedules(text: str) -> list[str]:
    from emaki.sampling.schedules import get_schedule

    values = split_values(text)
    for v in values:
        if v.lower() != "automatic":
            get_schedule(v)
    return values


def _prompt_sr(text: str) -> list[tuple[str, str]]:
    """Prompt S/R: the first value is searched for, each value (itself first) replaces it."""
    values = split_values(text)
    if not values:
        raise InvalidRequestError("Prompt S/R needs at least the text to search for")
    return [(values[0], v) for v in values]


def _apply_sr(r: GenerationRequest, pair: tuple[str, str]) -> GenerationRequest:
    search, value = pair
    if search not in r.prompt and search not in r.negative_prompt:
        raise InvalidRequestError(f"Prompt S/R: {search!r} is not in the prompt")
    return replace(
        r,
        prompt=r.prompt.replace(search, value),
        negative_prompt=r.negative_prompt.replace(search, value),
    )


def _prompt_order(text: str) -> list[tuple[str, ...]]:
    values = split_values(text)
    return [tuple(p) for p in itertools.permutations(values)]


def _apply_order(r: GenerationRequest, order: tuple[str, ...]) -> GenerationRequest:
    """Rearrange the given words where they stand in the prompt (A1111's Prompt order)."""
    positions = sorted((r.prompt.find(w), w) for w in order)
    if any(pos < 0 for pos, _ in positions):
        missing = next(w for pos, w in positions if pos < 0)
        raise InvalidRequestError(f"Prompt order: {missing!r} is not in the prompt")
    pieces, last = [], 0
    for (pos, word), new in zip(positions, order):
        pieces += [r.prompt[last:pos], new]
        last = pos + len(word)
    return replace(r, prompt="".join(pieces) + r.prompt[last:])


def _emphasis(text: str) -> list[str]:
    from emaki.request import EMPHASIS_MODES

    values = split_values(text)
    for v in values:
        if v not in EMPHASIS_MODES:
            raise InvalidRequestError(f"emphasis {v!r} is not one of {', '.join(EMPHASIS_MODES)}")
    return values


def _ints(text: str) -> list[int]:
    return parse_numbers(text, int)


def _floats(text: str) -> list[float]:
    return parse_numbers(text, float)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


AXES: dict[str, AxisType] = {
    a.name.lower(): a
    for a in (
        AxisType("Nothing", lambda t: [None], lambda r, v: r, lambda v: ""),
        AxisType("Seed", _ints, _field("seed")),
        AxisType("Var. seed", _ints, _field("subseed")),
        AxisType("Var. strength", _floats, _field("subseed_strength"), _fmt),
        AxisType("Steps", _ints, _field("steps")),
        AxisType("CFG Scale", _floats, _field("cfg_scale"), _fmt),
        AxisType("Sampler", _samplers, _field("sampler")),
        AxisType("Schedule type", _schedules, _field("schedule")),
        AxisType("Clip skip", _ints, _field("clip_skip")),
        AxisType("Eta", _floats, _field("eta"), _fmt),
        AxisType("Denoising", _floats, _field("denoising_strength"), _fmt),
        AxisType("CFG rescale", _floats, _field("guidance_rescale"), _fmt),
        AxisType("Emphasis", _emphasis, _field("emphasis")),
        AxisType("VAE", split_values, _field("vae")),
        AxisType(
            "Initial noise multiplier",
            _floats,
            _nested("init", "initial_noise_multiplier", "img2img"),
            _fmt,
        ),
        AxisType("Hires steps", _ints, _nested("hires", "steps", "hires fix")),
        AxisType("Hires sampler", _samplers, _nested("hires", "sampler", "hires fix")),
        AxisType("Hires upscaler", split_values, _nested("hires", "upscaler", "hires fix")),
        AxisType("Prompt S/R", _prompt_sr, _apply_sr, lambda v: v[1]),
        AxisType("Prompt order", _prompt_order, _apply_order, lambda v: ", ".join(v)),
        AxisType("Checkpoint name", split_values, lambda r, v: r, model=True),
    )
}


@dataclass(frozen=True)
class Axis:
    """An axis of a plot: its type and its values."""

    type: AxisType
    values: tuple[Any, ...]

    def labels(self) -> list[str]:
        if self.type.name == "Nothing":
            return [""]
        return [f"{self.type.name}: {self.type.label(v)}" for v in self.values]


def parse_axis(spec: str) -> Axis:
    """``"TYPE: VALUES"`` (e.g. ``"Steps: 10-30 (+10)"``) as an :class:`Axis`."""
    name, sep, text = spec.partition(":")
    kind = AXES.get(name.strip().lower())
    if not sep or kind is None:
        known = ", ".join(a.name for a in AXES.values())
        raise InvalidRequestError(
            f"an axis is 'TYPE: VALUES' with TYPE one of: {known}; got {spec!r}"
        )
    try:
        values = kind.parse(text)
    except ValueError as e:
        raise InvalidRequestError(f"{kind.name} axis: cannot read {text.strip()!r} ({e})") from None
    if not values:
        raise InvalidRequestError(f"the {kind.name} axis has no values")
    return Axis(kind, tuple(values))
