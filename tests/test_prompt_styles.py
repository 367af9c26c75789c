"""A1111 ``styles.csv``: reading files written in the real format, writing, and applying styles.

The files are written by the tests with Python's csv module (which is what A1111 uses) or as the
literal bytes A1111 writes (BOM, CRLF line ends); what we write is read back with csv.DictReader
configured as A1111 configures it. Expected merges are worked out by hand from A1111's
``merge_prompts`` rule.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from emaki.errors import EmakiError
from emaki.prompts import Style, StyleFileError, apply_styles, load_styles, save_styles


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8-sig") -> Path:
    with path.open("w", encoding=encoding, newline="") as file:
        csv.writer(file).writerows(rows)
    return path


def a1111_read(path: Path) -> dict[str, tuple[str, str]]:
    """Read a styles file the way A1111's StyleDatabase does (DictReader, skipinitialspace)."""
    with path.open("r", encoding="utf-8-sig", newline="") as file:
        rows = csv.DictReader(file, skipinitialspace=True)
        return {r["name"]: (r["prompt"], r.get("negative_prompt", "")) for r in rows}


def error_message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, EmakiError)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- reading


def test_load_a1111_written_file(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "styles.csv",
        [
            ["name", "prompt", "negative_prompt"],
            ["cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing"],
            ["quotes", 'a "quoted" word, and a comma', ""],
            ["multi", "line one\nline two", "bad\r\nhands"],
        ],
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # A1111 writes a BOM
    assert load_styles(path) == {
        "cinematic": Style(
            "cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing"
        ),
        "quotes": Style("quotes", 'a "quoted" word, and a comma', ""),
        "multi": Style("multi", "line one\nline two", "bad\r\nhands"),
    }
    assert list(load_styles(path)) == ["cinematic", "quotes", "multi"]  # file order


def test_load_literal_bytes_with_bom_crlf_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes(
        b"\xef\xbb\xbfname, prompt, negative_prompt\r\n"
        b'sharp, "sharp focus, detailed", blurry\r\n'
        b"\r\n"  # blank row: skipped
        b"# old, not used, x\r\n"  # name starting with '#': a comment row
        b"plain,photo of {prompt},\r\n"
    )
    assert load_styles(path) == {
        "sharp": Style("sharp", "sharp focus, detailed", "blurry"),
        "plain": Style("plain", "photo of {prompt}", ""),
    }


def test_load_without_bom(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "s.csv", [["name", "prompt", "negative_prompt"], ["a", "b", "c"]], "utf-8"
    )
    assert load_styles(path) == {"a": Style("a", "b", "c")}


def test_load_old_format_and_missing_negative_column(tmp_path: Path) -> None:
    old = write_csv(tmp_path / "old.csv", [["name", "text"], ["anime", "anime style, {prompt}"]])
    assert load_styles(old) == {"anime": Style("anime", "anime style, {prompt}", "")}
    two = write_csv(tmp_path / "two.csv", [["name", "prompt"], ["x", "y"]])
    assert load_styles(two) == {"x": Style("x", "y", "")}


def test_load_ignores_extra_columns_and_keeps_column_order(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "s.csv",
        [["negative_prompt", "description", "prompt", "name"], ["neg", "about", "pos", "n"]],
    )
    assert load_styles(path) == {"n": Style("n", "pos", "neg")}


def test_load_repeated_name_keeps_first_place_latest_text(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "s.csv",
        [["name", "prompt", "negative_prompt"], ["a", "1", ""], ["b", "2", ""], ["a", "3", ""]],
    )
    styles = load_styles(path)
    assert list(styles) == ["a", "b"]
    assert styles["a"] == Style("a", "3", "")


def test_load_empty_file_has_no_styles(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b"")
    assert load_styles(path) == {}
    path.write_bytes(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")
    assert load_styles(path) == {}


# -------------------------------------------------------------------------------- read errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(tmp_path / "nope.csv")
    assert "not found" in error_message(excinfo) and "nope.csv" in str(excinfo.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(tmp_path)
    assert "folder" in error_message(excinfo)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b"name,prompt\nx,caf\xe9\n")  # Latin-1 bytes
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    assert "UTF-8" in error_message(excinfo)


def test_bad_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", [["title", "prompt"], ["x", "y"]])
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    assert "line 1" in error_message(excinfo) and "header" in str(excinfo.value)


def test_too_many_fields_names_the_line(tmp_path: Path) -> None:
    # the quoted field spans lines 2-3, so the bad row starts on line 4
    path = write_csv(
        tmp_path / "s.csv",
        [["name", "prompt", "negative_prompt"], ["ok", "two\nlines", ""], ["bad", "a", "b", "c"]],
    )
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    message = error_message(excinfo)
    assert "line 4" in message and "4 fields" in message and "s.csv" in message


def test_row_without_name(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", [["name", "prompt"], ["a", "b"], ["", "orphan"]])
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    assert "line 3" in error_message(excinfo) and "no name" in str(excinfo.value)


def test_row_too_short_for_its_prompt(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", [["name", "prompt", "negative_prompt"], ["lonely"]])
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    assert "line 2" in error_message(excinfo) and "'lonely'" in str(excinfo.value)


def test_csv_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    # the csv module refuses fields over its 131072-character limit
    path.write_bytes(b"name,prompt\nx,y\nz," + b"a" * 200_000 + b"\n")
    with pytest.raises(StyleFileError) as excinfo:
        load_styles(path)
    assert "line 3" in error_message(excinfo)


# ------------------------------------------------------------------------------------- writing


def test_save_round_trip_and_a1111_reads_it(tmp_path: Path) -> None:
    styles = {
        "cinematic": Style("cinematic", "cinematic still of {prompt}, film grain", "cartoon"),
        "quotes": Style("quotes", 'say "cheese", please', "a\nb"),
        "empty": Style("empty", "", ""),
        "ünï": Style("ünï", "東京, night", ""),
    }
    path = tmp_path / "styles.csv"
    save_styles(path, styles)
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")  # A1111's header
    assert load_styles(path) == styles
    assert list(load_styles(path)) == list(styles)
    assert a1111_read(path) == {k: (v.prompt, v.negative_prompt) for k, v in styles.items()}


def test_save_keeps_leading_whitespace(tmp_path: Path) -> None:
    styles = {"s": Style("s", " {prompt}, spaced", "\tneg")}
    path = tmp_path / "styles.csv"
    save_styles(path, styles)
    assert load_styles(path) == styles
    assert a1111_read(path) == {"s": (" {prompt}, spaced", "\tneg")}


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "styles.csv", [["name", "prompt"], ["old", "x"]])
    save_styles(path, {"new": Style("new", "y", "z")})
    assert load_styles(path) == {"new": Style("new", "y", "z")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv"]


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_csv(tmp_path / "styles.csv", [["name", "prompt"], ["old", "x"]])
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StyleFileError) as excinfo:
        save_styles(path, {"new": Style("new", "y", "")})
    assert "No space left" in error_message(excinfo)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv"]


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(StyleFileError) as excinfo:
        save_styles(tmp_path / "missing" / "styles.csv", {})
    assert "does not exist" in error_message(excinfo)
    for name in ("", "#hidden"):
        with pytest.raises(StyleFileError):
            save_styles(tmp_path / "styles.csv", {name: Style(name, "p", "")})
    assert not (tmp_path / "styles.csv").exists()


# ------------------------------------------------------------------------------------ applying

CINEMATIC = Style("cinematic", "cinematic still of {prompt}, film grain", "cartoon")
SHARP = Style("sharp", "sharp focus", "blurry")


def test_apply_placeholder_then_append() -> None:
    assert apply_styles("a cat", "", [CINEMATIC, SHARP]) == (
        "cinematic still of a cat, film grain, sharp focus",
        "cartoon, blurry",  # empty negative: no leading ", "
    )


def test_apply_order_matters() -> None:
    assert apply_styles("a cat", "", [SHARP, CINEMATIC]) == (
        "cinematic still of a cat, sharp focus, film grain",
        "blurry, cartoon",
    )


def test_apply_strips_only_when_appending() -> None:
    # appending strips both sides; a placeholder substitutes the text exactly as it is
    assert apply_styles("  a cat  ", " lowres ", [SHARP]) == (
        "a cat, sharp focus",
        "lowres, blurry",
    )
    assert apply_styles("  a cat  ", "", [Style("p", "[{prompt}]", "")]) == ("[  a cat  ]", "")


def test_apply_empty_style_and_empty_prompt() -> None:
    assert apply_styles(" a ", " n ", [Style("e", "", "")]) == ("a", "n")
    assert apply_styles("", "", [SHARP]) == ("sharp focus", "blurry")
    assert apply_styles("x", "y", []) == ("x", "y")


def test_apply_placeholder_twice_and_in_negative() -> None:
    style = Style("echo", "{prompt} and {prompt}", "no {prompt}")
    assert apply_styles("cat", "dog", [style]) == ("cat and cat", "no dog")


def test_apply_styles_loaded_from_file(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "styles.csv",
        [["name", "prompt", "negative_prompt"], ["photo", "photo of {prompt}, 35mm", "painting"]],
    )
    styles = load_styles(path)
    assert apply_styles("a fox", "lowres", [styles["photo"]]) == (
        "photo of a fox, 35mm",
        "lowres, painting",
    )
