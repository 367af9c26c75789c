"""``emaki data build``: assemble a captioned training set from open sources and/or the user's own images.

The build is reproducible: sources are pinned (``emaki.data.sources``), items are processed in a
fixed order, skin-tone subsampling is keyed by name (not by a random generator), and nothing
time-dependent is written. Images whose pixels are identical to an earlier image are dropped as
duplicates. Files that cannot be read or rendered are reported by path and skipped. The dataset is
written into a temporary folder beside the destination and renamed into place at the end, so an
interrupted build never leaves a half-written dataset, and an existing destination is never
overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from emaki.data.captions import EmojiLexicon, clipart_title, emoji_caption, split_skin_tone
from emaki.data.fetch import FetchedPackage, fetch_debian, fetch_npm
from emaki.data.manifest import DATASET_INFO, MANIFEST, Record, iter_jsonl
from emaki.data.raster import flatten, iconify_svg, render_svg, require_svg_renderer
from emaki.data.sources import (
    EMOJI_DATASOURCE,
    EMOJILIB,
    DataError,
    DebianSvgSource,
    IconSet,
)
from emaki.errors import EmakiError
from emaki.imageio import read_image
from emaki.models.files import atomic_write_folder

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIN_TONE_POLICIES = ("none", "one", "all")
FORMAT_VERSION = 1


@dataclass
class Candidate:
    """One image to be made: how to get its pixels and what to record about it."""

    rel: str  # path inside images/
    load: Callable[[], Image.Image]
    origin: str  # what a skip message names (a file path or package/icon)
    caption: str
    source: str
    license: str
    attribution: str
    name: str = ""
    style: str = ""


@dataclass
class BuildReport:
    out: Path
    records: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_source: Counter = field(default_factory=Counter)


def _tone_pick(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def iter_icon_set(
    src: IconSet, pkg: FetchedPackage, lexicon: EmojiLexicon, size: int, skin_tones: str
) -> Iterator[Candidate]:
    """The icons of an Iconify set, with skin-tone variants kept, dropped, or one per base name."""
    try:
        data = json.loads((pkg.root / "icons.json").read_text(encoding="utf-8"))
        icons_all = data["icons"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{src.package}@{src.version}: icons.json unreadable ({e})") from e
    icons = {n: ic for n, ic in icons_all.items() if not ic.get("hidden")}
    names = set(icons)
    variants: dict[str, list[tuple[str, str]]] = {}
    plain: list[str] = []
    for name in sorted(icons):
        st = split_skin_tone(name, names)
        if st.tone is None:
            plain.append(name)
        else:
            variants.setdefault(st.base, []).append((name, st.tone))
    chosen: list[tuple[str, str, str | None]] = [(n, n, None) for n in plain]
    for base, vs in sorted(variants.items()):
        if skin_tones == "all":
            chosen.extend((n, base, t) for n, t in vs)
        elif skin_tones == "one":
            n, t = vs[_tone_pick(f"{src.key}/{base}", len(vs))]
            chosen.append((n, base, t))
    chosen.sort()
    dw, dh = data.get("width", 16), data.get("height", 16)
    dl, dt = data.get("left", 0), data.get("top", 0)
    for name, base, tone in chosen:
        ic = icons[name]
        svg = iconify_svg(
            ic["body"],
            ic.get("left", dl),
            ic.get("top", dt),
            ic.get("width", dw),
            ic.get("height", dh),
        )
        canonical = lexicon.canonical(base)
        yield Candidate(
            rel=f"{src.key}/{name}.png",
            load=lambda svg=svg: render_svg(svg, size),
            origin=f"{src.package}@{src.version}:{name}",
            caption=emoji_caption(canonical, tone, src.style, lexicon),
            source=src.key,
            license=src.license,
            attribution=src.attribution,
            name=canonical,
            style=src.style,
        )


def iter_debian_svgs(src: DebianSvgSource, pkg: FetchedPackage, size: int) -> Iterator[Candidate]:
    """The SVG drawings of a Debian package, captioned from their file names."""
    files = sorted(p for p in pkg.root.rglob("*.svg") if p.is_file())
    for path in files:
        title = clipart_title(path)
        if sum(c.isalpha() for c in title) < 3:
            continue
        rel_in_pkg = path.relative_to(pkg.root).as_posix()
        yield Candidate(
            rel=f"{src.key}/{'_'.join(path.relative_to(pkg.root).with_suffix('').parts[-2:])}.png",
            load=lambda path=path: render_svg(
                path.read_text(encoding="utf-8", errors="replace"), size
            ),
            origin=f"{src.package}:{rel_in_pkg}",
            caption=", ".join([title, *_categories(path, pkg.root), src.style]),
            source=src.key,
            license=src.license,
            attribution=src.attribution,
            name=title,
            style=src.style,
        )


def _categories(path: Path, root: Path) -> list[str]:
    """The folders between a package's ``svg/`` folder and the file: Open Clip Art's categories."""
    parts = list(path.relative_to(root).parent.parts)
    if "svg" in parts:
        parts = parts[parts.index("svg") + 1 :]
    return [p.replace("_", " ").replace("-", " ") for p in parts]


def _read_metadata_jsonl(folder: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    path = folder / "metadata.jsonl"
    for lineno, obj in iter_jsonl(path):
        fname = obj.get("file_name") if isinstance(obj, dict) else None
        if not isinstance(fname, str):
            raise DataError(f"{path}:{lineno}: needs a JSON object with file_name")
        text = next(
            (obj[k] for k in ("text", "caption", "prompt") if isinstance(obj.get(k), str)), None
        )
        if text is None:
            raise DataError(f"{path}:{lineno}: needs a caption in text, caption or prompt")
        captions[Path(fname).as_posix()] = text
    return captions


def load_user_image(path: Path, max_side: int) -> Image.Image:
    """Open a user image safely (:func:`emaki.imageio.read_image`: fully decoded, decompression
    bombs refused), EXIF orientation applied, RGB out."""
    img = flatten(ImageOps.exif_transpose(read_image(path)))
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
    return img


def iter_user_folder(
    folder: Path, max_side: int, license: str, attribution: str, report: BuildReport
) -> Iterator[Candidate]:
    """A folder of the user's images, captioned by ``metadata.jsonl`` or a ``.txt`` beside each image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    meta = _read_metadata_jsonl(folder) if (folder / "metadata.jsonl").is_file() else None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {folder}")
    tag = folder.resolve().name or "images"
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if meta is not None:
            caption = meta.get(rel)
        else:
            caption = None
            for ext in (".txt", ".caption"):
                side = path.with_suffix(ext)
                if side.is_file():
                    caption = side.read_text(encoding="utf-8", errors="replace")
                    break
        if caption is None or not caption.strip():
            report.skipped.append(
                (str(path), "no caption (metadata.jsonl entry or .txt beside it)")
            )
            continue
        yield Candidate(
            rel=f"user-{tag}/{Path(rel).with_suffix('').as_posix()}.png",
            load=lambda path=path: load_user_image(path, max_side),
            origin=str(path),
            caption=" ".join(caption.split()),
            source=f"user:{tag}",
            license=license,
            attribution=attribution,
        )


