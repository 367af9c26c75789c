"""A1111 infotext: parsing real-format strings, writing, round trips, and NovelAI conversion.

Expected parses are written out by hand from the format's rules, not produced by the parser.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from emaki.errors import InfotextError
from emaki.infotext import (
    Infotext,
    format_infotext,
    format_value,
    infotext_from_novelai,
    params_float,
    params_int,
    parse_infotext,
    quote,
)

FIXTURES = Path(__file__).parent / "fixtures" / "infotext"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ parsing fixtures


def test_parse_anchor_example() -> None:
    info = parse_infotext(fixture("a1111_basic.txt"))
    assert info.prompt == (
        "a photo of an astronaut riding a horse, (highly detailed:1.2) <lora:add_detail:0.6>"
    )
    assert info.negative_prompt == "lowres, blurry, (worst quality:1.4)"
    assert list(info.params.items()) == [
        ("Steps", "28"),
        ("Sampler", "DPM++ 2M"),
        ("Schedule type", "Karras"),
        ("CFG scale", "7"),
        ("Seed", "1234567890"),
        ("Size", "512x768"),
        ("Size-1", "512"),
        ("Size-2", "768"),
        ("Model hash", "6ce0161689"),
        ("Model", "v1-5-pruned-emaonly"),
        ("Denoising strength", "0.45"),
        ("Clip skip", "2"),
        ("Hires upscale", "2"),
        ("Hires steps", "15"),
        ("Hires upscaler", "Latent"),
        ("Lora hashes", "add_detail: 7c6bad76eb54"),
        ("Version", "v1.10.1"),
    ]


def test_parse_hires_fix() -> None:
    info = parse_infotext(fixture("a1111_hires.txt"))
    assert info.prompt == (
        "masterpiece, best quality, a lighthouse on a sea cliff at dusk, (volumetric light:1.1), "
        "dramatic clouds"
    )
    assert info.negative_prompt == "lowres, bad anatomy, watermark, signature"
    assert info.params == {
        "Steps": "25",
        "Sampler": "DPM++ 2M SDE",
        "Schedule type": "Exponential",
        "CFG scale": "6.5",
        "Seed": "3141592653",
        "Size": "768x512",
        "Size-1": "768",
        "Size-2": "512",
        "Model hash": "31e35c80fc",
        "Model": "sd_xl_base_1.0",
        "VAE hash": "235745af8d",
        "VAE": "sdxl_vae.safetensors",
        "Denoising strength": "0.5",
        "Hires resize": "1536x1024",
        "Hires resize-1": "1536",
        "Hires resize-2": "1024",
        "Hires steps": "12",
        "Hires upscaler": "R-ESRGAN 4x+",
        "Hires sampler": "Euler a",
        "Version": "v1.10.1",
    }


def test_parse_multiline_prompts_and_quoted_values() -> None:
    info = parse_infotext(fixture("a1111_multiline_quoted.txt"))
    assert info.prompt == (
        "portrait of a knight in ornate armor,\n"
        "standing in a misty forest, [oak:birch:0.4] trees\n"
        "<lora:add_detail:0.7> <lora:x:0.3>"
    )
    assert info.negative_prompt == "easynegative, (blurry:1.3),\nextra fingers, text"
    assert info.params == {
        "Steps": "30",
        "Sampler": "Euler a",
        "Schedule type": "Automatic",
        "CFG scale": "7.5",
        "Seed": "42",
        "Size": "640x896",
        "Size-1": "640",
        "Size-2": "896",
        "Model hash": "e3b0c44298",
        "Model": "anything-v5",
        "Variation seed": "3735928559",
        "Variation seed strength": "0.25",
        "Seed resize from": "512x704",
        "Seed resize from-1": "512",
        "Seed resize from-2": "704",
        "Denoising strength": "0.35",
        "Clip skip": "2",
        "Hires upscale": "1.5",
        "Hires upscaler": "4x-UltraSharp",
        "Hires prompt": 'knight, armor: polished steel, "gleaming"\nsecond line',
        "Lora hashes": "add_detail: 7c6bad76eb54, x: 0123456789ab",
        "TI hashes": "easynegative: c74b4e810b03",
        "Emphasis": "No norm",
        "Version": "v1.10.1",
    }


def test_parse_old_style() -> None:
    info = parse_infotext(fixture("a1111_old_style.txt"))
    assert info == Infotext(
        prompt="an oil painting of a harbour town at sunrise, fishing boats, by a 19th century painter",
        negative_prompt="cropped, jpeg artifacts, ugly",
        params={
            "Steps": "20",
            "Sampler": "Euler a",
            "CFG scale": "7",
            "Seed": "965400086",
            "Size": "512x512",
            "Size-1": "512",
            "Size-2": "512",
            "Model hash": "45dee52b",
        },
    )


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("a1111_*.txt")))
def test_fixture_reformats_to_itself(name: str) -> None:
    text = fixture(name)
    assert parse_infotext(text).to_text() == text.strip()


# ------------------------------------------------------------------------------ parsing rules


def test_text_without_parameters_is_all_prompt() -> None:
    assert parse_infotext("a cat\nsitting: on a mat") == Infotext(
        "a cat\nsitting: on a mat", "", {}
    )


def test_last_line_needs_three_matches() -> None:
    two = parse_infotext("a dog\nSteps: 20, Seed: 1")
    assert two == Infotext("a dog\nSteps: 20, Seed: 1", "", {})
    three = parse_infotext("a dog\nSteps: 20, Seed: 1, CFG scale: 7")
    assert three == Infotext("a dog", "", {"Steps": "20", "Seed": "1", "CFG scale": "7"})


def test_negative_prompt_only_and_crlf() -> None:
    text = "Negative prompt: blurry\r\nsecond\r\nSteps: 4, Sampler: Euler, Seed: 5\r\n"
    assert parse_infotext(text) == Infotext(
        "", "blurry\nsecond", {"Steps": "4", "Sampler": "Euler", "Seed": "5"}
    )


def test_lines_are_stripped_and_leading_blank_lines_dropped() -> None:
    text = "\n  \n  first  \n\nthird\nNegative prompt:\n  neg \nSteps: 1, Seed: 2, Size: 8x16"
    info = parse_infotext(text)
    assert info.prompt == "first\n\nthird"
    assert info.negative_prompt == "neg"
    assert info.params["Size-1"] == "8" and info.params["Size-2"] == "16"


def test_non_size_values_are_not_split() -> None:
    info = parse_infotext("p\nSteps: 1, Seed: 2, Seed resize from: -1x-1, Size: 64x64x3")
    assert "Seed resize from-1" not in info.params
    assert "Size-1" not in info.params


def test_prompt_line_starting_negative_prompt_switches() -> None:
    # The format cannot carry such a prompt line; A1111 reads it the same way.
    text = format_infotext("a cat\nNegative prompt: not really\nmore", "", BASE_PARAMS)
    info = parse_infotext(text)
    assert (info.prompt, info.negative_prompt) == ("a cat", "not really\nmore")


def test_repeated_key_last_wins() -> None:
    assert parse_infotext("p\nSeed: 1, Steps: 2, Seed: 3").params == {"Seed": "3", "Steps": "2"}


# ------------------------------------------------------------------------------ writing


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (7.0, "7"),
        (0.75, "0.75"),
        (7.000000001, "7"),
        (0.1 + 0.2, "0.3"),
        (-0.0, "0"),
        (1e-07, "1e-07"),
        (14.6146417, "14.614642"),
        (0.0000004, "4e-07"),
        (20, "20"),
        (True, "True"),
        (False, "False"),
        ("Euler a", "Euler a"),
    ],
)
def test_format_value(value: object, written: str) -> None:
    assert format_value(value) == written


def test_format_value_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        format_value(float("nan"))


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("Euler a", "Euler a"),
        ("add_detail: 7c6bad76eb54", '"add_detail: 7c6bad76eb54"'),
        ("a, b", '"a, b"'),
        ("two\nlines", '"two\\nlines"'),
        ("carriage\rreturn", '"carriage\\rreturn"'),
        ('say "hi"', 'say "hi"'),
        ('"starts quoted"', '"\\"starts quoted\\""'),
        (" padded", '" padded"'),
        ("日本語, テスト", '"日本語, テスト"'),
        ("", ""),
        (7.5, "7.5"),
    ],
)
def test_quote(value: object, written: str) -> None:
    assert quote(value) == written


def test_format_infotext_layout() -> None:
    params = {
        "Steps": 20,
        "Sampler": "Euler a",
        "Schedule type": None,
        "CFG scale": 7.0,
        "Seed": 965400086,
        "Size": "512x512",
        "Lora hashes": "add_detail: 7c6bad76eb54",
    }
    assert format_infotext("a cat\non a mat", "blurry", params) == (
        "a cat\non a mat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        'Lora hashes: "add_detail: 7c6bad76eb54"'
    )
    assert format_infotext("", "", params).startswith("Steps: 20, ")
    assert format_infotext("a cat", "", params).split("\n")[1].startswith("Steps:")


def test_format_infotext_refuses_fewer_than_three_params() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        format_infotext("a: b, c: d, e: f", "", {"Steps": 20, "Seed": 1, "Size": None})


@pytest.mark.parametrize("key", ["S", "Bad:key", "Emoji 😀", "new\nline", " Lead"])
def test_format_infotext_refuses_unreadable_keys(key: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        format_infotext("p", "", {"Steps": 1, "Seed": 2, key: 3})


# ------------------------------------------------------------------------------ round trips

BASE_PARAMS: dict[str, object] = {
    "Steps": 28,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 6.5,
    "Seed": 1234,
    "Size": "512x768",
}

TRICKY_VALUES = [
    'say "hi"',
    '"fully quoted"',
    '"',
    "a, b",
    "k: v",
    "line one\nline two",
    "trailing newline\n",
    "tab\tinside",
    " padded ",
    "",
    "C:\\models\\sd15.safetensors",
    "back\\slash, comma",
    "ends with backslash\\",
    "日本語、テスト: ユニコード",
    "emoji 🎨, ok",
    "\\n literal",
    '{"json": [1, 2]}',
]


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat", ""),
        ("", ""),
        ("", "only negative"),
        ("line one\nline two\n\nline four", "neg one\nneg two"),
        ('a "quoted" word, commas, colons: yes', "x: y"),
        ("a dog\na: b", ""),
        ("a dog\na: b, c: d, e: f", ""),
        ("a dog", "a: b, c: d, e: f"),
        ("ユニコード (弱:0.8)", "ぼやけ"),
        ("Steps: 1, Sampler: x, Seed: 2", "Steps: 1, Sampler: x, Seed: 2"),
    ],
)
def test_round_trip_prompts(prompt: str, negative: str) -> None:
    info = parse_infotext(format_infotext(prompt, negative, BASE_PARAMS))
    assert info.prompt == prompt
    assert info.negative_prompt == negative
    assert info.params == {
        **{k: format_value(v) for k, v in BASE_PARAMS.items()},
        "Size-1": "512",
        "Size-2": "768",
    }


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_round_trip_values(value: str) -> None:
    params = {**BASE_PARAMS, "Hires prompt": value, "Model": value, "Version": "v1"}
    info = parse_infotext(format_infotext("p", "n", params))
    assert info.params["Hires prompt"] == value
    assert info.params["Model"] == value
    assert info.params["Version"] == "v1"
    # the whole line must stay one line with all keys found
    assert list(info.params) == [
        *BASE_PARAMS,
        "Size-1",
        "Size-2",
        "Hires prompt",
        "Model",
        "Version",
    ]


def test_round_trip_value_is_last() -> None:
    for value in TRICKY_VALUES:
        info = parse_infotext(format_infotext("p", "", {**BASE_PARAMS, "Last": value}))
        assert info.params["Last"] == value


def _canonical(text: str) -> str:
    """The form in which the format carries a prompt (see the infotext module docstring)."""
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def test_random_round_trips() -> None:
    alphabet = [*'ab xyz,:"\\\n\r\t()[]{}<>|=-_./é日😀', "Steps: 3", "K: v", "\\n"]
    rng = random.Random(1234)

    def text(max_parts: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_parts)))

    for _ in range(500):
        prompt, negative = text(30), text(20)
        params = {**BASE_PARAMS, "Extra": text(15), "Another key": text(15)}
        first = parse_infotext(format_infotext(prompt, negative, params))
        # Values always come back exactly.
        assert first.params["Extra"] == params["Extra"]
        assert first.params["Another key"] == params["Another key"]
        # Prompts in the carriable form come back exactly.
        if _canonical(prompt) == prompt and _canonical(negative) == negative:
            assert (first.prompt, first.negative_prompt) == (prompt, negative)
        # Anything else comes back normalised, after which it round-trips exactly.
        second = parse_infotext(first.to_text())
        assert second == first


# ------------------------------------------------------------------------------ typed access


def test_params_int_and_float() -> None:
    info = parse_infotext(fixture("a1111_basic.txt"))
    assert params_int(info, "Steps") == 28
    assert params_int(info, "Size-2") == 768
    assert params_float(info, "CFG scale") == 7.0
    assert params_float(info.params, "Denoising strength") == 0.45
    assert params_int(info, "ENSD", default=0) == 0
    assert params_float(info, "Eta", default=1.0) == 1.0


@pytest.mark.parametrize(
    ("reader", "value"),
    [(params_int, "20.0"), (params_int, "twenty"), (params_float, "nan"), (params_float, "7,5")],
)
def test_params_bad_number_names_key_and_value(reader, value: str) -> None:
    with pytest.raises(InfotextError) as caught:
        reader({"Steps": value}, "Steps")
    message = str(caught.value)
    assert "'Steps'" in message and repr(value) in message and "\n" not in message


def test_params_missing_without_default() -> None:
    with pytest.raises(InfotextError, match="no 'Seed'"):
        params_int({}, "Seed")


# ------------------------------------------------------------------------------ NovelAI

NOVELAI_DESCRIPTION = (
    "1girl, {{silver hair}}, [[smile]], cherry blossoms, masterpiece, best quality, "
    "amazing quality, very aesthetic, absurdres"
)


def test_novelai_fixture() -> None:
    comment = fixture("novelai_comment.json")
    info = infotext_from_novelai(NOVELAI_DESCRIPTION, comment, 832, 1216)
    assert info == Infotext(
        prompt=NOVELAI_DESCRIPTION,  # NovelAI {emphasis} stays as written
        negative_prompt=(
            "nsfw, lowres, {bad}, error, fewer, extra, missing, worst quality, jpeg artifacts, "
            "bad quality, watermark, unfinished, displeasing, chromatic aberration, signature, "
            "extra digits, artistic error, username, scan, [abstract]"
        ),
        params={
            "Steps": "28",
            "Sampler": "DPM++ 2S a",
            "Schedule type": "Karras",
            "CFG scale": "5",
            "Seed": "2857395815",
            "Size": "832x1216",
            "Size-1": "832",
            "Size-2": "1216",
            "Clip skip": "2",
            "ENSD": "31337",
        },
    )


@pytest.mark.parametrize(
    ("sampler", "shown"),
    [
        ("k_euler_ancestral", "Euler a"),
        ("k_euler", "Euler"),
        ("k_dpmpp_2m", "DPM++ 2M"),
        ("ddim", "DDIM"),
        ("k_dpm_2_ancestral", "DPM2 a"),
        ("nai_smea_dyn", "nai_smea_dyn"),
    ],
)
def test_novelai_samplers(sampler: str, shown: str) -> None:
    comment = {"steps": 20, "sampler": sampler, "seed": 1, "scale": 11, "uc": "", "width": 512}
    info = infotext_from_novelai("p", comment, None, 768)
    assert info.params["Sampler"] == shown
    assert info.params["Size"] == "512x768"  # width from the JSON, height given
    assert info.negative_prompt == ""
    assert "Schedule type" not in info.params


def test_novelai_native_schedule_is_left_out_and_size_from_json() -> None:
    comment = json.dumps(
        {
            "steps": 28,
            "sampler": "k_euler",
            "seed": 3,
            "scale": 5.5,
            "uc": "bad",
            "width": 832,
            "height": 1216,
            "noise_schedule": "native",
        }
    )
    info = infotext_from_novelai("p", comment)
    assert info.params["Size"] == "832x1216"
    assert info.params["CFG scale"] == "5.5"
    assert "Schedule type" not in info.params


@pytest.mark.parametrize("comment", ["{not json", "[1, 2]", '"text"'])
def test_novelai_bad_comment(comment: str) -> None:
    with pytest.raises(InfotextError, match="NovelAI Comment"):
        infotext_from_novelai("p", comment, 512, 512)


def test_novelai_without_size() -> None:
    with pytest.raises(InfotextError, match="size"):
        infotext_from_novelai("p", {"steps": 20}, None, None)
