"""Dataset building: icon sets (real SVG rendering), user folders, dedupe, skips, manifest, stats, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emaki.cli import main
from emaki.data.build import build_dataset
from emaki.data.captions import EmojiLexicon, clipart_title, name_words, split_skin_tone
from emaki.data.fetch import fetch_npm
from emaki.data.manifest import read_manifest
from emaki.data.raster import SVG_RENDERERS
from emaki.data.sources import EMOJI_DATASOURCE, EMOJILIB, DataError, IconSet, resolve_sources
from emaki.data.stats import dataset_stats

RED_CIRCLE = '<circle cx="18" cy="18" r="14" fill="#ff0000"/>'
BLUE_SQUARE = '<rect x="4" y="4" width="28" height="28" fill="#0000ff"/>'
HAND = '<rect x="10" y="6" width="16" height="24" fill="{}"/>'


def _fake_package(cache: Path, name: str, version: str, files: dict[str, object]) -> None:
    dest = cache / "npm" / f"{name.replace('@', '').replace('/', '-')}-{version}"
    root = dest / "package"
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    (dest / ".emaki-fetched.json").write_text(
        json.dumps({"root": "package", "archive_sha256": "0" * 64})
    )


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A download cache holding a small Iconify set and the two metadata packages (no network)."""
    c = tmp_path / "cache"
    icons = {
        "red-circle": {"body": RED_CIRCLE},
        "blue-square": {"body": BLUE_SQUARE},
        "crimson-disc": {"body": RED_CIRCLE},  # same pixels as red-circle: a duplicate
        "waving-hand": {"body": HAND.format("#ffcc00")},
        "waving-hand-light-skin-tone": {"body": HAND.format("#ffe0c0")},
        "waving-hand-medium-skin-tone": {"body": HAND.format("#c08040")},
        "waving-hand-dark-skin-tone": {"body": HAND.format("#603010")},
        "broken": {"body": '<path d="M 0 0 L" fill="url(#nope'},
        "old-thing": {"body": BLUE_SQUARE, "hidden": True},
        "traffic-light": {"body": '<rect x="14" y="2" width="8" height="32" fill="#333333"/>'},
    }
    _fake_package(
        c,
        "@iconify-json/twemoji",
        "1.2.5",
        {
            "icons.json": {"prefix": "twemoji", "width": 36, "height": 36, "icons": icons},
            "chars.json": {"1f534": "red-circle", "1f44b": "waving-hand", "1f6a5": "traffic-light"},
        },
    )
    _fake_package(
        c,
        EMOJILIB.name,
        EMOJILIB.version,
        {
            "dist/emoji-en-US.json": {
                "🔴": ["red_circle", "shape", "error", ":("],
                "👋": ["waving_hand", "hello", "bye"],
            }
        },
    )
    _fake_package(
        c,
        EMOJI_DATASOURCE.name,
        EMOJI_DATASOURCE.version,
        {
            "emoji.json": [
                {"unified": "1F534", "category": "Symbols"},
                {"unified": "1F44B", "category": "People & Body"},
            ]
        },
    )
    return c


TWEMOJI = IconSet("twemoji", "1.2.5", "CC-BY-4.0", "Twemoji test attribution", "twemoji style")


