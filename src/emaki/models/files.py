"""Reading and writing tensor files safely: safetensors first, pickles only on explicit opt-in.

Policy (see ``docs/reference/reliability.md`` §1): a pickled checkpoint (``.ckpt``, ``.pt``,
``.pth``, ``.bin``, or any file that starts like a pickle or a torch zip archive) can run code when
unpickled, so it is refused with :class:`~emaki.errors.PickleRefusedError` unless the caller
passes ``allow_pickle=True``; even then it is read only with ``torch.load(weights_only=True)``,
with no fallback to a full unpickler. Every failure becomes a one-line
:class:`~emaki.errors.ModelLoadError` naming the file.

Writes go to a temporary file in the destination folder and are moved into place with
``os.replace``: a crash leaves no half-written model, and writing over a memory-mapped source
never truncates it under its reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from emaki.errors import ModelLoadError, ModelSaveError, PickleRefusedError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch zip archive, raw pickle (protocol >= 2)
_HASH_CHUNK = 1 << 20


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def looks_pickled(path: Path) -> bool:
    """True when ``path`` has a pickle suffix or starts with pickle / torch-zip magic bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return False
    with path.open("rb") as handle:
        head = handle.read(4)
    return any(head.startswith(magic) for magic in _PICKLE_MAGIC)


def read_tensors(
    path: Path, *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a weight file and its safetensors metadata (empty for pickles)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if looks_pickled(path):
        return read_pickle(path, allow_pickle=allow_pickle), {}
    return read_safetensors(path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file; a corrupt file is a ModelLoadError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError, OSError, ValueError: all mean "unreadable"
        raise ModelLoadError(
            f"{path.name}: not a readable safetensors file ({one_line(exc)})"
        ) from None
    if not tensors:
        raise ModelLoadError(f"{path.name}: the file holds no tensors")
    return tensors, metadata


def read_pickle(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a pickled checkpoint, only with the opt-in and only via ``weights_only=True``."""
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path.name} is a pickled checkpoint, which can run code when loaded; convert it to "
            "safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for bad zips
        raise ModelLoadError(
            f"{path.name}: cannot be read with torch.load(weights_only=True) ({one_line(exc)})"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"{path.name}: not a checkpoint (holds a {type(loaded).__name__})")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path.name}: not a checkpoint (no tensors in it)")
    return tensors


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing or malformed file is a one-line ModelLoadError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# --- hashes ----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: Path) -> str:
    """A1111's (new-style) short model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path)[:10]


def files_hash(files: Iterable[tuple[str, Path]]) -> str:
    """Short hash of several weight files: SHA-256 over (name, NUL, bytes) in sorted name order."""
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Short hash of in-memory tensors: SHA-256 over (key, dtype, shape, bytes), keys sorted."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


# --- atomic writes ---------------------------------------------------------------------------


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse to write over an existing file or folder unless ``overwrite`` is set."""
    if path.exists() and not overwrite:
        raise ModelSaveError(f"{path} already exists (choose another name, or pass --overwrite)")
    if not path.parent.is_dir():
        raise ModelSaveError(f"{path.parent}: no such folder")


def _file_mode() -> int:
    """The permissions a new file gets under the current umask (safetensors writes 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write_file(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Call ``write(temp)`` for a temporary sibling of ``path``, then move it into place."""
    check_destination(path, overwrite)
    temp = _temp_sibling(path)
    try:
        write(temp)
        os.chmod(temp, _file_mode())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Fill a temporary sibling folder with ``write(temp)``, then rename it to ``path``.

    An existing destination (with ``overwrite``) is first renamed aside and deleted only after the
    new folder is in place, so a failure at any point leaves either the old or the new folder.
    """
    check_destination(path, overwrite)
    temp = _temp_sibling(path)
    temp.mkdir()
    try:
        write(temp)
        mode = _file_mode()
        for file in temp.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = _temp_sibling(path) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(temp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return path
