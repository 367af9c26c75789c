"""Image files that carry their generation metadata (infotext), written safely and read defensively.

Writing: PNG keeps the infotext in a text chunk keyed ``parameters``; JPEG and WEBP keep it in the
EXIF ``UserComment`` tag as ``UNICODE\\0`` + UTF-16 big-endian, both exactly as A1111 writes them,
so every tool that reads A1111's PNG info reads ours. A file is encoded in memory, written to a
temporary file in the target folder, flushed to disk, and only then given its final name with a
hard link, which fails instead of replacing an existing file. Two writers, threads or processes,
therefore never clobber each other and no reader ever sees a half-written image. Where the file
system has no hard links we reserve the name with ``O_CREAT | O_EXCL`` and move the finished file
over the empty reservation with :func:`os.replace`.

Reading: every problem with a file a user hands us (missing, not an image, truncated, corrupt,
too many pixels) raises :class:`~emaki.errors.InfotextError` with one line naming the path.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from emaki.errors import EmakiError, InfotextError
from emaki.infotext import PARAM_PATTERN, Infotext, infotext_from_novelai, parse_infotext

__all__ = [
    "PARAMETERS_KEY",
    "decode_user_comment",
    "encode_user_comment",
    "filename_stem",
    "read_image",
    "read_infotext",
    "read_infotext_text",
    "save_jpeg",
    "save_png",
    "save_webp",
]

PARAMETERS_KEY = "parameters"
"""The PNG text key A1111 (and every reader of its images) uses for the infotext."""

_MAX_NAME_BYTES = 240  # 255-byte file-name limit of ext4/NTFS/APFS, less room for "-9999.png"
_MAX_SEQUENCE = 10_000
_JPEG_MAX_EXIF = 65_533  # bytes in one JPEG APP1 marker segment
_UNICODE_PREFIX = b"UNICODE\0"

# What Pillow raises for files it cannot read: OSError covers missing files, permissions and
# UnidentifiedImageError; SyntaxError is its "broken PNG"; ValueError its over-large text chunks.
_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


# ---------------------------------------------------------------------------------- file names

_EXTRA_NETWORK_TAG = re.compile(r"<[^<>]*>")  # <lora:name:0.6>, <hypernet:...>
_EMPHASIS_WEIGHT = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*(?=[)\]])")  # (word:1.2), [a:b:10]
# Characters Windows forbids in names (plus '#', as A1111), brackets of the prompt syntax and
# control characters: each becomes a space, so "cat/dog" gives "cat dog", not "catdog".
_UNSAFE_CHARS = re.compile(r'[\\/:*?"<>|#()\[\]{}\x00-\x1f\x7f]')


def filename_stem(seed: int, prompt: str, max_len: int = 128) -> str:
    """File name stem ``<seed>-<prompt words>``, like A1111's default ``[seed]-[prompt_spaces]``.

    The prompt is made readable and safe on Windows and Linux: extra-network tags (``<lora:...>``)
    and emphasis weights (``(word:1.2)`` → ``word``) are dropped, brackets and characters that are
    illegal in file names become spaces, whitespace is collapsed, empty comma-separated parts are
    removed, and the result is cut at a word boundary so that the stem is at most ``max_len``
    characters and at most 240 UTF-8 bytes (file systems limit names to 255 bytes, and CJK text
    takes three bytes a character). The seed is never cut; an empty prompt gives just the seed.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    text = _EXTRA_NETWORK_TAG.sub(" ", prompt)
    text = _EMPHASIS_WEIGHT.sub("", text)
    text = _UNSAFE_CHARS.sub(" ", text)
    parts = (" ".join(part.split()) for part in text.split(","))
    words = ", ".join(part for part in parts if part)
    prefix = f"{seed}-"
    words = _cut_at_word(words, max_len - len(prefix), _MAX_NAME_BYTES - len(prefix))
    return prefix + words if words else str(seed)


def _cut_at_word(text: str, max_chars: int, max_bytes: int) -> str:
    """``text`` shortened to the limits, at the last space when there is one, tidied at the end."""
    if max_chars <= 0 or max_bytes <= 0:
        return ""
    if len(text) <= max_chars and len(text.encode()) <= max_bytes:
        return text.rstrip(" .,")
    cut = text[:max_chars]
    while len(cut.encode()) > max_bytes:
        cut = cut[:-1]
    at_boundary = text[len(cut)] in " ," or cut.endswith((" ", ","))
    if not at_boundary and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" .,")  # Windows drops trailing dots and spaces from names


