"""The models folder: an A1111-like layout of model files under one root, and cached file hashes.

Layout (folders are created on demand by :func:`kind_dir`; listing never creates anything)::

    <root>/checkpoints/    SD 1.x/2.x single files (.safetensors, .ckpt, ...) and diffusers
                           folders (a folder holding model_index.json is one entry)
    <root>/vae/            VAE files
    <root>/lora/           LoRA / LyCORIS files (A1111 calls the folder models/Lora)
    <root>/embeddings/     textual-inversion embeddings
    <root>/hypernetworks/  hypernetworks
    <root>/controlnet/     ControlNets: original single files and diffusers folders (a folder
                           holding config.json is one entry)
    <root>/.hashes.json    SHA-256 cache (see :func:`sha256_cached`)

The root is ``$EMAKI_MODELS`` if set, else ``$EMAKI_HOME/models``, else
``~/.local/share/emaki/models``.

Names: a model's name is its path relative to its kind folder, with ``/`` separators and without
the file suffix (``lora/styles/ink.safetensors`` is ``styles/ink`` of kind ``lora``). Like A1111's
``<lora:ink:1>``, :func:`find_model` accepts the exact name, the name with its suffix, or a bare
file stem when exactly one model has it. When several files share a name (``ink.safetensors`` and
``ink.ckpt``), the safetensors one wins. Files and folders whose name starts with ``.`` are
ignored (temporary files of atomic writes, the hash cache).

Confinement: names may come from HTTP clients, so a name with ``..``, a NUL byte or an absolute
path is refused, and an entry whose real path (after following symlinks) lies outside both the
root and its kind folder is neither listed nor found. A kind folder that is itself a symlink (say
to a big disk) is fine; a single file symlinked from elsewhere is not. Listing follows symlinked
folders once (loops are cut) and skips anything it cannot read.

Hashes: :func:`short_hash12` is the first 12 hex digits of a file's SHA-256 (what A1111 shows for
LoRAs and embeddings in ``Lora hashes``/``TI hashes``; checkpoints show the first 10). Full
digests of files inside the root are cached in ``<root>/.hashes.json`` keyed by the file's path
relative to the root, its size and its ``st_mtime_ns``; a changed file is hashed again (files
outside the root are hashed every time).
The cache is rewritten atomically, and an unreadable or malformed cache is ignored. A diffusers
folder's digest is SHA-256 over (relative path, NUL, bytes) of its weight files in sorted order.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from emaki.errors import ModelLoadError
from emaki.models.files import atomic_write_file, sha256_file

KINDS = ("checkpoints", "vae", "lora", "embeddings", "hypernetworks", "controlnet")
#: Suffixes listed for every kind, in order of preference when two files share a name.
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: Weight files hashed for a diffusers folder.
_FOLDER_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth"})
DIFFUSERS_INDEX = "model_index.json"
#: Kinds whose diffusers folders are single entries, by the file that marks such a folder.
FOLDER_MARKERS = {"checkpoints": DIFFUSERS_INDEX, "controlnet": "config.json"}
HASH_CACHE = ".hashes.json"
_CACHE_VERSION = 1
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    """One model of the folder: ``name`` is relative to the kind folder, '/'-separated, no suffix."""

    kind: str
    name: str
    path: Path
    size: int


# --- roots -----------------------------------------------------------------------------------


def models_root() -> Path:
    """``$EMAKI_MODELS``, else ``$EMAKI_HOME/models``, else ``~/.local/share/emaki/models``."""
    if explicit := os.environ.get("EMAKI_MODELS"):
        return Path(explicit).expanduser()
    if home := os.environ.get("EMAKI_HOME"):
        return Path(home).expanduser() / "models"
    return Path.home() / ".local" / "share" / "emaki" / "models"


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else a one-line ModelLoadError listing them."""
    if kind not in KINDS:
        raise ModelLoadError(f"unknown model kind {kind!r} (kinds: {', '.join(KINDS)})")
    return kind


