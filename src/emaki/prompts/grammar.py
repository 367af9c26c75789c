"""The AUTOMATIC1111 (A1111) prompt language, read the way A1111 reads it. Pure Python, no torch.

A prompt written for the A1111 web UI goes through these stages, in this order (the order matters:
each stage sees the text the previous one left):

1. **Comments** (:func:`strip_comments`, A1111 1.8+). ``#`` starts a comment that runs to the end of
   the line. Two passes, exactly as A1111 does them:

   * a *whole-line* comment (``#`` at the very start of the text, or right after a line break) is
     removed together with the line break before it and the one after it, and one ``\\n`` is put
     back: ``"a\\n# note\\nb"`` → ``"a\\nb"``;
   * any remaining ``#`` (an *inline* comment) is removed up to and including the line break after
     it, and one ``\\n`` is put back: ``"a # note\\nb"`` → ``"a \\nb"``.

   Quirks kept: a comment that ends the text still leaves a ``\\n`` (``"a # x"`` → ``"a \\n"``,
   ``"# x"`` → ``"\\n"``); the first pass cannot match two comment lines in a row (the line break
   between them is used by the first match), so the second is removed by the inline pass and one
   extra line break survives (``"a\\n#x\\n#y\\nb"`` → ``"a\\n\\nb"``). There is no escape for ``#``.

2. **Extra networks** (:func:`extract_extra_networks`). Every ``<kind:arg1:arg2...>`` (``kind`` a run
   of word characters, the arguments anything up to the first ``>``) is cut out of the text, leaving
   nothing in its place (``"a <lora:x:1> b"`` → ``"a  b"``, two spaces). Arguments are split on
   ``:``; the first is the network's name; each later one holding exactly one ``=`` is a *named*
   argument (``te=0.5``), the others are *positional*, in order. Values are kept as written
   (``" 0.8"`` keeps its space: A1111 converts later with ``float``). Differences from A1111, on
   purpose: the first argument is always the name, even when it holds a ``=`` (A1111 would file it
   as a named argument and then fail to find a name).

3. **Composable diffusion** (:func:`split_composable`). The text is split on the uppercase word
   ``AND`` (regex ``\\bAND\\b``: ``BAND``, ``ANDY`` and ``and`` do not split). Each part may end with
   ``:weight`` (optional spaces around the colon; ``1``, ``1.``, ``.5``, ``-2``, ``+0.5``), which is
   removed and becomes the part's weight (default 1.0). Whitespace at the end of a part is dropped,
   whitespace at its start is kept (``"a AND b"`` → ``"a"``, ``" b"``), as in A1111.

4. **Scheduling** (:func:`prompt_schedule`), per ``AND`` part: prompt editing and alternation,
   parsed with `lark`'s Earley parser using A1111's grammar::

       !start: (prompt | /[][():]/+)*
       prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
       !emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
       scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
       alternate: "[" prompt ("|" [prompt])+ "]"
       WHITESPACE: /\\s+/
       plain: /([^\\\\\\[\\]():|]|\\\\.)+/
       NUMBER: lark's common.SIGNED_NUMBER

   The grammar is ambiguous; A1111 takes whatever tree lark's Earley parser picks (its default
   ``ambiguity="resolve"``), and so do we, by using the same grammar with the same parser settings.
   A text that does not parse at all (``"a [unbalanced"``) is used unchanged for every step.

   * ``[from:to:when]`` shows ``from`` up to and including step ``when``, then ``to``;
     ``[to:when]`` shows nothing, then ``to``; ``[from::when]`` shows ``from``, then nothing.
   * ``when`` with a ``.`` in it is a fraction of the steps (``0.25`` of 100 → 25), without one it
     is a step number. The step is ``min(steps, int(value))`` (truncated: ``0.29`` of 100 is
     ``28.999…`` → 28, as in A1111); ``1.0`` means all steps, ``1`` means step 1. A ``when`` below 1
     (``0``, ``0.01`` of 10, ``-3``) switches at once: only ``to`` is ever shown. A ``when`` at or
     above ``steps`` never switches. Numbers like ``1.5`` (A1111's hires-fix pass) therefore mean
     "never" here: this is the first pass, with no hires fix.
   * ``[a|b|c]`` changes every step: step *s* (from 1) shows item ``(s - 1) % n``; empty items
     (``[fe|]male``) show nothing.
   * Brackets used for emphasis (``(x)``, ``(x:1.2)``, ``[x]``) and stray brackets are kept as
     text; they are read later by :func:`parse_emphasis`. Backslash escapes are kept as written.
   * The schedule lists ``(end_step, text)`` for each step where something may change: the steps
     are the distinct ``when`` values in 1…steps plus ``steps`` (plus every step when there is an
     alternation); entries are not merged even when two in a row have the same text (A1111 does
     not merge them either). Text *t* is used for the steps after the previous end step up to and
     including its own.

5. **Emphasis** (:func:`parse_emphasis`, A1111's ``parse_prompt_attention``), on each scheduled
   text: ``(x)`` ×1.1, ``[x]`` ×(1/1.1), ``(x:1.5)`` ×1.5 (only round brackets take a number;
   spaces are allowed around it), nesting multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
   literal characters, and a backslash before anything else is dropped (``a\\b`` → ``ab``). A closing
   bracket with no opener is text; brackets still open at the end are closed there (all round ones,
   then all square ones). Runs with exactly equal weights are merged. ``BREAK``
   (uppercase, a whole word, with the whitespace around it) becomes the pair ``("BREAK", -1.0)``;
   like A1111 it is then multiplied by any brackets around it (``"(a BREAK b)"`` gives
   ``("BREAK", -1.1)``, which A1111's tokenizer no longer treats as a break). An empty result is
   ``[("", 1.0)]``.

   Difference from A1111, on purpose: a weight that is not a number (``(a:1.2.3)``, ``(a:.)``)
   makes A1111 raise ``ValueError``; here the ``:1.2.3`` is read as plain text and the ``)`` closes
   the bracket with the default ×1.1. A prompt that parses in A1111 parses the same here.

NovelAI emphasis (:func:`novelai_to_a1111`) uses ``{x}`` ×1.05 and ``[x]`` ÷1.05, with parentheses
as plain text; it is converted to explicit A1111 weights.

:func:`parse_prompt` runs stages 1-4 and returns everything ``emaki prompt TEXT`` prints.

Differences from A1111 that only concern failures: a scheduling ``when`` too large for a float
(``1e400``) is treated as "never switch" instead of raising ``OverflowError``, and a text nested
too deeply for Python's recursion limit is used unchanged (as an unparsable text is) instead of
raising ``RecursionError``. None of these functions raises on any input text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import lark

from emaki.errors import InvalidRequestError

__all__ = [
    "SCHEDULE_GRAMMAR",
    "ExtraNetworkCall",
    "ParsedPrompt",
    "extract_extra_networks",
    "novelai_to_a1111",
    "parse_emphasis",
    "parse_prompt",
    "prompt_schedule",
    "split_composable",
    "strip_comments",
]

# --------------------------------------------------------------------------------------- comments

# ``\A``/``\Z`` instead of ``^``/``$``: A1111's patterns have no MULTILINE flag, so ``^`` only
# matches at the start of the text, and ``$`` can only be reached at its very end (``[^\n]*``
# stops at a line break, which the alternative before ``$`` takes first).
_WHOLE_LINE_COMMENT = re.compile(r"(?:\A|\n)#[^\n]*(?:\n|\Z)")
_INLINE_COMMENT = re.compile(r"#[^\n]*(?:\n|\Z)")


def strip_comments(text: str) -> str:
    """Remove ``#`` comments the way A1111 1.8+ does (see the module docstring, stage 1)."""
    text = _WHOLE_LINE_COMMENT.sub("\n", text)
    return _INLINE_COMMENT.sub("\n", text)