# ---------------------------------------------------------------------------------- writing


def save_png(
    image: Image.Image,
    folder: Path | str,
    stem: str,
    infotext: str | None,
    *,
    extra_text: Mapping[str, str] | None = None,
) -> Path:
    """Save ``image`` as ``folder/<stem>.png`` (or ``<stem>-1.png``, ``-2``... if taken); return it.

    The infotext goes into the ``parameters`` text chunk with Pillow's ``PngInfo.add_text``, which
    writes a tEXt chunk when the text is Latin-1 and an uncompressed iTXt (UTF-8) chunk otherwise;
    A1111 does the same and every reader we know reads both. ``extra_text`` adds more text chunks
    (keys: 1-79 Latin-1 characters, not ``parameters``). ``None`` writes no infotext. The folder is
    created if needed. Raises :class:`EmakiError` when the file cannot be written.
    """
    return _write_new_file(Path(folder), stem, ".png", png_bytes(image, infotext, extra_text))


def png_bytes(
    image: Image.Image, infotext: str | None, extra_text: Mapping[str, str] | None = None
) -> bytes:
    """``image`` encoded as PNG with the infotext in its ``parameters`` chunk (see save_png)."""
    pnginfo = PngImagePlugin.PngInfo()
    for key, value in (extra_text or {}).items():
        _check_png_keyword(key)
        if key == PARAMETERS_KEY:
            raise ValueError("give the infotext as `infotext`, not in extra_text")
        pnginfo.add_text(key, value)
    if infotext is not None:
        pnginfo.add_text(PARAMETERS_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def write_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` all at once: readers see the old file or the whole new one.

    Unlike :func:`save_png` this replaces an existing file of that name: for outputs whose name
    is fixed by a job, so that a job that runs again replaces its own files.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _write_temp_file(path.parent, data)
        try:
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise EmakiError(f"cannot write {_one_line(path)}: {reason}") from None
    return path


def decode_image(data: bytes, *, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode image bytes (PNG, JPEG, WebP...) refusing sizes over ``max_pixels``.

    The size comes from the header, before any pixel is decoded, so a decompression bomb costs
    nothing. Raises :class:`InfotextError` naming ``what`` for unreadable or oversized data.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise InfotextError(
                f"{what} is {image.width}x{image.height}, more than the {max_pixels} pixels allowed"
            )
        image.load()
        return image.copy()
    except InfotextError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InfotextError(
            f"{what} is larger than the {max_pixels} pixels allowed (a decompression bomb?)"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InfotextError(f"{what} is not a readable image ({exc})") from None


def save_jpeg(
    image: Image.Image, folder: Path | str, stem: str, infotext: str | None, *, quality: int = 80
) -> Path:
    """Save ``image`` as ``folder/<stem>.jpg`` (never overwriting) with the infotext in EXIF.

    The infotext is stored like A1111 stores it (piexif's ``UserComment.dump(..., "unicode")``):
    ``UNICODE\\0`` + UTF-16 big-endian in a big-endian EXIF block. JPEG has no alpha, so other modes
    are converted to RGB. ``quality`` defaults to A1111's 80. Raises :class:`EmakiError` when the
    infotext does not fit the 64 KiB EXIF segment (about 32,000 characters) or the file cannot be
    written.
    """
    exif = _exif_with_user_comment(infotext)
    if len(exif) > _JPEG_MAX_EXIF:
        raise EmakiError(
            f"infotext of {len(infotext or '')} characters is too long for JPEG EXIF; save as PNG"
        )
    rgb = image if image.mode in ("RGB", "L", "CMYK") else image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality, exif=exif)
    return _write_new_file(Path(folder), stem, ".jpg", buffer.getvalue())


def save_webp(
    image: Image.Image,
    folder: Path | str,
    stem: str,
    infotext: str | None,
    *,
    quality: int = 80,
    lossless: bool = False,
) -> Path:
    """Save ``image`` as ``folder/<stem>.webp`` (never overwriting) with the infotext in EXIF.

    Same EXIF layout as :func:`save_jpeg`. Modes WebP cannot hold are converted to RGB(A).
    """
    exif = _exif_with_user_comment(infotext)
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=quality, lossless=lossless, exif=exif)
    return _write_new_file(Path(folder), stem, ".webp", buffer.getvalue())


def encode_user_comment(text: str) -> bytes:
    """EXIF ``UserComment`` bytes for ``text`` as A1111 writes them: ``UNICODE\\0`` + UTF-16-BE."""
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def _exif_with_user_comment(infotext: str | None) -> bytes:
    if infotext is None:
        return b""
    exif = Image.Exif()
    exif.endian = ">"  # big-endian, as piexif writes it, so the UTF-16-BE text agrees with it
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = encode_user_comment(infotext)
    return exif.tobytes()


def _check_png_keyword(key: str) -> None:
    # PNG spec 11.3.4.2: 1-79 Latin-1 printable characters, no leading/trailing/double spaces.
    try:
        raw = key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text key {key!r} is not Latin-1") from None
    printable = all(32 <= b <= 126 or b >= 161 for b in raw)
    if not 1 <= len(raw) <= 79 or not printable or key != key.strip() or "  " in key:
        raise ValueError(f"{key!r} is not a valid PNG text key")


def _check_stem(stem: str) -> None:
    if not stem or stem in (".", "..") or any(c in stem for c in "/\\\0"):
        raise ValueError(f"file name stem {stem!r} is empty or holds a path separator")


def _write_new_file(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` to a new file ``folder/<stem><suffix>`` (``-1``, ``-2``... if taken)."""
    _check_stem(stem)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp = _write_temp_file(folder, data)
        try:
            return _claim_free_name(temp, folder, stem, suffix)
        finally:
            temp.unlink(missing_ok=True)  # after a link the temp name is left; after a move not
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise EmakiError(f"cannot save {stem}{suffix} in {_one_line(folder)}: {reason}") from None


def _write_temp_file(folder: Path, data: bytes) -> Path:
    # os.open with mode 0o666 lets the umask decide the final permissions (mkstemp would give 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = folder / f".emaki-{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # the data is on disk before the name is
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp


def _claim_free_name(temp: Path, folder: Path, stem: str, suffix: str) -> Path:
    """Give the finished ``temp`` file the first free name; the claim is atomic, never a clobber."""
    use_links = True
    for number in range(_MAX_SEQUENCE):
        target = folder / (f"{stem}{suffix}" if number == 0 else f"{stem}-{number}{suffix}")
        if use_links:
            try:
                os.link(temp, target)  # fails if target exists, whoever created it when
                return target
            except FileExistsError:
                continue
            except OSError:
                use_links = False  # no hard links here (FAT, some network shares): reserve + move
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        os.replace(temp, target)  # replaces only our own empty reservation
        return target
    raise EmakiError(
        f"no free file name for {stem}{suffix} in {folder} after {_MAX_SEQUENCE} tries"
    )


# ---------------------------------------------------------------------------------- reading


def read_image(path: Path | str) -> Image.Image:
    """Open and fully decode the image at ``path`` (the first frame of an animation).

    Decoding everything up front means a truncated or corrupt file fails here, with
    :class:`InfotextError` naming the path, rather than later in a pipeline. Images with more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused as possible decompression bombs (Pillow only
    warns below twice that limit). The returned image is detached from the file (no open handle);
    its ``format`` is therefore ``None``, while ``info`` is kept.
    """
    path = Path(path)
    try:
        with _open_checked(path) as image:
            image.load()
            return image.copy()
    except _READ_ERRORS as exc:
        raise InfotextError(_read_failure(path, exc)) from None


def read_infotext_text(path: Path | str) -> str | None:
    """The infotext text stored in the image at ``path``, or ``None`` when it carries none.

    Looks, in this order, at: NovelAI metadata (``Software: NovelAI`` with ``Description`` and
    ``Comment``; converted, see :func:`~emaki.infotext.infotext_from_novelai`), the PNG
    ``parameters`` text (tEXt, zTXt or iTXt), the EXIF ``UserComment`` (JPEG, WEBP, PNG eXIf), and
    a GIF/JPEG comment if it holds a parameters line. Pixels are not decoded when the metadata sits
    before the image data, as in A1111's and our files, so a file truncated inside its pixel data
    still gives its infotext; :func:`read_image` is the integrity check. Raises
    :class:`InfotextError` (one line naming the path) for missing, unreadable or corrupt files.
    """
    path = Path(path)
    try:
        with _open_checked(path) as image:
            return stored_infotext(image)
    except InfotextError as exc:
        raise InfotextError(f"cannot read {_one_line(path)}: {exc}") from None
    except _READ_ERRORS as exc:
        raise InfotextError(_read_failure(path, exc)) from None


def read_infotext(path: Path | str) -> Infotext | None:
    """The parsed infotext of the image at ``path``, or ``None``; see :func:`read_infotext_text`."""
    text = read_infotext_text(path)
    return None if text is None else parse_infotext(text)


def _open_checked(path: Path) -> Image.Image:
    # Pillow warns for MAX_IMAGE_PIXELS < pixels <= 2 * MAX_IMAGE_PIXELS; we refuse those too. The
    # explicit size check stands even if another thread's catch_warnings resets the filter
    # (warning filters are process-wide before Python 3.14).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"image size ({image.width * image.height} pixels) exceeds limit of {limit} pixels"
        )
    return image


def stored_infotext(image: Image.Image) -> str | None:
    info = image.info
    if (
        isinstance(image, PngImagePlugin.PngImageFile)
        and PARAMETERS_KEY not in info
        and not _is_novelai(info)
    ):
        # Text chunks after the image data are read only when the pixels are decoded.
        info = {**info, **image.text}

    if _is_novelai(info):
        novelai = infotext_from_novelai(
            str(info.get("Description", "")), str(info["Comment"]), image.width, image.height
        )
        return novelai.to_text()

    parameters = info.get(PARAMETERS_KEY)
    if parameters is not None:
        return _as_text(parameters)

    if "exif" in info:
        exif = image.getexif()
        raw = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        if raw is not None:
            text = raw if isinstance(raw, str) else decode_user_comment(raw, exif.endian or ">")
            text = text.rstrip("\0")
            if text.strip():
                return text

    comment = info.get("comment")
    if comment is not None:
        text = _as_text(comment)
        if len(PARAM_PATTERN.findall(text.strip().split("\n")[-1])) >= 3:
            return text
    return None


def _is_novelai(info: Mapping[str, object]) -> bool:
    return info.get("Software") == "NovelAI" and "Comment" in info


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def decode_user_comment(data: bytes, byte_order: str = ">") -> str:
    """Decode an EXIF ``UserComment`` (8-byte character-code prefix, then the text).

    ``UNICODE`` text is UTF-16. A1111 (through piexif) always writes it big-endian; the EXIF
    standard says the byte order of the EXIF block (``byte_order``: ``">"`` or ``"<"``) and some
    tools follow that. We honour a byte-order mark, else tell the order from where the zero bytes
    of Latin text fall, else use ``byte_order``. ``ASCII`` and undefined text are read as UTF-8 (the
    form tools actually write), ``JIS`` as Shift-JIS; anything undecodable is replaced, not raised.
    """
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        return _decode_utf16(body, byte_order)
    if prefix == b"JIS\0\0\0\0\0":
        return body.decode("shift_jis", errors="replace")
    if prefix in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace")
    return data.decode("utf-8", errors="replace")  # no code prefix: take it as text, as A1111 does


def _decode_utf16(body: bytes, byte_order: str) -> str:
    body = body[: len(body) // 2 * 2]
    if body.startswith(b"\xfe\xff"):
        return body[2:].decode("utf-16-be", errors="replace")
    if body.startswith(b"\xff\xfe"):
        return body[2:].decode("utf-16-le", errors="replace")
    zeros_first, zeros_second = body[0::2].count(0), body[1::2].count(0)
    if zeros_first != zeros_second:
        big_endian = zeros_first > zeros_second
    else:
        big_endian = byte_order != "<"
    return body.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")


def _read_failure(path: Path, exc: BaseException) -> str:
    """One line saying why ``path`` could not be read."""
    if isinstance(exc, FileNotFoundError):
        reason = "no such file"
    elif isinstance(exc, IsADirectoryError):
        reason = "it is a directory"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image file (or a format Pillow cannot read)"
    elif isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        reason = f"refused as a possible decompression bomb: {exc} (see PIL.Image.MAX_IMAGE_PIXELS)"
    else:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        reason = f"corrupt or truncated image ({detail})"
    return f"cannot read {_one_line(path)}: {reason}"


def _one_line(path: Path) -> str:
    """``path`` for a one-line message (a file name may hold a line break)."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")