def kind_dir(kind: str, root: Path | None = None, *, create: bool = False) -> Path:
    """The folder of ``kind`` under ``root`` (default :func:`models_root`), made if ``create``."""
    folder = (root if root is not None else models_root()) / check_kind(kind)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- listing ---------------------------------------------------------------------------------


def list_models(kind: str, root: Path | None = None) -> list[ModelEntry]:
    """Every model of ``kind`` under ``root``, sorted by name (then by suffix preference)."""
    root = root if root is not None else models_root()
    folder = kind_dir(kind, root)
    if not folder.is_dir():
        return []
    bases = _allowed_bases(root, kind)
    entries = [
        entry
        for path in _walk(folder, kind, bases)
        if (entry := _entry(kind, folder, path, bases)) is not None
    ]
    return sorted(entries, key=lambda e: (e.name, _suffix_rank(e.path), e.path.as_posix()))


def _allowed_bases(root: Path, kind: str) -> tuple[str, ...]:
    return tuple({os.path.realpath(root), os.path.realpath(root / kind)})


def _inside(path: Path, bases: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == base or real.startswith(base.rstrip(os.sep) + os.sep) for base in bases)


def _walk(folder: Path, kind: str, bases: tuple[str, ...]) -> Iterator[Path]:
    """Model files (and, for checkpoints, diffusers folders) below ``folder``; never raises.

    Folders whose real path is outside ``bases`` are not entered (a symlink to ``/`` costs nothing).
    """
    seen: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue  # a symlink loop, or a folder reachable twice
        seen.add(real)
        try:
            children = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            path = Path(child.path)
            try:
                is_dir = child.is_dir()  # follows symlinks; False for broken ones
                is_file = not is_dir and child.is_file()
            except OSError:
                continue
            if is_dir and kind in FOLDER_MARKERS and (path / FOLDER_MARKERS[kind]).is_file():
                yield path
            elif is_dir and _inside(path, bases):
                stack.append(path)
            elif is_file and path.suffix.lower() in MODEL_SUFFIXES:
                yield path


def _entry(kind: str, folder: Path, path: Path, bases: tuple[str, ...]) -> ModelEntry | None:
    try:
        if not _inside(path, bases):
            return None
        size = _folder_size(path) if path.is_dir() else path.stat().st_size
    except (OSError, RuntimeError, ValueError):
        return None
    relative = path.relative_to(folder).as_posix()
    name = relative if path.is_dir() else relative[: -len(path.suffix)]
    return ModelEntry(kind=kind, name=name, path=path, size=size)


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in _folder_files(folder))


def _folder_files(folder: Path) -> list[Path]:
    """Regular files below a diffusers folder (symlinked files count; hidden ones do not)."""
    files = []
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(current) / name
            if not name.startswith(".") and path.is_file():
                files.append(path)
    return files


def _suffix_rank(path: Path) -> int:
    suffix = path.suffix.lower()
    return MODEL_SUFFIXES.index(suffix) if suffix in MODEL_SUFFIXES else -1


