"""The models folder: listing, names, lookup, confinement to the root, the hash cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from emaki.errors import EmakiError
from emaki.models.library import (
    HASH_CACHE,
    KINDS,
    find_model,
    kind_dir,
    list_models,
    models_root,
    short_hash12,
)


def put(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "models"
    put(root / "checkpoints" / "v1-5.safetensors", b"a" * 10)
    put(root / "checkpoints" / "anime" / "mix.ckpt", b"b" * 20)
    folder = root / "checkpoints" / "tiny-diffusers"
    put(folder / "model_index.json", b"{}")
    put(folder / "unet" / "diffusion_pytorch_model.safetensors", b"u" * 30)
    put(folder / "vae" / "diffusion_pytorch_model.bin", b"v" * 40)
    put(root / "lora" / "styles" / "ink.safetensors", b"c" * 5)
    put(root / "lora" / "ink-v2.safetensors", b"d" * 6)
    put(root / "lora" / "detail.safetensors", b"e")
    put(root / "lora" / "detail.pt", b"ee")
    put(root / "lora" / "notes.txt", b"not a model")
    put(root / "lora" / ".detail.safetensors.tmp-123", b"partial write")
    put(root / "embeddings" / "bad-hands.pt", b"f" * 3)
    return root


def names(entries) -> list[str]:
    return [e.name for e in entries]


def test_models_root_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EMAKI_MODELS", raising=False)
    monkeypatch.delenv("EMAKI_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models_root() == tmp_path / "home" / ".local" / "share" / "emaki" / "models"
    monkeypatch.setenv("EMAKI_HOME", str(tmp_path / "emaki"))
    assert models_root() == tmp_path / "emaki" / "models"
    monkeypatch.setenv("EMAKI_MODELS", str(tmp_path / "elsewhere"))
    assert models_root() == tmp_path / "elsewhere"


def test_listing_names_sizes_and_order(root):
    checkpoints = list_models("checkpoints", root)
    assert names(checkpoints) == ["anime/mix", "tiny-diffusers", "v1-5"]
    sizes = {e.name: e.size for e in checkpoints}
    assert sizes == {"anime/mix": 20, "tiny-diffusers": 2 + 30 + 40, "v1-5": 10}
    assert {e.kind for e in checkpoints} == {"checkpoints"}
    assert checkpoints[1].path == root / "checkpoints" / "tiny-diffusers"
    lora = list_models("lora", root)
    # detail.safetensors before detail.pt; no .txt, no hidden temp file
    assert [(e.name, e.path.suffix) for e in lora] == [
        ("detail", ".safetensors"),
        ("detail", ".pt"),
        ("ink-v2", ".safetensors"),
        ("styles/ink", ".safetensors"),
    ]
    assert list_models("hypernetworks", root) == []
    assert not (root / "hypernetworks").exists()  # listing creates nothing
    assert kind_dir("vae", root, create=True).is_dir()


def test_unknown_kind(root):
    with pytest.raises(EmakiError, match="unknown model kind 'loras'"):
        list_models("loras", root)
    assert set(KINDS) == {"checkpoints", "vae", "lora", "embeddings", "hypernetworks", "controlnet"}


def test_find_exact_stem_and_suffix(root):
    assert (
        find_model("lora", "styles/ink", root).path == root / "lora" / "styles" / "ink.safetensors"
    )
    # A1111's <lora:ink:1> finds lora/styles/ink.safetensors: a unique stem
    assert find_model("lora", "ink", root).name == "styles/ink"
    assert find_model("lora", "detail", root).path.suffix == ".safetensors"
    assert find_model("lora", "detail.pt", root).path.suffix == ".pt"
    assert find_model("checkpoints", "mix", root).name == "anime/mix"
    assert find_model("checkpoints", "tiny-diffusers", root).path.is_dir()


def test_ambiguous_stem(root):
    put(root / "lora" / "other" / "ink.safetensors")
    with pytest.raises(EmakiError, match="ambiguous") as info:
        find_model("lora", "ink", root)
    assert "other/ink" in str(info.value) and "styles/ink" in str(info.value)


def test_unknown_name_lists_closest(root):
    with pytest.raises(EmakiError) as info:
        find_model("lora", "inc-v2", root)
    message = str(info.value)
    assert "\n" not in message and "no lora model named 'inc-v2'" in message
    closest = message.split("closest: ")[1].rstrip(")").split(", ")
    assert closest[0] == "ink-v2" and len(closest) <= 5
    with pytest.raises(EmakiError, match="folder is empty"):
        find_model("hypernetworks", "x", root)


@pytest.mark.parametrize(
    "name", ["../lora/ink", "styles/../../secret", "/etc/passwd", "a\0b", "..", "C:\\x", ""]
)
def test_traversal_names_are_refused(root, name):
    with pytest.raises(EmakiError, match="refused") as info:
        find_model("lora", name, root)
    assert "\n" not in str(info.value)


def test_symlinks_outside_the_root_are_neither_listed_nor_found(root, tmp_path):
    secret = put(tmp_path / "outside" / "secret.safetensors")
    (root / "lora" / "leak.safetensors").symlink_to(secret)
    (root / "lora" / "leakdir").symlink_to(secret.parent, target_is_directory=True)
    assert "leak" not in names(list_models("lora", root))
    assert not any(n.startswith("leakdir") for n in names(list_models("lora", root)))
    for name in ("leak", "leakdir/secret", "secret"):
        with pytest.raises(EmakiError):
            find_model("lora", name, root)
    # inside the root is fine: a LoRA linked from another kind folder, a linked kind folder
    (root / "lora" / "alias.safetensors").symlink_to(root / "lora" / "ink-v2.safetensors")
    assert find_model("lora", "alias", root).size == 6
    big_disk = tmp_path / "big-disk" / "vae"
    put(big_disk / "kl-f8.safetensors", b"x" * 7)
    (root / "vae").symlink_to(big_disk, target_is_directory=True)
    assert names(list_models("vae", root)) == ["kl-f8"]


def test_symlink_loops_and_broken_links_do_not_crash(root):
    (root / "lora" / "loop").symlink_to(root / "lora", target_is_directory=True)
    (root / "lora" / "styles" / "up").symlink_to(root / "lora", target_is_directory=True)
    (root / "lora" / "self.safetensors").symlink_to(root / "lora" / "self.safetensors")
    (root / "lora" / "dangling.safetensors").symlink_to(root / "lora" / "gone.safetensors")
    listed = names(list_models("lora", root))
    assert "self" not in listed and "dangling" not in listed
    assert listed == ["detail", "detail", "ink-v2", "styles/ink"]  # each file once


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable folders")
def test_unreadable_folder_is_skipped(root):
    locked = root / "lora" / "locked"
    put(locked / "hidden.safetensors")
    locked.chmod(0)
    try:
        assert "locked/hidden" not in names(list_models("lora", root))
    finally:
        locked.chmod(0o755)


# --- hashes ----------------------------------------------------------------------------------


def test_short_hash12_and_cache_reuse_and_invalidation(root):
    path = root / "lora" / "ink-v2.safetensors"
    original = path.read_bytes()
    assert short_hash12(path, root) == hashlib.sha256(original).hexdigest()[:12]
    cache = json.loads((root / HASH_CACHE).read_text())
    assert (
        cache["sha256"]["lora/ink-v2.safetensors"]["sha256"] == hashlib.sha256(original).hexdigest()
    )

    # same size and mtime: the cached digest is reused (so the file is not read again)
    stat = path.stat()
    path.write_bytes(b"D" * len(original))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert short_hash12(path, root) == hashlib.sha256(original).hexdigest()[:12]

    # a new mtime: hashed again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert short_hash12(path, root) == hashlib.sha256(b"D" * len(original)).hexdigest()[:12]


def test_corrupt_cache_is_ignored_and_replaced(root):
    path = root / "checkpoints" / "v1-5.safetensors"
    (root / HASH_CACHE).write_text("{ not json")
    assert short_hash12(path, root) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert "checkpoints/v1-5.safetensors" in json.loads((root / HASH_CACHE).read_text())["sha256"]
    (root / HASH_CACHE).write_text(json.dumps({"version": 1, "sha256": ["wrong"]}))
    assert short_hash12(path, root) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [HASH_CACHE]


def test_folder_hash_covers_its_weight_files(root):
    folder = root / "checkpoints" / "tiny-diffusers"
    digest = hashlib.sha256()
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"):
        digest.update(rel.encode() + b"\0" + (folder / rel).read_bytes())
    assert short_hash12(folder, root) == digest.hexdigest()[:12]


def test_files_outside_the_root_are_hashed_but_not_cached(root, tmp_path):
    outside = put(tmp_path / "elsewhere.safetensors", b"zz")
    assert short_hash12(outside, root) == hashlib.sha256(b"zz").hexdigest()[:12]
    assert not (root / HASH_CACHE).exists()