def _by_name(folder: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in read_manifest(folder):
        out.setdefault(r.name, []).append(r)
    return out


def test_icon_set_build_renders_dedupes_and_captions(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = build_dataset(out, [TWEMOJI], size=32, cache=cache, offline=True, skin_tones="one")
    recs = read_manifest(out)
    names = _by_name(out)
    # red-circle and crimson-disc render identically: one is dropped. Hidden icons are not used.
    assert report.duplicates == 1
    assert "crimson-disc" in names and "red-circle" not in names  # first in name order wins
    assert "old-thing" not in names
    # The broken SVG is reported by name and skipped; the build goes on.
    assert any("twemoji" in o and o.endswith(":broken") for o, _ in report.skipped)
    # Skin tones: the plain hand plus exactly one toned variant; traffic-light stays itself.
    hands = names["waving-hand"]
    assert len(hands) == 2
    assert sum("skin tone" in r.caption for r in hands) == 1
    assert names["traffic-light"][0].caption.startswith("traffic light, ")
    assert "skin tone" not in names["traffic-light"][0].caption
    # Captions: name words, emojilib keywords (emoticons and the name itself dropped), style.
    plain = next(r for r in hands if "skin tone" not in r.caption)
    assert plain.caption == "waving hand, hello, bye, twemoji style"
    assert names["crimson-disc"][0].caption == "crimson disc, twemoji style"
    assert all(r.caption.endswith("twemoji style") for r in recs)
    assert all(
        r.license == "CC-BY-4.0" and r.attribution == "Twemoji test attribution" for r in recs
    )
    # Real pixels: the blue square is blue in the middle and white in the corner; sha256 matches.
    blue = names["blue-square"][0]
    arr = np.asarray(Image.open(out / blue.file))
    assert arr.shape == (32, 32, 3)
    assert tuple(arr[16, 16]) == (0, 0, 255)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    for r in recs:
        assert hashlib.sha256((out / r.file).read_bytes()).hexdigest() == r.sha256
    info = json.loads((out / "dataset.json").read_text())
    assert info["images"] == len(recs) == report.records
    assert "Twemoji test attribution" in (out / "ATTRIBUTION.md").read_text()


@pytest.mark.parametrize(("policy", "hands"), [("none", 1), ("one", 2), ("all", 4)])
def test_skin_tone_policies(cache: Path, tmp_path: Path, policy: str, hands: int) -> None:
    out = tmp_path / policy
    build_dataset(out, [TWEMOJI], size=24, cache=cache, offline=True, skin_tones=policy)
    assert len(_by_name(out)["waving-hand"]) == hands


def test_build_is_reproducible(cache: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_dataset(a, [TWEMOJI], size=24, cache=cache, offline=True)
    build_dataset(b, [TWEMOJI], size=24, cache=cache, offline=True)
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    assert (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes()


def _user_folder(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "cat.png")
    (root / "cat.txt").write_text("a cat on a sofa\n")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(root / "dog.jpg")
    (root / "dog.txt").write_text("a   dog")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "broken.txt").write_text("never read")
    Image.new("RGB", (8, 8), "red").save(root / "nocaption.png")
    return root


def test_user_folder_with_txt_captions_skips_corrupt_and_uncaptioned(tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "mine")
    out = tmp_path / "ds"
    report = build_dataset(out, [], [folder], size=48, license="CC0-1.0", attribution="me")
    recs = {Path(r.file).stem: r for r in read_manifest(out)}
    assert set(recs) == {"cat", "dog"}
    assert recs["cat"].caption == "a cat on a sofa"
    assert recs["dog"].caption == "a dog"
    # Downscaled to max side 48, aspect kept.
    assert (recs["cat"].width, recs["cat"].height) == (48, 32)
    assert (recs["dog"].width, recs["dog"].height) == (29, 48)
    assert recs["cat"].license == "CC0-1.0" and recs["cat"].attribution == "me"
    skipped = dict(report.skipped)
    assert any(k.endswith("broken.png") for k in skipped)
    assert any(k.endswith("nocaption.png") and "no caption" in v for k, v in skipped.items())


def test_user_folder_metadata_jsonl(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), "green").save(folder / "sub" / "g.png")
    Image.new("RGB", (16, 16), "blue").save(folder / "b.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/g.png", "text": "a green tile"})
        + "\n"
        + json.dumps({"file_name": "b.png", "caption": "blue"})
        + "\n"
    )
    build_dataset(tmp_path / "ds", [], [folder], size=64)
    caps = sorted(r.caption for r in read_manifest(tmp_path / "ds"))
    assert caps == ["a green tile", "blue"]


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("RGB", (200, 200), "white").save(folder / "big.png")
    (folder / "big.txt").write_text("big")
    Image.new("RGB", (10, 10), "white").save(folder / "small.png")
    (folder / "small.txt").write_text("small")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    report = build_dataset(tmp_path / "ds", [], [folder], size=64)
    assert [Path(r.file).stem for r in read_manifest(tmp_path / "ds")] == ["small"]
    assert any(k.endswith("big.png") for k, _ in report.skipped)