def _emoji_lexicon(cache: Path, offline: bool, icon_pkgs: list[FetchedPackage]) -> EmojiLexicon:
    lib = fetch_npm(EMOJILIB.name, EMOJILIB.version, cache, offline)
    ds = fetch_npm(EMOJI_DATASOURCE.name, EMOJI_DATASOURCE.version, cache, offline)
    chars = [p.root / "chars.json" for p in icon_pkgs if (p.root / "chars.json").is_file()]
    return EmojiLexicon.load(chars, lib.root, ds.root)


def build_dataset(
    out: Path,
    sources: list[IconSet | DebianSvgSource],
    image_folders: list[Path] | None = None,
    *,
    size: int = 256,
    cache: Path | None = None,
    offline: bool = False,
    skin_tones: str = "one",
    license: str = "unspecified",
    attribution: str = "",
    limit: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> BuildReport:
    """Build a dataset folder at ``out`` (which must not exist). Returns what was written and skipped."""
    out = Path(out)
    image_folders = list(image_folders or [])
    if not sources and not image_folders:
        raise DataError("nothing to build: give --sources and/or --images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose a new folder")
    if not 16 <= size <= 4096:
        raise DataError(f"size {size} is outside 16..4096")
    if skin_tones not in SKIN_TONE_POLICIES:
        raise DataError(
            f"skin-tone policy {skin_tones!r}; choose one of {', '.join(SKIN_TONE_POLICIES)}"
        )
    if sources:
        require_svg_renderer()
    cache = Path(cache) if cache is not None else default_cache()
    report = BuildReport(out=out)

    fetched: list[tuple[IconSet | DebianSvgSource, FetchedPackage]] = []
    for src in sources:
        if isinstance(src, IconSet):
            fetched.append((src, fetch_npm(src.package, src.version, cache, offline)))
        else:
            fetched.append((src, fetch_debian(src.package, src.version, cache, offline)))
    icon_pkgs = [p for s, p in fetched if isinstance(s, IconSet)]
    lexicon = _emoji_lexicon(cache, offline, icon_pkgs) if icon_pkgs else EmojiLexicon()

    def candidates() -> Iterator[Candidate]:
        for src, pkg in fetched:
            if isinstance(src, IconSet):
                yield from iter_icon_set(src, pkg, lexicon, size, skin_tones)
            else:
                yield from iter_debian_svgs(src, pkg, size)
        for folder in image_folders:
            yield from iter_user_folder(folder, size, license, attribution, report)

    def write(tmp: Path) -> None:
        seen_pixels: set[str] = set()
        used_names: set[str] = set()
        records: list[Record] = []
        for i, cand in enumerate(candidates()):
            if limit is not None and len(records) >= limit:
                break
            if progress is not None:
                progress(i, None)
            try:
                img = cand.load()
            except (
                OSError,
                ValueError,
                SyntaxError,
                EmakiError,
                Image.DecompressionBombError,
            ) as e:
                report.skipped.append(
                    (cand.origin, str(e).splitlines()[0] if str(e) else type(e).__name__)
                )
                continue
            pix = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()
            if pix in seen_pixels:
                report.duplicates += 1
                continue
            seen_pixels.add(pix)
            rel = _unique(f"images/{cand.rel}", used_names)
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=False, compress_level=6)
            data = buf.getvalue()
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            records.append(
                Record(
                    file=rel,
                    caption=cand.caption,
                    source=cand.source,
                    license=cand.license,
                    attribution=cand.attribution,
                    sha256=hashlib.sha256(data).hexdigest(),
                    width=img.width,
                    height=img.height,
                    name=cand.name,
                    style=cand.style,
                )
            )
            report.per_source[cand.source] += 1
        if not records:
            raise DataError("no usable images: every item was skipped or a duplicate")
        report.records = len(records)
        (tmp / MANIFEST).write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
        info = _dataset_info(
            size, skin_tones, fetched, bool(icon_pkgs), image_folders, license, attribution, report
        )
        (tmp / DATASET_INFO).write_text(
            json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "ATTRIBUTION.md").write_text(_attribution_md(records), encoding="utf-8")

    if out.exists():
        out.rmdir()  # known to be empty (checked above)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_folder(out, write, overwrite=False)
    return report