# --- lookup ----------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Refuse names that could leave the models folder: ``..``, NUL, absolute or empty paths."""
    if not name or "\0" in name:
        raise ModelLoadError("refused model name: empty or containing a NUL byte")
    if ".." in name:
        raise ModelLoadError(f"refused model name {name!r}: '..' is not allowed")
    if (
        name.startswith(("/", "\\"))
        or Path(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ModelLoadError(f"refused model name {name!r}: absolute paths are not allowed")
    return name


def find_model(kind: str, name: str, root: Path | None = None) -> ModelEntry:
    """The model of ``kind`` called ``name``: exact name (± suffix), else a unique file stem."""
    check_kind(kind)
    check_name(name)
    wanted = name.replace("\\", "/").strip("/")
    entries = list_models(kind, root)
    exact = [e for e in entries if wanted in (e.name, _relative(e, kind, root))]
    if exact:
        return exact[0]  # sorted: the preferred suffix first
    by_stem = [e for e in entries if e.name.rsplit("/", 1)[-1] == wanted]
    names = sorted({e.name for e in by_stem})
    if len(names) == 1:
        return by_stem[0]
    if len(names) > 1:
        raise ModelLoadError(
            f"{kind} model {name!r} is ambiguous ({', '.join(names[:5])}): give the full name"
        )
    raise ModelLoadError(f"no {kind} model named {name!r}{_suggestions(wanted, entries, kind)}")


def _relative(entry: ModelEntry, kind: str, root: Path | None) -> str:
    folder = kind_dir(kind, root)
    return entry.path.relative_to(folder).as_posix()


def _suggestions(wanted: str, entries: list[ModelEntry], kind: str) -> str:
    if not entries:
        return f" (the {kind} folder is empty)"
    names = sorted({e.name for e in entries})

    def score(candidate: str) -> float:
        stem = candidate.rsplit("/", 1)[-1]
        return max(
            difflib.SequenceMatcher(None, wanted.lower(), candidate.lower()).ratio(),
            difflib.SequenceMatcher(None, wanted.lower(), stem.lower()).ratio(),
        )

    ranked = sorted(names, key=lambda n: (-score(n), n))
    close = [n for n in ranked if score(n) >= 0.4][:5]
    if not close:
        return f" ({len(names)} {kind} models, none with a similar name)"
    return f" (closest: {', '.join(close)})"


# --- hashes ----------------------------------------------------------------------------------


def short_hash12(path: Path, root: Path | None = None) -> str:
    """First 12 hex digits of the SHA-256 of a file (or diffusers folder), cached under ``root``."""
    return sha256_cached(path, root)[:12]


def sha256_cached(path: Path, root: Path | None = None) -> str:
    """Full hex SHA-256 of ``path``, from ``<root>/.hashes.json`` when size and mtime still match."""
    root = root if root is not None else models_root()
    path = Path(path)
    try:
        stamp = _stamp(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    key = _cache_key(path, root)
    cache = _read_cache(root) if key is not None else {}
    cached = cache.get(key) if key is not None else None
    if isinstance(cached, dict) and [cached.get("size"), cached.get("mtime_ns")] == list(stamp):
        digest = cached.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    try:
        digest = _folder_sha256(path) if path.is_dir() else sha256_file(path)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if key is not None:
        cache[key] = {"size": stamp[0], "mtime_ns": stamp[1], "sha256": digest}
        _write_cache(root, cache)
    return digest


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file; for a folder, of its files (total size, newest mtime)."""
    if not path.is_dir():
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    stats = [file.stat() for file in _folder_files(path)]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def _folder_sha256(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file in _folder_files(folder):
        if file.suffix.lower() not in _FOLDER_WEIGHT_SUFFIXES:
            continue
        digest.update(file.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _cache_key(path: Path, root: Path) -> str | None:
    """The path relative to the root, or None for a path outside it (not cached)."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return None


def _read_cache(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / HASH_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("sha256")
    return dict(entries) if isinstance(entries, dict) else {}


def _write_cache(root: Path, entries: dict[str, object]) -> None:
    """Rewrite the cache atomically, dropping entries of files that no longer exist."""
    if not root.is_dir():
        return
    kept = {k: v for k, v in entries.items() if not _vanished(root, k)}
    text = json.dumps({"version": _CACHE_VERSION, "sha256": kept}, indent=1, sort_keys=True)
    with contextlib.suppress(OSError):  # a read-only models folder: hashing works, uncached
        atomic_write_file(
            root / HASH_CACHE,
            lambda temp: temp.write_text(text + "\n", encoding="utf-8"),
            overwrite=True,
        )


def _vanished(root: Path, key: str) -> bool:
    return Path(key).is_absolute() or ".." in key or not (root / key).exists()
