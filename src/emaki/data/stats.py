"""``emaki data stats``: what a dataset holds (counts per source, style and license, sizes, captions)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

from emaki.data.manifest import read_info, read_manifest

_WORD = re.compile(r"[a-z][a-z']+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "the",
        "of",
        "with",
        "in",
        "on",
        "at",
        "to",
        "for",
        "by",
        "style",
        "skin",
        "tone",
    ]
)


def dataset_stats(folder: Path, verify: bool = False, top: int = 20) -> dict[str, Any]:
    """Summarize a dataset; with ``verify``, also check every file's presence and sha256."""
    folder = Path(folder)
    records = read_manifest(folder)
    info = read_info(folder)
    words: Counter = Counter()
    lengths = []
    for r in records:
        toks = _WORD.findall(r.caption.lower())
        lengths.append(len(toks))
        words.update(t for t in toks if t not in _STOP)
    sizes = Counter(f"{r.width}x{r.height}" for r in records)
    stats: dict[str, Any] = {
        "folder": str(folder),
        "images": len(records),
        "identities": len({r.name for r in records if r.name}),
        "by_source": dict(Counter(r.source for r in records).most_common()),
        "by_style": dict(Counter(r.style for r in records if r.style).most_common()),
        "by_license": dict(Counter(r.license for r in records).most_common()),
        "sizes": dict(sizes.most_common(10)),
        "caption_words": {
            "min": min(lengths, default=0),
            "mean": round(sum(lengths) / max(1, len(lengths)), 2),
            "max": max(lengths, default=0),
        },
        "top_words": dict(words.most_common(top)),
        "duplicates_removed_at_build": info.get("duplicates_removed"),
        "skipped_at_build": len(info.get("skipped", [])),
    }
    if verify:
        missing, corrupt = [], []
        for r in records:
            p = folder / r.file
            if not p.is_file():
                missing.append(r.file)
            elif hashlib.sha256(p.read_bytes()).hexdigest() != r.sha256:
                corrupt.append(r.file)
        stats["verify"] = {"missing": missing, "sha256_mismatch": corrupt}
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as aligned text for the terminal."""
    lines = [
        f"dataset {stats['folder']}: {stats['images']} images, {stats['identities']} identities"
    ]
    for key, title in (
        ("by_source", "source"),
        ("by_style", "style"),
        ("by_license", "license"),
        ("sizes", "size"),
    ):
        if stats[key]:
            lines.append(f"{title}:")
            lines.extend(f"  {k:<28} {v:>7}" for k, v in stats[key].items())
    cw = stats["caption_words"]
    lines.append(f"caption words: min {cw['min']}, mean {cw['mean']}, max {cw['max']}")
    lines.append("top words: " + ", ".join(f"{w} ({n})" for w, n in stats["top_words"].items()))
    if stats["duplicates_removed_at_build"] is not None:
        lines.append(
            f"at build: {stats['duplicates_removed_at_build']} duplicates removed, "
            f"{stats['skipped_at_build']} items skipped (see dataset.json)"
        )
    if "verify" in stats:
        v = stats["verify"]
        lines.append(
            f"verify: {len(v['missing'])} missing, {len(v['sha256_mismatch'])} sha256 mismatches"
            + ("" if v["missing"] or v["sha256_mismatch"] else " (all files intact)")
        )
    return "\n".join(lines)