def _dataset_info(
    size: int,
    skin_tones: str,
    fetched: list[tuple[IconSet | DebianSvgSource, FetchedPackage]],
    has_icons: bool,
    image_folders: list[Path],
    license: str,
    attribution: str,
    report: BuildReport,
) -> dict:
    return {
        "format": FORMAT_VERSION,
        "size": size,
        "skin_tones": skin_tones,
        "sources": [
            {
                "key": s.key,
                "package": s.package,
                "version": s.version,
                "license": s.license,
                "attribution": s.attribution,
                "archive_sha256": p.archive_sha256,
                "images": report.per_source[s.key],
            }
            for s, p in fetched
        ],
        "metadata_packages": (
            [
                f"{EMOJI_DATASOURCE.name}@{EMOJI_DATASOURCE.version}",
                f"{EMOJILIB.name}@{EMOJILIB.version}",
            ]
            if has_icons
            else []
        ),
        "user_folders": [
            {"folder": str(f), "license": license, "attribution": attribution}
            for f in image_folders
        ],
        "images": report.records,
        "duplicates_removed": report.duplicates,
        "skipped": [{"item": o, "reason": r} for o, r in report.skipped],
    }


def _unique(rel: str, used: set[str]) -> str:
    stem, dot, ext = rel.rpartition(".")
    cand, n = rel, 2
    while cand.lower() in used:
        cand = f"{stem}-{n}{dot}{ext}"
        n += 1
    used.add(cand.lower())
    return cand


def _attribution_md(records: list[Record]) -> str:
    by: dict[tuple[str, str, str], int] = Counter(
        (r.source, r.license, r.attribution) for r in records
    )
    lines = [
        "# Attribution",
        "",
        "The images in this dataset come from these sources, under these licenses:",
        "",
        "| source | images | license | attribution |",
        "|---|---|---|---|",
    ]
    for (source, lic, attr), n in sorted(by.items()):
        lines.append(f"| {source} | {n} | {lic} | {attr or '-'} |")
    return "\n".join(lines) + "\n"


def default_cache() -> Path:
    """Where downloaded source packages are kept: ``$EMAKI_CACHE`` or ``~/.cache/emaki``."""
    env = os.environ.get("EMAKI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "emaki"
