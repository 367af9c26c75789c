"""Image files with infotext: written by emaki and read back by plain Pillow, files built by hand
(JPEG EXIF as piexif writes it, NovelAI PNGs), no-overwrite under races, and clean errors."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin, features

from emaki import imageio
from emaki.errors import EmakiError, InfotextError
from emaki.imageio import (
    decode_user_comment,
    filename_stem,
    read_image,
    read_infotext,
    read_infotext_text,
    save_jpeg,
    save_png,
    save_webp,
)
from emaki.infotext import Infotext, parse_infotext

FIXTURES = Path(__file__).parent / "fixtures" / "infotext"
INFOTEXT = (FIXTURES / "a1111_multiline_quoted.txt").read_text(encoding="utf-8").strip()
UNICODE_INFOTEXT = (
    "桜の木の下の猫, (水彩:1.2), émoji 🎨\n"
    "Negative prompt: ぼやけ\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x48"
)


def small_image(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata(
        [
            ((x * 4) % 256, (y * 5) % 256, (x * y) % 256)
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
    return image.convert(mode)


def noisy_png_bytes(text: str, size: int = 256) -> bytes:
    """A PNG whose pixel data is large and incompressible, with the infotext before it."""
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_chunk_types(data: bytes) -> list[bytes]:
    """Chunk types of a PNG, read by hand (an independent check of what was written)."""
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8] + b":" + data[pos + 8 : pos + 8 + min(length, 10)])
        pos += 12 + length
    return types


# --------------------------------------------------------------------------------- PNG writing


def test_save_png_read_back_with_plain_pillow(tmp_path: Path) -> None:
    path = save_png(small_image(), tmp_path / "out", "1-a cat", INFOTEXT)
    assert path == tmp_path / "out" / "1-a cat.png"
    with Image.open(path) as image:
        assert image.text["parameters"] == INFOTEXT
        assert image.size == (64, 48)
        assert image.getpixel((3, 2)) == (12, 10, 6)
    assert read_infotext(path) == parse_infotext(INFOTEXT)
    assert read_infotext_text(path) == INFOTEXT


def test_latin1_text_is_tEXt_and_unicode_is_iTXt_before_image_data(tmp_path: Path) -> None:
    latin = png_chunk_types(save_png(small_image(), tmp_path, "latin", INFOTEXT).read_bytes())
    assert latin.index(b"tEXt:parameters") < latin.index(
        next(t for t in latin if t.startswith(b"IDAT"))
    )
    uni_path = save_png(small_image(), tmp_path, "uni", UNICODE_INFOTEXT)
    uni = png_chunk_types(uni_path.read_bytes())
    assert b"iTXt:parameters" in uni
    with Image.open(uni_path) as image:
        assert image.text["parameters"] == UNICODE_INFOTEXT
    assert read_infotext(uni_path).prompt == "桜の木の下の猫, (水彩:1.2), émoji 🎨"


def test_extra_text_and_no_infotext(tmp_path: Path) -> None:
    path = save_png(small_image("RGBA"), tmp_path, "x", None, extra_text={"Software": "emaki 0.1"})
    with Image.open(path) as image:
        assert image.text == {"Software": "emaki 0.1"}
        assert image.mode == "RGBA"
    assert read_infotext(path) is None
    with pytest.raises(ValueError):
        save_png(small_image(), tmp_path, "x", "t", extra_text={"parameters": "no"})
    with pytest.raises(ValueError):
        save_png(small_image(), tmp_path, "x", "t", extra_text={"bad key ": "v"})


@pytest.mark.parametrize("stem", ["", "a/b", "..", "a\\b"])
def test_bad_stems_are_refused(tmp_path: Path, stem: str) -> None:
    with pytest.raises(ValueError):
        save_png(small_image(), tmp_path, stem, "t")


def test_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "5-cat.png").write_bytes(b"precious")
    (tmp_path / "5-cat-1.png").write_bytes(b"also precious")
    first = save_png(small_image(), tmp_path, "5-cat", "one")
    second = save_png(small_image(), tmp_path, "5-cat", "two")
    assert (first.name, second.name) == ("5-cat-2.png", "5-cat-3.png")
    assert (tmp_path / "5-cat.png").read_bytes() == b"precious"
    assert (tmp_path / "5-cat-1.png").read_bytes() == b"also precious"
    assert read_infotext_text(first) == "one" and read_infotext_text(second) == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "5-cat-1.png",
        "5-cat-2.png",
        "5-cat-3.png",
        "5-cat.png",
    ]  # no temporary files left


def _race(tmp_path: Path, writers: int, per_writer: int) -> list[Path]:
    barrier = threading.Barrier(writers)
    results: list[Path] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(per_writer):
                path = save_png(small_image(size=(16, 16)), tmp_path, "7-race", f"w{worker} i{i}")
                with lock:
                    results.append(path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    return results


def test_racing_writers_never_clobber(tmp_path: Path) -> None:
    paths = _race(tmp_path, writers=8, per_writer=6)
    assert len(set(paths)) == 48
    texts = {read_infotext_text(p) for p in paths}
    assert texts == {f"w{w} i{i}" for w in range(8) for i in range(6)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_without_hard_links_reserve_and_replace(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(imageio.os, "link", no_links)
    (tmp_path / "9-dog.png").write_bytes(b"precious")
    paths = _race(tmp_path, writers=4, per_writer=3)
    assert len(set(paths)) == 12
    assert (tmp_path / "9-dog.png").read_bytes() == b"precious"
    assert {read_infotext_text(p) for p in paths} == {
        f"w{w} i{i}" for w in range(4) for i in range(3)
    }


def test_unwritable_folder_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(EmakiError) as caught:
        save_png(small_image(), blocker / "sub", "s", "t")
    assert "\n" not in str(caught.value) and str(blocker / "sub") in str(caught.value)


# --------------------------------------------------------------------------------- EXIF


def tiff_user_comment(payload: bytes, byte_order: bytes = b"MM") -> bytes:
    """An EXIF block holding only a UserComment, packed by hand as piexif.dump lays it out:
    IFD0 with one ExifIFD pointer, then the Exif IFD with one UNDEFINED UserComment entry."""
    e = ">" if byte_order == b"MM" else "<"
    header = byte_order + struct.pack(e + "HI", 42, 8)
    ifd0 = (
        struct.pack(e + "H", 1)
        + struct.pack(e + "HHII", 0x8769, 4, 1, 26)
        + struct.pack(e + "I", 0)
    )
    exif_ifd = (
        struct.pack(e + "H", 1)
        + struct.pack(e + "HHII", 0x9286, 7, len(payload), 44)
        + struct.pack(e + "I", 0)
    )
    return b"Exif\0\0" + header + ifd0 + exif_ifd + payload


def jpeg_with_app1(exif: bytes) -> bytes:
    """A JPEG with the EXIF APP1 segment spliced in after SOI, as piexif.insert does."""
    buffer = io.BytesIO()
    small_image().save(buffer, format="JPEG")
    plain = buffer.getvalue()
    segment = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return plain[:2] + segment + plain[2:]


@pytest.mark.parametrize("text", [INFOTEXT, UNICODE_INFOTEXT])
def test_jpeg_user_comment_as_a1111_writes_it(tmp_path: Path, text: str) -> None:
    payload = b"UNICODE\0" + text.encode("utf-16-be")
    path = tmp_path / "a1111.jpg"
    path.write_bytes(jpeg_with_app1(tiff_user_comment(payload)))
    assert read_infotext_text(path) == text
    assert read_infotext(path) == parse_infotext(text)


def test_jpeg_user_comment_little_endian_tools(tmp_path: Path) -> None:
    # CJK only: no zero bytes to tell the order, so the EXIF block's own order decides.
    text = "桜の木の下の猫"
    path = tmp_path / "le.jpg"
    path.write_bytes(
        jpeg_with_app1(tiff_user_comment(b"UNICODE\0" + text.encode("utf-16-le"), b"II"))
    )
    assert read_infotext_text(path) == text


def test_decode_user_comment_variants() -> None:
    assert decode_user_comment(b"ASCII\0\0\0Steps: 20") == "Steps: 20"
    assert decode_user_comment(b"UNICODE\0" + "a, b".encode("utf-16-le"), ">") == "a, b"
    assert decode_user_comment(b"UNICODE\0" + "a, b".encode("utf-16-be"), "<") == "a, b"
    assert decode_user_comment(b"UNICODE\0\xfe\xff\x00h\x00i") == "hi"
    assert decode_user_comment(b"no prefix here") == "no prefix here"


def test_save_jpeg_and_webp_read_back(tmp_path: Path) -> None:
    jpg = save_jpeg(small_image("RGBA"), tmp_path, "3-j", UNICODE_INFOTEXT)
    with Image.open(jpg) as image:  # Pillow as an independent reader of the EXIF tag
        raw = image.getexif().get_ifd(0x8769)[0x9286]
        assert raw == b"UNICODE\0" + UNICODE_INFOTEXT.encode("utf-16-be")
        assert image.getexif().endian == ">"
    assert read_infotext_text(jpg) == UNICODE_INFOTEXT
    if features.check("webp"):
        webp = save_webp(small_image("LA"), tmp_path, "3-w", INFOTEXT)
        assert webp.suffix == ".webp"
        assert read_infotext_text(webp) == INFOTEXT


def test_jpeg_without_metadata_and_too_long(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    small_image().save(path, quality=90)
    assert read_infotext(path) is None
    with pytest.raises(EmakiError, match="too long for JPEG"):
        save_jpeg(small_image(), tmp_path, "long", "x" * 40_000)
    assert not list(tmp_path.glob("long*"))


def test_jpeg_comment_used_only_if_it_holds_parameters(tmp_path: Path) -> None:
    camera = tmp_path / "camera.jpg"
    small_image().save(camera, comment=b"CREATOR: gd-jpeg v1.0, quality = 90")
    assert read_infotext(camera) is None
    tool = tmp_path / "tool.jpg"
    small_image().save(tool, comment=INFOTEXT.encode())
    assert read_infotext_text(tool) == INFOTEXT


# --------------------------------------------------------------------------------- NovelAI


def test_novelai_png(tmp_path: Path) -> None:
    comment = (FIXTURES / "novelai_comment.json").read_text(encoding="utf-8")
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "AI generated image")
    info.add_text("Description", "1girl, {silver hair}, smile")
    info.add_text("Software", "NovelAI")
    info.add_text("Source", "NovelAI Diffusion V3 7BCCAA2C")
    info.add_text("Comment", comment)
    path = tmp_path / "nai.png"
    small_image(size=(83, 121)).save(path, pnginfo=info)
    uc = json.loads(comment)["uc"]
    assert read_infotext(path) == Infotext(
        "1girl, {silver hair}, smile",
        uc,
        {
            "Steps": "28",
            "Sampler": "DPM++ 2S a",
            "Schedule type": "Karras",
            "CFG scale": "5",
            "Seed": "2857395815",
            "Size": "83x121",  # from the image, as A1111 does, not the JSON's 832x1216
            "Size-1": "83",
            "Size-2": "121",
            "Clip skip": "2",
            "ENSD": "31337",
        },
    )


def test_novelai_png_with_broken_comment(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "NovelAI")
    info.add_text("Comment", "{broken")
    path = tmp_path / "nai.png"
    small_image().save(path, pnginfo=info)
    with pytest.raises(InfotextError) as caught:
        read_infotext(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------- PNG details


def test_parameters_after_image_data_and_compressed(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXT, zip=True)  # zTXt
    path = tmp_path / "z.png"
    small_image().save(path, pnginfo=info)
    assert read_infotext_text(path) == INFOTEXT

    # Move the text chunk behind IDAT, as some tools write it.
    data = path.read_bytes()
    start = data.index(b"zTXt") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    chunk = data[start : start + 12 + length]
    rest = data[:start] + data[start + 12 + length :]
    iend = rest.index(b"IEND") - 4
    late = tmp_path / "late.png"
    late.write_bytes(rest[:iend] + chunk + rest[iend:])
    assert read_infotext_text(late) == INFOTEXT


def test_plain_png_has_no_infotext(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    small_image().save(path)
    assert read_infotext(path) is None


# --------------------------------------------------------------------------------- errors


def assert_one_line_naming(caught: pytest.ExceptionInfo, path: Path, reason: str) -> None:
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert reason in message


@pytest.mark.parametrize("reader", [read_infotext, read_image])
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not an image"),
        (b"this is not an image at all\n" * 10, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
        (b"\xff\xd8\xff\xe1\x00\x10Exif\0\0MM\x00", "truncated"),
    ],
)
def test_corrupt_files(tmp_path: Path, reader, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InfotextError) as caught:
        reader(path)
    assert_one_line_naming(caught, path, reason)


@pytest.mark.parametrize("reader", [read_infotext, read_image])
def test_missing_file_and_directory(tmp_path: Path, reader) -> None:
    with pytest.raises(InfotextError) as caught:
        reader(tmp_path / "nope.png")
    assert_one_line_naming(caught, tmp_path / "nope.png", "no such file")
    with pytest.raises(InfotextError) as caught:
        reader(tmp_path)
    assert_one_line_naming(caught, tmp_path, "directory")


def test_truncated_png(tmp_path: Path) -> None:
    data = noisy_png_bytes(INFOTEXT)
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])  # inside the pixel data
    with pytest.raises(InfotextError) as caught:
        read_image(cut)
    assert_one_line_naming(caught, cut, "truncated")
    # The infotext sits before the pixel data and is still readable; read_image is the check.
    assert read_infotext_text(cut) == INFOTEXT

    head = tmp_path / "head.png"
    head.write_bytes(data[:60])  # inside the header chunks
    with pytest.raises(InfotextError) as caught:
        read_infotext(head)
    assert_one_line_naming(caught, head, "cannot read")

    plain = tmp_path / "plain_cut.png"
    buffer = io.BytesIO()
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(buffer, format="PNG")
    plain.write_bytes(buffer.getvalue()[:40_000])
    with pytest.raises(InfotextError) as caught:  # must decode to look for late text chunks
        read_infotext(plain)
    assert_one_line_naming(caught, plain, "truncated")


def test_corrupt_crc(tmp_path: Path) -> None:
    data = bytearray(save_png(small_image(), tmp_path, "c", "p, q: r").read_bytes())
    ihdr_crc = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
    data[ihdr_crc] ^= 0xFF
    path = tmp_path / "crc.png"
    path.write_bytes(bytes(data))
    with pytest.raises(InfotextError) as caught:
        read_image(path)
    assert_one_line_naming(caught, path, "cannot read")


def test_read_image_loads_fully_and_detaches(tmp_path: Path) -> None:
    path = save_png(small_image(), tmp_path, "r", INFOTEXT)
    image = read_image(path)
    assert image.size == (64, 48) and image.getpixel((3, 2)) == (12, 10, 6)
    assert image.info["parameters"] == INFOTEXT
    os.replace(path, tmp_path / "moved.png")  # no open handle is left behind


def test_decompression_bomb_warning_is_an_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    small_image(size=(12, 12)).save(path)  # 144 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would only warn below 200
    for reader in (read_image, read_infotext):
        with pytest.raises(InfotextError) as caught:
            reader(path)
        assert_one_line_naming(caught, path, "decompression bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow's own error above 2x
    with pytest.raises(InfotextError, match="decompression bomb"):
        read_image(path)


# --------------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    ("prompt", "stem"),
    [
        ("a cat", "42-a cat"),
        ("", "42"),
        (
            "a photo of an astronaut, (highly detailed:1.2) <lora:add_detail:0.6>",
            "42-a photo of an astronaut, highly detailed",
        ),
        ("((masterpiece)), [[blurry]], {nai style}", "42-masterpiece, blurry, nai style"),
        ("a [cat:dog:0.5] in a hat", "42-a cat dog in a hat"),
        ('what? a "cat/dog" | mix: *yes*\nnext\tline', "42-what a cat dog mix yes next line"),
        ("<lora:x:1>, <hypernet:y:0.5>", "42"),
        ("trailing dots...", "42-trailing dots"),
        ("  spaced   out  ,  ,  words  ", "42-spaced out, words"),
        ("C:\\path\\to\\file", "42-C path to file"),
    ],
)
def test_filename_stem(prompt: str, stem: str) -> None:
    assert filename_stem(42, prompt) == stem


def test_filename_stem_cuts_at_word_boundary() -> None:
    prompt = "alpha beta gamma delta epsilon"
    assert filename_stem(7, prompt, max_len=20) == "7-alpha beta gamma"
    assert filename_stem(7, prompt, max_len=19) == "7-alpha beta gamma"
    assert filename_stem(7, prompt, max_len=18) == "7-alpha beta gamma"
    assert filename_stem(7, prompt, max_len=17) == "7-alpha beta"
    assert filename_stem(7, "x" * 50, max_len=10) == "7-xxxxxxxx"
    assert filename_stem(123456, prompt, max_len=3) == "123456"
    assert len(filename_stem(1, "word " * 100)) <= 128


def test_filename_stem_byte_limit_and_usable(tmp_path: Path) -> None:
    stem = filename_stem(3, "猫 " * 200, max_len=1000)
    assert len(stem.encode()) <= 240
    assert stem.endswith("猫")
    assert save_png(small_image(size=(4, 4)), tmp_path, stem, "x").exists()
