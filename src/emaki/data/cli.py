"""``emaki data build`` and ``emaki data stats``: the dataset commands, registered on the main parser."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emaki.data.sources import ALL_SOURCES, default_source_keys


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and inspect training datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser(
        "build",
        help="assemble a captioned dataset from open sources and/or a folder of your images",
        description=(
            "Sources: "
            + ", ".join(f"{k} ({s.license})" for k, s in ALL_SOURCES.items())
            + f". 'default' = {', '.join(default_source_keys())}."
        ),
    )
    b.add_argument("--out", type=Path, required=True, help="new dataset folder (must not exist)")
    b.add_argument("--sources", help="comma-separated source keys, 'default' or 'all'")
    b.add_argument(
        "--images",
        type=Path,
        action="append",
        help="a folder of your images with captions (.txt beside each, or metadata.jsonl); repeatable",
    )
    b.add_argument(
        "--size", type=int, default=256, help="SVG render size / max side of images (256)"
    )
    b.add_argument(
        "--skin-tones",
        choices=["none", "one", "all"],
        default="one",
        help="skin-tone variants of emoji: none, one per emoji and set (default), or all",
    )
    b.add_argument(
        "--cache", type=Path, help="download cache (default $EMAKI_CACHE or ~/.cache/emaki)"
    )
    b.add_argument("--offline", action="store_true", help="use only packages already in the cache")
    b.add_argument("--license", default="unspecified", help="license of the --images folders")
    b.add_argument("--attribution", default="", help="attribution of the --images folders")
    b.add_argument("--limit", type=int, help="stop after N images (for trials)")

    s = dsub.add_parser("stats", help="summarize a dataset")
    s.add_argument("folder", type=Path)
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.add_argument("--verify", action="store_true", help="check every file's sha256")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        return _build(args)
    return _stats(args)


def _build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from emaki.data.build import build_dataset
    from emaki.data.sources import resolve_sources

    sources = resolve_sources(args.sources)
    bar = tqdm(desc="building", unit="img", file=sys.stderr, dynamic_ncols=True)

    def progress(i: int, total: int | None) -> None:
        bar.update(1)

    try:
        report = build_dataset(
            args.out,
            sources,
            args.images,
            size=args.size,
            cache=args.cache,
            offline=args.offline,
            skin_tones=args.skin_tones,
            license=args.license,
            attribution=args.attribution,
            limit=args.limit,
            progress=progress,
        )
    finally:
        bar.close()
    for origin, reason in report.skipped:
        print(f"skipped {origin}: {reason}", file=sys.stderr)
    per = ", ".join(f"{k} {v}" for k, v in report.per_source.items())
    print(
        f"wrote {report.records} images to {report.out} ({per}); "
        f"{report.duplicates} duplicates removed, {len(report.skipped)} skipped"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from emaki.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.folder, verify=args.verify)
    print(json.dumps(stats, indent=1, ensure_ascii=False) if args.json else format_stats(stats))
    if args.verify and (stats["verify"]["missing"] or stats["verify"]["sha256_mismatch"]):
        return 1
    return 0
