"""Prompt styles in AUTOMATIC1111's ``styles.csv`` format: read, write, apply.

The file is CSV as Python's :mod:`csv` module writes it (comma-separated, ``"`` quoting, ``""`` for a
quote inside a quoted field, fields may span lines when quoted), UTF-8, usually with a byte-order
mark (A1111 writes one; we write one too and accept files with or without it). The first row is the
header; A1111 writes ``name,prompt,negative_prompt``::

    name,prompt,negative_prompt
    cinematic,"cinematic still of {prompt}, shallow depth of field","cartoon, drawing"
    sharp,"sharp focus, highly detailed",blurry

Reading follows A1111's ``StyleDatabase.load_from_csv``: spaces right after a comma are skipped
(``skipinitialspace``), blank rows and rows whose name starts with ``#`` are ignored, the old
``name,text`` header (A1111 before negative prompts) is read with ``text`` as the prompt, a missing
``negative_prompt`` column means an empty negative prompt, other columns are ignored, and a later
row with the same name replaces an earlier one. Where A1111 silently carries on, we stop with a
one-line :class:`StyleFileError` naming the file and line: a missing or unreadable file (A1111
just shows no styles), a header without ``name`` and ``prompt``/``text``, a row with more fields
than the header, a row without a name, and a row too short to hold its prompt (A1111 would keep
``None`` there and fail when the style is applied). Surrounding spaces in header names are ignored.

Applying follows A1111's ``merge_prompts``, style by style in order, separately for the prompt and
the negative prompt: a style text containing ``{prompt}`` has every ``{prompt}`` replaced by the
text so far (nothing is stripped); any other style text is appended as ``text, style``, both
stripped of surrounding whitespace, and an empty side is left out (no stray ``", "``).

Writing (:func:`save_styles`) produces the same format, via a temporary file in the destination
folder moved into place with :func:`os.replace`, so a crash never leaves half a file. A file is
written with every field quoted when some value starts with whitespace, because a reader that
skips initial spaces (A1111, and :func:`load_styles`) would otherwise lose it.
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from emaki.errors import InvalidRequestError

__all__ = ["FIELDS", "Style", "StyleFileError", "apply_styles", "load_styles", "save_styles"]

FIELDS = ("name", "prompt", "negative_prompt")
"""The header A1111 writes, in its order."""

_PLACEHOLDER = "{prompt}"


class StyleFileError(InvalidRequestError):
    """A styles file could not be read or written, or holds a row that is not a style."""


@dataclass(frozen=True)
class Style:
    """One named style: text merged into the prompt and into the negative prompt."""

    name: str
    prompt: str
    negative_prompt: str = ""


# ----------------------------------------------------------------------------------------- apply


def _merge(style_text: str, prompt: str) -> str:
    if _PLACEHOLDER in style_text:
        return style_text.replace(_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative: str, styles: Sequence[Style]) -> tuple[str, str]:
    """``(prompt, negative)`` with each style merged in, in order (A1111's ``merge_prompts``)."""
    for style in styles:
        prompt = _merge(style.prompt, prompt)
        negative = _merge(style.negative_prompt, negative)
    return prompt, negative


# ------------------------------------------------------------------------------------------ read


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, fields)`` for each CSV record of ``path``, blank lines skipped."""
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, skipinitialspace=True)
            line = 1
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise StyleFileError(
                        f"{path}: line {reader.line_num}: bad CSV: {exc}"
                    ) from None
                if fields:
                    yield line, fields
                line = reader.line_num + 1
    except FileNotFoundError:
        raise StyleFileError(f"styles file not found: {path}") from None
    except IsADirectoryError:
        raise StyleFileError(f"styles file is a folder: {path}") from None
    except UnicodeDecodeError:
        raise StyleFileError(f"styles file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise StyleFileError(f"cannot read styles file {path}: {exc.strerror or exc}") from None


def _header(path: Path, line: int, fields: list[str]) -> list[str]:
    names = [name.strip() for name in fields]
    if "name" not in names or ("prompt" not in names and "text" not in names):
        raise StyleFileError(
            f"{path}: line {line}: header must name the columns name,prompt,negative_prompt, "
            f"got {','.join(names)}"
        )
    return names


def _style(path: Path, line: int, header: list[str], fields: list[str]) -> Style | None:
    if len(fields) > len(header):
        raise StyleFileError(
            f"{path}: line {line}: {len(fields)} fields but the header has {len(header)}"
        )
    row = dict(zip(header, fields))
    name = row.get("name", "")
    if name.startswith("#"):
        return None  # A1111: a comment row
    if not name:
        raise StyleFileError(f"{path}: line {line}: style has no name")
    prompt = row.get("prompt", row.get("text"))
    if prompt is None:
        raise StyleFileError(f"{path}: line {line}: style {name!r} has no prompt field")
    return Style(name, prompt, row.get("negative_prompt", ""))


def load_styles(path: Path) -> dict[str, Style]:
    """The styles of an A1111 ``styles.csv``, by name, in file order (module docstring)."""
    path = Path(path)
    styles: dict[str, Style] = {}
    header: list[str] | None = None
    for line, fields in _rows(path):
        if header is None:
            header = _header(path, line, fields)
            continue
        style = _style(path, line, header, fields)
        if style is not None:
            styles[style.name] = style  # a repeated name keeps its first place, latest text
    return styles


# ----------------------------------------------------------------------------------------- write


def _check_writable(path: Path, styles: Mapping[str, Style]) -> None:
    if not path.parent.is_dir():
        raise StyleFileError(f"folder for styles file does not exist: {path.parent}")
    for style in styles.values():
        if not style.name or style.name.startswith("#"):
            raise StyleFileError(
                f"cannot save style named {style.name!r}: a styles file reads an empty name or "
                "one starting with '#' as no style"
            )


def _open_temp(folder: Path) -> tuple[int, Path]:
    # os.open with 0o666 lets the umask decide the permissions (mkstemp would give 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = folder / f".emaki-styles-{secrets.token_hex(8)}.tmp"
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue


def save_styles(path: Path, styles: Mapping[str, Style]) -> None:
    """Write ``styles`` (in mapping order) to ``path`` as an A1111 ``styles.csv``, atomically."""
    path = Path(path)
    _check_writable(path, styles)
    rows = [(s.name, s.prompt, s.negative_prompt) for s in styles.values()]
    leading_space = any(value[:1].isspace() for row in rows for value in row)
    quoting = csv.QUOTE_ALL if leading_space else csv.QUOTE_MINIMAL
    temp: Path | None = None
    try:
        handle, temp = _open_temp(path.parent)
        with os.fdopen(handle, "w", encoding="utf-8-sig", newline="") as file:
            writer = csv.writer(file, quoting=quoting)
            writer.writerow(FIELDS)
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as exc:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise StyleFileError(f"cannot write styles file {path}: {exc.strerror or exc}") from None
