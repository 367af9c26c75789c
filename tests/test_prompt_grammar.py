"""The A1111 prompt language: golden prompts with hand-worked parses and schedules, and properties.

Every expected value below is written out by hand from A1111's documented behaviour (its doctests in
``modules/prompt_parser.py``, the wiki's feature page, and the rules in the module docstring of
:mod:`emaki.prompts.grammar`); none is produced by the code under test. Floats are compared with
``pytest.approx``. The property tests build random prompts together with an independent model of
what they mean, and feed random bracket soup to check that nothing raises.
"""

from __future__ import annotations

import itertools
import random
from types import MappingProxyType

import pytest

from emaki.errors import InvalidRequestError
from emaki.prompts import (
    ExtraNetworkCall,
    ParsedPrompt,
    extract_extra_networks,
    grammar,
    novelai_to_a1111,
    parse_emphasis,
    parse_prompt,
    prompt_schedule,
    split_composable,
    strip_comments,
)

UP = 1.1  # (x)
DOWN = 1 / 1.1  # [x]


def approx_pairs(pairs: list[tuple[str, float]]) -> list[tuple[str, object]]:
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in pairs]


# ------------------------------------------------------------------------- A1111's own doctests

# get_learned_conditioning_prompt_schedules doctests, 10 steps.
A1111_SCHEDULE_DOCTESTS = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    # four items, three of them empty: "fe" on steps 1, 5, 9
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULE_DOCTESTS)
def test_a1111_schedule_doctests(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == expected


def test_a1111_stale_doctest_unparsable_pipe() -> None:
    # A1111's doctest claims [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but
    # '|' is not plain text in the grammar, so lark (1.1.2 as A1111 pins it, and 1.3) rejects the
    # prompt and A1111's own code uses it unchanged. We match the code, not the stale comment.
    prompt = "a [{b|d{:.5] c"
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


def test_fantasy_landscape_schedule() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


A1111_EMPHASIS_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),  # 1.3 * 1.1 * 1.1
            (" ", 1.1),
            ("on", 1.0),  # [on] inside the outer ( ): 1.1 / 1.1
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),  # 1.1 ** 4
            (".", 1.1),  # the first '(' is never closed: closed at the end
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EMPHASIS_DOCTESTS)
def test_a1111_emphasis_doctests(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_emphasis(prompt) == approx_pairs(expected)


# ---------------------------------------------------------------------------- golden schedules

GOLDEN_SCHEDULES = [
    # editing inside emphasis; emphasis inside editing
    ("a ([cat:dog:5]:1.2)", 10, [(5, "a (cat:1.2)"), (10, "a (dog:1.2)")]),
    ("[(cat:1.5):[dog]:3]", 10, [(3, "(cat:1.5)"), (10, "[dog]")]),
    ("(a:[b:c:2])", 3, [(2, "(a:b)"), (3, "(a:c)")]),
    ("[a:(b:1.2):2]", 3, [(2, "a"), (3, "(b:1.2)")]),
    ("a [b:c:2] (d) [e]", 5, [(2, "a b (d) [e]"), (5, "a c (d) [e]")]),
    # empty parts
    ("[:x:3]", 10, [(3, ""), (10, "x")]),
    ("[x::3]", 10, [(3, "x"), (10, "")]),
    ("[ab:2 ]", 4, [(2, ""), (4, "ab")]),  # [to:when]; a space may follow the number
    ("[a||b]", 4, [(1, "a"), (2, ""), (3, "b"), (4, "a")]),
    # alternation loops back after the last item (wiki: step 8 -> "cow")
    (
        "[cow|cow|horse|man|siberian tiger|ox|man] in a field",
        8,
        [
            (1, "cow in a field"),
            (2, "cow in a field"),
            (3, "horse in a field"),
            (4, "man in a field"),
            (5, "siberian tiger in a field"),
            (6, "ox in a field"),
            (7, "man in a field"),
            (8, "cow in a field"),
        ],
    ),
    ("[a|b|c]", 5, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[(a)|b]", 2, [(1, "(a)"), (2, "b")]),
    # nesting: editing inside alternation and inside editing
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a:[b:c:4]:2]", 5, [(2, "a"), (4, "b"), (5, "c")]),
    ("[[a:b:2]:c:4]", 5, [(2, "a"), (4, "b"), (5, "c")]),
    ("[a:b:3][c|d]", 4, [(1, "ac"), (2, "ad"), (3, "ac"), (4, "bd")]),
    ("[a:b:5] [c:d:5]", 10, [(5, "a c"), (10, "b d")]),
    # when = 0, 1, 1.0, > steps, negative, spaced, signed, exponent
    ("[a:b:0]", 10, [(10, "b")]),  # switches before step 1
    ("[a:b:0.0]", 10, [(10, "b")]),
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),  # no '.': step 1
    ("[a:b:1.0]", 10, [(10, "a")]),  # '.': 100% of the steps, never switches
    ("[a:b:25]", 10, [(10, "a")]),
    ("[a:b:1.5]", 10, [(10, "a")]),  # a hires-pass time: never in the first pass
    ("[a:b:-3]", 10, [(10, "b")]),
    ("[a:b: 3 ]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:+2]", 10, [(2, "a"), (10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no '.': 1e1 is step 10, not a fraction
    ("[a:b:.5]", 3, [(1, "a"), (3, "b")]),  # 0.5 * 3 = 1.5, truncated to 1
    ("[a:b:0.29]", 100, [(28, "a"), (100, "b")]),  # 0.29 * 100 = 28.999999999999996 -> 28
    # steps = 1
    ("[a:b:0.5]", 1, [(1, "b")]),
    ("[a|b]", 1, [(1, "a")]),
    ("[a:b:1]", 1, [(1, "a")]),
    # text that is not editing, kept unchanged
    (r"\[a:b:3\]", 10, [(10, r"\[a:b:3\]")]),  # escaped brackets are plain text
    ("a (b", 10, [(10, "a (b")]),  # stray brackets are allowed by the grammar
    ("a]b[c", 3, [(3, "a]b[c")]),
    ("[a:b:3", 5, [(5, "[a:b:3")]),  # does not parse: unchanged
    ("[a:b:c:2]", 3, [(3, "[a:b:c:2]")]),  # three texts: does not parse
    ("[a:b]", 3, [(3, "[a:b]")]),  # no number: does not parse
    ("a|b", 3, [(3, "a|b")]),  # '|' outside brackets: does not parse
    ("", 10, [(10, "")]),
]


@pytest.mark.parametrize(("prompt", "steps", "expected"), GOLDEN_SCHEDULES)
def test_golden_schedules(prompt: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, "10"])
def test_schedule_rejects_bad_steps(steps: object) -> None:
    with pytest.raises(InvalidRequestError, match="steps"):
        prompt_schedule("a", steps)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ golden emphasis

GOLDEN_EMPHASIS = [
    ("(x)", [("x", UP)]),
    ("((x))", [("x", UP * UP)]),
    ("[x]", [("x", DOWN)]),
    ("[[x]", [("x", DOWN * DOWN)]),  # one '[' left open, closed at the end
    ("(x:1.5)", [("x", 1.5)]),
    ("(x:0.25)", [("x", 0.25)]),
    ("( x : 1.5 )", [(" x ", 1.5)]),  # spaces around the weight are allowed
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("a (b:0) c", [("a ", 1.0), ("b", 0.0), (" c", 1.0)]),
    ("((a:2))", [("a", 2.2)]),
    ("[(a:2)]", [("a", 2 / 1.1)]),
    ("[x:1.5]", [("x:1.5", DOWN)]),  # square brackets take no weight
    # escapes
    (r"anime_\(character\)", [("anime_(character)", 1.0)]),
    (r"\[x\]", [("[x]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    (r"(\(x\))", [("(x)", UP)]),
    # unbalanced brackets
    ("((a", [("a", UP * UP)]),
    ("a ]b) c", [("a ]b) c", 1.0)]),  # closers without openers are text
    ("a (b ]c) d", [("a ", 1.0), ("b ]c", UP), (" d", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no '(' is text
    ("(a [b) c]", [("a ", UP), ("b", UP * DOWN), (" c", DOWN)]),  # crossed pairs
    ("[a (b] c)", [("a ", DOWN), ("b", DOWN * UP), (" c", UP)]),
    # merging and empties
    ("(a)(b)", [("ab", UP)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    # not a number: A1111 raises ValueError; we read ':1.2.3' as text and close with x1.1
    ("(a:1.2.3)", [("a:1.2.3", UP)]),
    # BREAK: start, end, twice, inside a word, lower case, inside brackets
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK BREAKING break", [("aBREAK BREAKING break", 1.0)]),
    ("(a BREAK b)", [("a", UP), ("BREAK", -UP), ("b", UP)]),  # A1111 scales it too
]


@pytest.mark.parametrize(("prompt", "expected"), GOLDEN_EMPHASIS)
def test_golden_emphasis(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse_emphasis(prompt) == approx_pairs(expected)


def test_emphasis_weights_match_a1111_floats_exactly() -> None:
    # A1111 merges runs by exact float equality, so the multiplication order matters: 1.3 * 1.1
    # * 1.1 is 1.5730000000000004, and (1/1.1) * 1.1 is exactly 1.0 here.
    parsed = parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert parsed[1] == ("house", 1.5730000000000004)
    assert parsed[3] == ("on", 1.0)
    assert parsed[7] == ("sky", 1.4641000000000006)


# ------------------------------------------------------------------------------ AND (composable)

GOLDEN_AND = [
    # the wiki's example; leading spaces stay, trailing ones go
    (
        "a cat :1.2 AND a dog AND a penguin :2.2",
        [("a cat", 1.2), (" a dog", 1.0), (" a penguin", 2.2)],
    ),
    ("a AND b:-0.5 AND c: .5 AND d:1.", [("a", 1.0), (" b", -0.5), (" c", 0.5), (" d", 1.0)]),
    ("x:+2 AND y :0", [("x", 2.0), (" y", 0.0)]),
    ("BAND and ANDY ANDAND", [("BAND and ANDY ANDAND", 1.0)]),  # not separators
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a:1.2:3", [("a:1.2", 3.0)]),  # only the last ':number' is the weight
    ("(a:1.2)", [("(a:1.2)", 1.0)]),  # ends with ')': no weight
    ("[a:b:5] AND c", [("[a:b:5]", 1.0), (" c", 1.0)]),
    ("a\nAND\nb :2 \n", [("a", 1.0), ("\nb", 2.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), GOLDEN_AND)
def test_golden_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_composable(prompt) == approx_pairs(expected)


# ---------------------------------------------------------------------------- extra networks


def call(kind: str, name: str, *positional: str, **named: str) -> ExtraNetworkCall:
    return ExtraNetworkCall(kind, name, positional, MappingProxyType(named))


GOLDEN_EXTRA_NETWORKS = [
    ("a <hypernet:anime> b", "a  b", [call("hypernet", "anime")]),
    ("<lora:add_detail:0.6>", "", [call("lora", "add_detail", "0.6")]),
    ("x <lora:n:0.8:0.5>", "x ", [call("lora", "n", "0.8", "0.5")]),
    ("<lyco:n:1:2:3>,", ",", [call("lyco", "n", "1", "2", "3")]),
    (
        "<lora:n:1:te=0.5:unet=1> y",
        " y",
        [call("lora", "n", "1", te="0.5", unet="1")],
    ),
    ("<lora:n:a=b=c>", "", [call("lora", "n", "a=b=c")]),  # two '=': positional
    ("<lora:n: 0.8>", "", [call("lora", "n", " 0.8")]),  # values kept as written
    (
        "<lora:a:1> and <hypernet:b:0.5> then <lora:c>",
        " and  then ",
        [call("lora", "a", "1"), call("hypernet", "b", "0.5"), call("lora", "c")],
    ),
    # not tags: no ':', nothing after it, a space in the kind, '<' only
    ("<lora> <lora:> < lora:x> <a-b:c>", "<lora> <lora:> < lora:x> <a-b:c>", []),
]


@pytest.mark.parametrize(("prompt", "text", "calls"), GOLDEN_EXTRA_NETWORKS)
def test_golden_extra_networks(prompt: str, text: str, calls: list[ExtraNetworkCall]) -> None:
    assert extract_extra_networks(prompt) == (text, calls)


def test_extra_network_call_is_frozen_hashable_and_maps() -> None:
    tag = ExtraNetworkCall("lora", "x", ["1"], {"te": "0.5"})
    assert tag.positional == ("1",)
    assert tag.named["te"] == "0.5"
    with pytest.raises(TypeError):
        tag.named["te"] = "1"  # type: ignore[index]
    assert hash(tag) == hash(ExtraNetworkCall("lora", "x", ("1",), {"te": "0.5"}))


# ------------------------------------------------------------------------------------ comments

GOLDEN_COMMENTS = [
    ("a\n# note\nb", "a\nb"),  # whole line: the line and one line break go
    ("a # note\nb", "a \nb"),  # inline: up to and including the line break
    ("a # x", "a \n"),  # at the very end a '\n' is still left
    ("# x", "\n"),
    ("# x\nb", "\nb"),
    ("a\n#x\n#y\nb", "a\n\nb"),  # two comment lines: one extra line break survives
    ("no comment", "no comment"),
    ("a#b#c\nd", "a\nd"),
]


@pytest.mark.parametrize(("prompt", "expected"), GOLDEN_COMMENTS)
def test_golden_comments(prompt: str, expected: str) -> None:
    assert strip_comments(prompt) == expected


# ----------------------------------------------------------------------------------- NovelAI

GOLDEN_NOVELAI = [
    ("{word}", "(word:1.05)"),
    ("{{word}}", "(word:1.1025)"),
    ("[word]", "(word:0.9524)"),  # 1/1.05; the wiki rounds it to 0.952
    ("[[word]]", "(word:0.907)"),  # 1/1.05**2 = 0.90703
    ("a {b} c", "a (b:1.05) c"),
    ("{a [b]}", "(a :1.05)b"),  # 1.05 / 1.05 = 1: left bare
    ("(x) \\ y", "\\(x\\) \\\\ y"),  # NovelAI parentheses and backslashes are characters
    ("{a", "(a:1.05)"),  # left open: closed at the end
    ("a} b]", "a} b\\]"),  # closers without openers are characters
    ("{cat} AND <lora:x:1>", "(cat:1.05) AND <lora:x:1>"),
]


@pytest.mark.parametrize(("prompt", "expected"), GOLDEN_NOVELAI)
def test_golden_novelai(prompt: str, expected: str) -> None:
    assert novelai_to_a1111(prompt) == expected


def test_novelai_result_reads_back_with_novelai_weights() -> None:
    converted = novelai_to_a1111("a {{b}} [c] (d)")
    assert parse_emphasis(converted) == approx_pairs(
        [("a ", 1.0), ("b", 1.1025), (" ", 1.0), ("c", 0.9524), (" (d)", 1.0)]
    )


# ------------------------------------------------------------------------------- whole prompts


def test_parse_prompt_all_stages() -> None:
    prompt = "# style notes\na <lora:x:0.7> [cat:dog:2] :1.5 AND (sky) # late\nBREAK"
    parsed = parse_prompt(prompt, 4)
    # the whole-line comment at the start leaves its '\n' (A1111 quirk)
    text = "\na  [cat:dog:2] :1.5 AND (sky) \nBREAK"
    assert parsed == ParsedPrompt(
        text=text,
        extra_networks=(call("lora", "x", "0.7"),),
        parts=(
            (1.5, ((2, "\na  cat"), (4, "\na  dog"))),
            (1.0, ((4, " (sky) \nBREAK"),)),
        ),
    )


def test_parse_prompt_empty() -> None:
    assert parse_prompt("", 3) == ParsedPrompt("", (), ((1.0, ((3, ""),)),))


def test_parse_prompt_tags_are_removed_before_scheduling() -> None:
    # A1111 cuts extra networks out before editing is parsed, so a tag inside an edit vanishes.
    parsed = parse_prompt("[a <lora:x:1>:b:2]", 3)
    assert parsed.extra_networks == (call("lora", "x", "1"),)
    assert parsed.parts == ((1.0, ((2, "a "), (3, "b"))),)


@pytest.mark.parametrize("steps", [0, -5, 1.5, None])
def test_parse_prompt_rejects_bad_steps(steps: object) -> None:
    with pytest.raises(InvalidRequestError, match="steps must be a whole number"):
        parse_prompt("a", steps)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- property: emphasis

WORDS = ["cat", "red dog", "sky", " ", ", ", "a b", "x"]
ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}
WEIGHTS = ["1.5", "0.5", "2", ".8", "1.", "0", "1.25"]


def random_emphasis(rng: random.Random, depth: int = 0) -> tuple[str, list[tuple[str, float]]]:
    """A prompt built from emphasis pieces, and the weight each of its characters should get."""
    prompt, chars = "", []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["word", "word", "escape", "round", "square", "weight"])
        if depth >= 3 or kind == "word":
            word = rng.choice(WORDS)
            prompt += word
            chars += [(c, 1.0) for c in word]
        elif kind == "escape":
            escape = rng.choice(list(ESCAPES))
            prompt += escape
            chars.append((ESCAPES[escape], 1.0))
        else:
            inner, inner_chars = random_emphasis(rng, depth + 1)
            if kind == "round":
                prompt += f"({inner})"
                factor = 1.1
            elif kind == "square":
                prompt += f"[{inner}]"
                factor = 1 / 1.1
            else:
                weight = rng.choice(WEIGHTS)
                prompt += f"({inner}:{weight})"
                factor = float(weight)
            chars += [(c, w * factor) for c, w in inner_chars]
    return prompt, chars


def per_character(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(c, weight) for text, weight in pairs for c in text]


def test_property_emphasis_matches_bracket_model() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        prompt, expected = random_emphasis(rng)
        got = parse_emphasis(prompt)
        assert "".join(text for text, _ in got) == "".join(c for c, _ in expected), prompt
        assert [c for c, _ in per_character(got)] == [c for c, _ in expected]
        assert [w for _, w in per_character(got)] == pytest.approx(
            [w for _, w in expected], rel=1e-9
        ), prompt
        for (_, left), (_, right) in itertools.pairwise(got):
            assert left != right, f"unmerged neighbours in {got}"


SOUP = "()[]:|\\ ab1.5-é🙂\n\t{}<>#,"


def soup(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(SOUP) for _ in range(length))


def test_property_emphasis_on_soup_keeps_every_other_character() -> None:
    rng = random.Random(99)
    brackets = str.maketrans("", "", "()[]")
    for _ in range(500):
        text = soup(rng, rng.randint(0, 30)).replace("\\", "").replace(":", "")
        got = parse_emphasis(text)
        assert got and all(isinstance(t, str) and isinstance(w, float) for t, w in got)
        # without backslashes and colons, only brackets can be markup; every other character stays
        assert "".join(t for t, _ in got).translate(brackets) == text.translate(brackets)


def test_property_emphasis_never_raises_on_soup() -> None:
    rng = random.Random(7)
    for _ in range(500):
        got = parse_emphasis(soup(rng, rng.randint(0, 40)))
        assert got and all(isinstance(t, str) and isinstance(w, float) for t, w in got)


# ------------------------------------------------------------------------- property: schedules


def resolved_when(number: str, steps: int) -> int:
    value = float(number) * (steps if "." in number else 1)
    return min(steps, int(value))


class Model:
    """An independent model of a prompt's meaning over the steps: text at each step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.ends = {steps}

    def build(self, rng: random.Random, depth: int = 0) -> tuple[str, object]:
        """Return (prompt text, evaluator) where evaluator(step) is the text at that step."""
        kind = rng.choice(["word", "word", "edit", "alt", "round", "square", "weight", "seq"])
        if depth >= 3 or kind == "word":
            word = rng.choice(["cat", "red dog", "sky", "a b"])
            return word, lambda step: word
        if kind == "seq":
            (a, fa), (b, fb) = self.build(rng, depth + 1), self.build(rng, depth + 1)
            return a + " " + b, lambda step: fa(step) + " " + fb(step)
        if kind in ("round", "square", "weight"):
            inner, f = self.build(rng, depth + 1)
            left, right = {"round": ("(", ")"), "square": ("[", "]"), "weight": ("(", ":1.3)")}[
                kind
            ]
            return left + inner + right, lambda step: left + f(step) + right
        if kind == "edit":
            number = rng.choice(["0", "1", "2", "3", "7", "12", "0.25", ".5", "1.0", "0.75"])
            when = resolved_when(number, self.steps)
            if when >= 1:
                self.ends.add(when)
            form = rng.choice(["full", "to", "remove"])
            empty: tuple[str, object] = ("", lambda step: "")
            a, fa = empty if form == "to" else self.build(rng, depth + 1)
            b, fb = empty if form == "remove" else self.build(rng, depth + 1)
            text = f"[{a}:{b}:{number}]" if form != "to" else f"[{b}:{number}]"
            return text, lambda step: fa(step) if step <= when else fb(step)
        # alternation, possibly with empty items
        items = [self.build(rng, depth + 1)]
        for _ in range(rng.randint(1, 3)):  # later items may be empty
            items.append(self.build(rng, depth + 1) if rng.random() < 0.8 else ("", lambda s: ""))
        self.ends.update(range(1, self.steps + 1))
        funcs = [f for _, f in items]
        text = "[" + "|".join(t for t, _ in items) + "]"
        return text, lambda step: funcs[(step - 1) % len(funcs)](step)


def test_property_schedule_matches_model() -> None:
    rng = random.Random(2024)
    for _ in range(150):
        steps = rng.choice([1, 2, 3, 5, 8, 12])
        model = Model(steps)
        prompt, evaluate = model.build(rng)
        expected = [(end, evaluate(end)) for end in sorted(model.ends)]
        assert prompt_schedule(prompt, steps) == expected, prompt


def test_property_schedule_never_raises_on_soup() -> None:
    rng = random.Random(5)
    for _ in range(250):
        text = soup(rng, rng.randint(0, 24))
        steps = rng.choice([1, 3, 10])
        schedule = prompt_schedule(text, steps)
        ends = [end for end, _ in schedule]
        assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
        assert all(isinstance(t, str) for _, t in schedule)
        if "[" not in text:
            # no editing or alternation possible: the text itself, parsed or not
            assert schedule == [(steps, text)]


def test_property_schedule_never_raises_on_unicode() -> None:
    rng = random.Random(11)
    for _ in range(150):
        text = "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(0, 20)))
        assert prompt_schedule(text, 4)[-1][0] == 4
    assert prompt_schedule("[a:b:1e400]", 10) == [(10, "a")]  # A1111: OverflowError
    assert prompt_schedule("[a:b:-1e400]", 10) == [(10, "b")]


def test_property_comma_pieces_parse_like_the_whole_prompt() -> None:
    """Long prompts are parsed piece by piece (between top-level commas); the result must be
    exactly lark's parse of the whole prompt: on model-built pieces joined by commas, and on
    bracket soup with commas (unbalanced, stray '|', trailing backslashes, failures)."""
    rng = random.Random(31)
    for i in range(300):
        steps = rng.choice([1, 3, 8, 20])
        if i % 2:
            model = Model(steps)
            prompt = ", ".join(model.build(rng)[0] for _ in range(rng.randint(2, 4)))
        else:
            prompt = ",".join(soup(rng, rng.randint(0, 8)) for _ in range(rng.randint(2, 4)))
        whole = grammar._schedule_whole(prompt, steps)
        expected = list(whole) if whole is not None else [(steps, prompt)]
        assert prompt_schedule(prompt, steps) == expected, prompt


def test_long_prompt_schedules_fast() -> None:
    import time

    text = "a [cat:dog:0.3] face, (sun:1.2), [heart|star] shape, plain words here, " * 20
    start = time.perf_counter()
    schedule = prompt_schedule(text, 20)
    assert time.perf_counter() - start < 2.0
    assert schedule[0][1].count("a cat face") == 20 and schedule[-1][1].count("a dog face") == 20