# ---------------------------------------------------------------------------------- extra networks

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One ``<kind:name:arg...>`` tag: ``<lora:detail:0.6:te=0.5>`` → kind ``lora``, name
    ``detail``, positional ``("0.6",)``, named ``{"te": "0.5"}``. All values are strings."""

    kind: str
    name: str
    positional: tuple[str, ...] = ()
    named: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "positional", tuple(self.positional))
        object.__setattr__(self, "named", MappingProxyType(dict(self.named)))

    def __hash__(self) -> int:
        return hash((self.kind, self.name, self.positional, tuple(sorted(self.named.items()))))


def _extra_network_call(kind: str, arguments: str) -> ExtraNetworkCall:
    name, *rest = arguments.split(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in rest:
        pieces = item.split("=")
        if len(pieces) == 2:  # exactly one '=': A1111 files it as a named argument
            named[pieces[0]] = pieces[1]
        else:
            positional.append(item)
    return ExtraNetworkCall(kind, name, tuple(positional), named)


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Cut every ``<kind:args>`` tag out of ``text``; return the text left and the calls in order."""
    calls: list[ExtraNetworkCall] = []

    def take(match: re.Match[str]) -> str:
        calls.append(_extra_network_call(match.group(1), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(take, text), calls


# ------------------------------------------------------------------------------ composable (AND)

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"\A(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*\Z", re.DOTALL)


def split_composable(text: str) -> list[tuple[str, float]]:
    """Split ``text`` on ``AND`` into ``(part, weight)`` pairs (module docstring, stage 3)."""
    parts: list[tuple[str, float]] = []
    for part in _AND.split(text):
        match = _PART_WEIGHT.match(part)
        assert match is not None  # the pattern matches every string
        body, weight = match.groups()
        parts.append((body, 1.0 if weight is None else float(weight)))
    return parts


# -------------------------------------------------------------------------------------- schedule

SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
"""A1111's scheduling grammar (lark syntax). Its shape decides how lark resolves ambiguities, so it
is kept rule for rule; ``maybe_placeholders`` (lark's default) puts ``None`` for a missing
``[...]`` part, which the tree walk below relies on."""


@functools.cache
def _schedule_parser() -> lark.Lark:
    return lark.Lark(SCHEDULE_GRAMMAR, parser="earley", maybe_placeholders=True)


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequestError(f"steps must be a whole number of at least 1, got {steps!r}")
    return steps


def _when(number: str, steps: int) -> int:
    """The last step that shows the ``from`` text, for a ``when`` as written in the prompt."""
    value = float(number)
    if "." in number:
        value *= steps
    # A1111: min(steps, int(value)). Clamping first keeps +-inf (e.g. "1e400") from raising;
    # every finite value gives the same answer as A1111 (anything below 1 never shows ``from``).
    return int(max(-1.0, min(value, float(steps))))


def _switch_steps(tree: lark.Tree, steps: int) -> tuple[list[int], dict[int, int]]:
    """The schedule's end steps, and each ``scheduled`` node's ``when`` (keyed by ``id``)."""
    ends = {steps}
    whens: dict[int, int] = {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = next(
                c for c in node.children if isinstance(c, lark.Token) and c.type == "NUMBER"
            )
            when = _when(str(number), steps)
            whens[id(node)] = when
            if when >= 1:
                ends.add(when)
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return sorted(ends), whens


def _pieces_at(
    node: lark.Tree | lark.Token | None, step: int, whens: dict[int, int]
) -> Iterator[str]:
    """The text of ``node`` at ``step``, as a stream of pieces."""
    if node is None:
        return
    if isinstance(node, lark.Token):
        yield str(node)
        return
    if node.data == "scheduled":
        before, after = node.children[0], node.children[1]
        yield from _pieces_at(before if step <= whens[id(node)] else after, step, whens)
    elif node.data == "alternate":
        options = node.children
        yield from _pieces_at(options[(step - 1) % len(options)], step, whens)
    else:  # start, prompt, emphasized, plain: their pieces in order, brackets included
        for child in node.children:
            yield from _pieces_at(child, step, whens)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]`` for one prompt (one ``AND`` part) over ``steps`` steps.

    Follows A1111's ``get_learned_conditioning_prompt_schedules`` (first pass, new scheduling); see
    the module docstring, stage 4. A text that does not parse is used unchanged for all steps.

    lark's Earley parser takes time that grows much faster than the prompt's length (about 15 s
    for 1,300 characters with a dozen brackets), so long prompts are not parsed whole: no item of
    the grammar can span a comma outside all brackets (a bracket opened before it would have to
    close after it, leaving a stray closing bracket inside a group, which the grammar forbids), so
    the prompt is cut at those commas, each piece with a ``[`` is parsed on its own (and cached),
    and the pieces' schedules are merged. A piece without ``[``, ``|`` or a backslash always parses
    to itself unchanged. Unbalanced prompts are parsed whole, as before. The tests check the result against
    the whole-prompt parse.
    """
    steps = _check_steps(steps)
    if "[" not in text:
        return [(steps, text)]
    pieces = _top_level_pieces(text)
    if pieces is None or len(pieces) == 1:
        return list(_schedule_whole(text, steps) or [(steps, text)])
    schedules = []
    for piece in pieces:
        plain = not any(c in piece for c in "[|\\")  # then it always parses, unchanged
        schedule = ((steps, piece),) if plain else _schedule_whole(piece, steps)
        if schedule is None:  # the whole prompt would not parse either
            return [(steps, text)]
        schedules.append(schedule)
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    return [(end, "".join(_text_at(schedule, end) for schedule in schedules)) for end in ends]


def _text_at(schedule: tuple[tuple[int, str], ...], step: int) -> str:
    return next(t for end, t in schedule if step <= end)


def _top_level_pieces(text: str) -> list[str] | None:
    """``text`` cut after each comma outside all brackets; None if its brackets do not balance."""
    pieces: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            pieces.append(text[start : i + 1])
            start = i + 1
        i += 1
    if depth != 0:
        return None
    pieces.append(text[start:])
    return [p for p in pieces if p]


@functools.lru_cache(maxsize=4096)
def _schedule_whole(text: str, steps: int) -> tuple[tuple[int, str], ...] | None:
    """The lark parse of the whole text; None if it does not parse."""
    try:
        tree = _schedule_parser().parse(text)
        ends, whens = _switch_steps(tree, steps)
        return tuple((end, "".join(_pieces_at(tree, end, whens))) for end in ends)
    except (lark.exceptions.LarkError, RecursionError):
        return None


# -------------------------------------------------------------------------------------- emphasis

_ROUND = 1.1
_SQUARE = 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_BREAK_WEIGHT = -1.0

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                                    # escaped bracket or backslash
    | \\                                              # lone backslash: dropped
    | [(\[]                                           # opening bracket
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.5)' closes a round bracket
    | [)\]]                                           # closing bracket
    | [^\\()\[\]:]+                                   # text
    | :                                               # a colon that is not a weight
    """,
    re.VERBOSE,
)


class _Emphasis:
    """Runs of text with weights, and the brackets still open (as start indexes into the runs)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.weights: list[float] = []
        self.open_round: list[int] = []
        self.open_square: list[int] = []

    def add(self, text: str, weight: float = 1.0) -> None:
        self.texts.append(text)
        self.weights.append(weight)

    def add_text(self, text: str) -> None:
        for i, piece in enumerate(_BREAK.split(text)):
            if i:
                self.add("BREAK", _BREAK_WEIGHT)
            self.add(piece)

    def scale_from(self, start: int, factor: float) -> None:
        for i in range(start, len(self.weights)):
            self.weights[i] *= factor

    def merged(self) -> list[tuple[str, float]]:
        if not self.texts:
            return [("", 1.0)]
        out: list[tuple[str, float]] = []
        for text, weight in zip(self.texts, self.weights):
            if out and out[-1][1] == weight:
                out[-1] = (out[-1][0] + text, weight)
            else:
                out.append((text, weight))
        return out


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``[(text, weight), ...]`` for an A1111 prompt's ``()``/``[]``/``(x:w)`` emphasis.

    Follows A1111's ``parse_prompt_attention`` (module docstring, stage 5), e.g.
    ``"an (important) word"`` → ``[("an ", 1.0), ("important", 1.1), (" word", 1.0)]``.
    """
    state = _Emphasis()
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            state.add(token[1:])
        elif token == "(":
            state.open_round.append(len(state.texts))
        elif token == "[":
            state.open_square.append(len(state.texts))
        elif weight is not None and state.open_round:
            state.scale_from(state.open_round.pop(), float(weight))
        elif token == ")" and state.open_round:
            state.scale_from(state.open_round.pop(), _ROUND)
        elif token == "]" and state.open_square:
            state.scale_from(state.open_square.pop(), _SQUARE)
        else:  # text, a stray closing bracket, or a colon
            state.add_text(token)
    for start in state.open_round:  # still open at the end: closed there, outermost first
        state.scale_from(start, _ROUND)
    for start in state.open_square:
        state.scale_from(start, _SQUARE)
    return state.merged()


# -------------------------------------------------------------------------------------- NovelAI

_NAI_FACTOR = 1.05
_NAI_TOKEN = re.compile(r"[{}\[\]]|[^{}\[\]]+")
_A1111_SPECIAL = re.compile(r"([\\()\[\]])")


def _format_weight(weight: float) -> str:
    text = f"{weight:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def novelai_to_a1111(text: str) -> str:
    """Rewrite NovelAI emphasis as A1111 explicit weights.

    NovelAI: ``{x}`` multiplies by 1.05, ``[x]`` divides by 1.05, nesting multiplies; ``(`` ``)``
    and ``\\`` are plain characters there. The result marks every run whose weight is not 1 as
    ``(run:w)``, ``w`` rounded to 4 decimals: ``{x}`` → ``(x:1.05)``, ``{{x}}`` → ``(x:1.1025)``,
    ``[x]`` → ``(x:0.9524)`` (the A1111 wiki rounds the same 1/1.05 to 0.952), ``[[x]]`` →
    ``(x:0.907)``. Runs whose weight rounds to 1 (``{[x]}``) are left bare; adjacent runs with the
    same rounded weight are joined. In every run ``(`` ``)`` ``[`` ``]`` ``\\`` are escaped so A1111
    reads them as characters. A closing bracket with no opener is kept as a character (``}`` as is,
    ``]`` escaped); brackets left open at the end are closed there, as A1111 does with its own.
    Everything else (``AND``, ``BREAK``, ``<lora:...>``, ``:``) is copied unchanged.
    """
    runs: list[tuple[str, str]] = []  # (escaped text, formatted weight)
    depth = {"{": 0, "[": 0}
    for token in _NAI_TOKEN.findall(text):
        if token in ("{", "["):
            depth[token] += 1
            continue
        if token in ("}", "]"):
            opener = "{" if token == "}" else "["
            if depth[opener]:
                depth[opener] -= 1
                continue
        weight = _format_weight(_NAI_FACTOR ** (depth["{"] - depth["["]))
        escaped = _A1111_SPECIAL.sub(r"\\\1", token)
        if runs and runs[-1][1] == weight:
            runs[-1] = (runs[-1][0] + escaped, weight)
        else:
            runs.append((escaped, weight))
    return "".join(t if w == "1.0" else f"({t}:{w})" for t, w in runs)


# ------------------------------------------------------------------------------- whole prompt


@dataclass(frozen=True)
class ParsedPrompt:
    """Everything ``emaki prompt TEXT`` prints for one prompt and a step count.

    ``text`` is the prompt after comments and extra-network tags are removed; ``parts`` holds, for
    each ``AND`` part in order, its weight and its schedule ``((end_step, text), ...)``.
    """

    text: str
    extra_networks: tuple[ExtraNetworkCall, ...]
    parts: tuple[tuple[float, tuple[tuple[int, str], ...]], ...]


def parse_prompt(text: str, steps: int) -> ParsedPrompt:
    """Comments → extra networks → ``AND`` parts → a schedule for each part (module docstring).

    Raises :class:`~emaki.errors.InvalidRequestError` when ``steps`` is not a whole number ≥ 1.
    """
    steps = _check_steps(steps)
    remaining, calls = extract_extra_networks(strip_comments(text))
    parts = tuple(
        (weight, tuple(prompt_schedule(part, steps)))
        for part, weight in split_composable(remaining)
    )
    return ParsedPrompt(remaining, tuple(calls), parts)