def test_existing_destination_and_interrupted_build_leave_nothing(
    cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists"):
        build_dataset(out, [TWEMOJI], size=24, cache=cache, offline=True)
    assert (out / "keep.txt").read_text() == "precious"

    def boom(i: int, total: int | None) -> None:
        if i == 3:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(fresh, [TWEMOJI], size=24, cache=cache, offline=True, progress=boom)
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]


def test_missing_svg_renderer_is_one_clear_error(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in SVG_RENDERERS else real(name, *a),
    )
    with pytest.raises(DataError, match=r"no SVG renderer.*emaki\[train\]"):
        build_dataset(tmp_path / "ds", [TWEMOJI], size=24, cache=cache, offline=True)
    assert not (tmp_path / "ds").exists()


def test_offline_without_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not in the cache"):
        fetch_npm("@iconify-json/noto", "1.2.9", tmp_path, offline=True)


def test_stats_and_verify(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    build_dataset(out, [TWEMOJI], size=24, cache=cache, offline=True)
    st = dataset_stats(out, verify=True)
    assert st["images"] == len(read_manifest(out))
    assert st["by_license"] == {"CC-BY-4.0": st["images"]}
    assert st["verify"] == {"missing": [], "sha256_mismatch": []}
    victim = read_manifest(out)[0]
    (out / victim.file).write_bytes(b"tampered")
    assert dataset_stats(out, verify=True)["verify"]["sha256_mismatch"] == [victim.file]


def test_cli_build_stats_and_errors(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _user_folder(tmp_path / "mine")
    out = tmp_path / "ds"
    assert main(["data", "build", "--images", str(folder), "--out", str(out), "--size", "32"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert main(["data", "stats", str(out)]) == 0
    assert "2 images" in capsys.readouterr().out
    assert main(["data", "build", "--sources", "twemoji,apple", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown source 'apple'" in err and "twemoji" in err
    assert main(["data", "stats", str(tmp_path / "nowhere")]) == 2
    assert "not an emaki dataset" in capsys.readouterr().err


def test_source_resolution_and_name_helpers() -> None:
    keys = [s.key for s in resolve_sources("default")]
    assert "twemoji" in keys and "openmoji" not in keys  # ShareAlike is opt-in
    assert [s.key for s in resolve_sources("noto,noto")] == ["noto"]
    assert name_words("astronaut-2") == "astronaut"
    names = {"waving-hand", "waving-hand-dark", "waving-hand-light", "waving-hand-medium"}
    assert split_skin_tone("waving-hand-dark", names).tone == "dark skin tone"
    assert split_skin_tone("traffic-light", {"traffic-light"}).tone is None
    couple = split_skin_tone("kiss-medium-dark-skin-tone-light-skin-tone", set())
    assert couple.base == "kiss" and couple.tone == "medium dark and light skin tone"
    lex = EmojiLexicon()
    lex.add_chars({"23f0": "alarm-clock"})
    assert lex.canonical("alarmclock") == "alarm-clock"
    lex.add_chars({"1f3a3": "fishing-pole", "1f41f": "fish", "1f170": "and-button"})
    assert lex.canonical("fishingpoleandfish") == "fishing-pole-and-fish"
    assert lex.canonical("qqq") == "qqq"
    assert clipart_title(Path("Red_Apple_01.svg")) == "red apple"
