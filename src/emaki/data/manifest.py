"""A dataset folder: ``images/`` plus ``manifest.jsonl`` (one record per image) and ``dataset.json``.

Each manifest line names the image file (relative to the folder), its caption, where it came from,
its license and required attribution, and the sha256 of the file, so that a dataset can be
audited and verified. ``name`` is the identity an image shows (an emoji's CLDR name), used by
evaluation; user images leave it empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from emaki.data.sources import DataError

MANIFEST = "manifest.jsonl"
DATASET_INFO = "dataset.json"


@dataclass(frozen=True)
class Record:
    file: str
    caption: str
    source: str
    license: str
    attribution: str
    sha256: str
    width: int
    height: int
    name: str = ""
    style: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


_FIELDS = {f.name for f in fields(Record)}
_REQUIRED = {f.name for f in fields(Record) if f.name not in ("name", "style")}


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line; bad JSON is a one-line error."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e


def read_manifest(folder: Path) -> list[Record]:
    """Read a dataset's manifest; a missing folder, file or malformed line is a one-line error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{folder} is not an emaki dataset (no {MANIFEST}); build one with emaki data build"
        )
    records: list[Record] = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not obj.keys() >= _REQUIRED:
            missing = sorted(_REQUIRED - set(obj)) if isinstance(obj, dict) else sorted(_REQUIRED)
            raise DataError(f"{path}:{lineno}: record lacks {', '.join(missing)}")
        records.append(Record(**{k: v for k, v in obj.items() if k in _FIELDS}))
    return records


def read_info(folder: Path) -> dict:
    path = Path(folder) / DATASET_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
