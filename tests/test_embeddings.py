"""Textual-inversion embeddings: the ecosystem's file formats, trigger-word matching, text models.

Files are written here exactly as A1111 (``Embedding.save``: a torch-saved dict with
``string_to_param``), kohya (``emb_params`` safetensors) and diffusers (``learned_embeds``: the
token mapped to its vector) write them. Text-model checks compare against the models' own
``input_ids`` forward.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from emaki.adapters.embeddings import (
    Embedding,
    EmbeddingLibrary,
    read_embedding,
    run_text_model,
    token_embeddings,
)
from emaki.errors import ModelLoadError, PickleRefusedError
from emaki.models.tiny import make_tiny_bundle
from emaki.text.tokenizer import load_clip_tokenizer

WIDTH = 32  # the tiny SD 1.x text encoder's hidden size


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer("eos")


@pytest.fixture(scope="module")
def clip():
    return make_tiny_bundle("sd1").text_encoder


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, vec: torch.Tensor) -> Path:
    """What A1111's ``Embedding.save`` writes."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
            "name": "stored-name-is-not-the-trigger",
            "step": 1500,
            "sd_checkpoint": "e1441589a6",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# --- reading ---------------------------------------------------------------------------------


def test_three_formats_read_back_identically(tmp_path):
    vec = vectors(3)
    files = [
        write_a1111_pt(tmp_path / "style.pt", vec),
        write_safetensors(tmp_path / "kohya.safetensors", {"emb_params": vec}),
        write_safetensors(tmp_path / "learned.safetensors", {"<my-style>": vec}),
    ]
    bin_path = tmp_path / "learned_embeds.bin"
    torch.save({"<my-style>": vec.clone()}, bin_path)  # diffusers' pickled learned_embeds.bin
    files.append(bin_path)
    for path in files:
        emb = read_embedding(path, width=WIDTH, allow_pickle=True)
        assert emb.name == path.stem
        assert emb.vectors.dtype == torch.float32
        assert torch.equal(emb.vectors, vec)
        assert emb.hash == sha12(path)
        assert emb.path == path
        assert len(emb) == 3 and emb.width == WIDTH


def test_single_vector_and_half_precision(tmp_path):
    one = vectors(1)[0]  # diffusers stores a one-token embedding as [D]
    emb = read_embedding(write_safetensors(tmp_path / "cat.safetensors", {"<cat>": one}))
    assert emb.vectors.shape == (1, WIDTH) and torch.equal(emb.vectors[0], one)
    half = vectors(4).half()
    emb = read_embedding(write_safetensors(tmp_path / "h.safetensors", {"emb_params": half}))
    assert emb.vectors.dtype == torch.float32
    assert torch.equal(emb.vectors, half.float())


def test_multi_vector_a1111_embedding(tmp_path):
    vec = vectors(8, seed=3)
    emb = read_embedding(write_a1111_pt(tmp_path / "eight.pt", vec), allow_pickle=True)
    assert emb.vectors.shape == (8, WIDTH)
    assert torch.equal(emb.vectors, vec)


def test_width_mismatch_is_refused_in_one_line(tmp_path):
    path = write_safetensors(tmp_path / "sd2emb.safetensors", {"emb_params": vectors(2, 1024)})
    with pytest.raises(ModelLoadError) as info:
        read_embedding(path, width=768)
    message = str(info.value)
    assert "sd2emb.safetensors" in message and "1024" in message and "768" in message
    assert "\n" not in message
    assert read_embedding(path).width == 1024  # no width given: no check


def test_sdxl_embedding_is_refused(tmp_path):
    path = write_safetensors(
        tmp_path / "xl.safetensors", {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}
    )
    with pytest.raises(ModelLoadError, match="SDXL embedding, not supported by this model"):
        read_embedding(path, width=768)


def test_pickles_need_the_opt_in(tmp_path):
    path = write_a1111_pt(tmp_path / "style.pt", vectors(2))
    with pytest.raises(PickleRefusedError):
        read_embedding(path, width=WIDTH)
    bin_path = tmp_path / "learned_embeds.bin"
    torch.save({"<x>": vectors(1)[0]}, bin_path)
    with pytest.raises(PickleRefusedError):
        read_embedding(bin_path)


def test_unusable_files_raise_one_line_errors(tmp_path):
    two_terms = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": vectors(1), "+": vectors(1)}}, two_terms)
    bare = tmp_path / "bare.pt"
    torch.save(vectors(2), bare)
    code = tmp_path / "code.pt"
    torch.save({"string_to_param": {"*": vectors(1)}, "x": Path("not allowed")}, code)
    many = write_safetensors(tmp_path / "many.safetensors", {"a": vectors(1), "b": vectors(1)})
    ints = write_safetensors(tmp_path / "ints.safetensors", {"emb_params": torch.ones(2, 4).long()})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    for path in (two_terms, bare, code, many, ints, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(ModelLoadError) as info:
            read_embedding(path, allow_pickle=True)
        assert "\n" not in str(info.value)
        assert path.name in str(info.value)
    with pytest.raises(ModelLoadError, match="pathlib"):  # names the forbidden object
        read_embedding(code, allow_pickle=True)


# --- the library and matching ----------------------------------------------------------------


def embedding(name: str, n: int = 1) -> Embedding:
    return Embedding(name=name, vectors=vectors(n), hash="0" * 12, path=None)


def test_match_multi_token_and_overlapping_names(tokenizer):
    library = EmbeddingLibrary(
        [embedding("foo"), embedding("foo-bar-baz", 3), embedding("foo-bar", 2)], tokenizer
    )
    ids = tokenizer("a foo-bar-baz and foo-bar and foo bar", add_special_tokens=False).input_ids
    found = {}
    for offset in range(len(ids)):
        hit = library.match(ids, offset)
        if hit is not None:
            emb, used = hit
            # independent check: the consumed ids spell exactly the embedding's name
            assert tokenizer.decode(ids[offset : offset + used]).replace(" ", "") == emb.name
            found[offset] = emb.name
    words = [tokenizer.decode([i]).strip() for i in ids]
    starts = [i for i, w in enumerate(words) if w == "foo"]
    assert len(starts) == 3
    # the longest name starting at each "foo" wins
    assert [found[i] for i in starts] == ["foo-bar-baz", "foo-bar", "foo"]
    assert set(found) == set(starts)


def test_match_bounds_and_lookup(tokenizer):
    library = EmbeddingLibrary([embedding("emakiwidget", 2)], tokenizer)
    ids = tokenizer("emakiwidget", add_special_tokens=False).input_ids
    assert len(ids) > 1  # a name of several tokens
    hit = library.match(ids, 0)
    assert hit is not None and hit[0].name == "emakiwidget" and hit[1] == len(ids)
    assert library.match(ids[:-1], 0) is None  # the name cut short does not match
    assert library.match(ids, len(ids)) is None
    assert library.match(ids, -1) is None
    assert "emakiwidget" in library and "other" not in library
    assert library.get("emakiwidget") is not None and library.get("other") is None
    assert library.names() == ["emakiwidget"] and len(library) == 1


def test_library_keeps_the_first_of_two_names(tokenizer):
    first, second = embedding("same"), embedding("same", 2)
    library = EmbeddingLibrary([first, second], tokenizer)
    assert library.get("same") is first
    assert len(library.skipped) == 1


def test_from_folder_recursive_sorted_with_skips(tmp_path, tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    write_safetensors(tmp_path / "a" / "dup.safetensors", {"emb_params": vectors(1, seed=1)})
    write_safetensors(tmp_path / "b" / "dup.safetensors", {"emb_params": vectors(1, seed=2)})
    write_safetensors(tmp_path / "b" / "deep" / "zeta.safetensors", {"<z>": vectors(2)})
    write_safetensors(tmp_path / "alpha.safetensors", {"emb_params": vectors(1)})
    write_safetensors(tmp_path / "wide.safetensors", {"emb_params": vectors(1, 768)})
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": vectors(1), "clip_g": vectors(1)})
    write_a1111_pt(tmp_path / "pickled.pt", vectors(1))
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")

    library = EmbeddingLibrary.from_folder(tmp_path, tokenizer, width=WIDTH)
    assert library.names() == ["dup", "alpha", "zeta"]  # sorted path order: a/, alpha, b/
    assert torch.equal(library.get("dup").vectors, vectors(1, seed=1))
    skipped = {path.relative_to(tmp_path).as_posix(): why for path, why in library.skipped}
    assert set(skipped) == {
        "b/dup.safetensors", "wide.safetensors", "xl.safetensors", "pickled.pt",
        "broken.safetensors", "empty.bin",
    }  # fmt: skip
    assert "768" in skipped["wide.safetensors"] and "SDXL" in skipped["xl.safetensors"]
    assert all("\n" not in why for why in skipped.values())

    with_pickles = EmbeddingLibrary.from_folder(tmp_path, tokenizer, width=WIDTH, allow_pickle=True)
    assert "pickled" in with_pickles
    with pytest.raises(ModelLoadError):
        EmbeddingLibrary.from_folder(tmp_path / "nope", tokenizer, width=WIDTH)


# --- text models -----------------------------------------------------------------------------


def prompt_ids(tokenizer, *texts: str) -> torch.Tensor:
    return torch.tensor(
        [tokenizer(t, padding="max_length", max_length=77).input_ids for t in texts]
    )


def test_token_embeddings_is_the_lookup_when_nothing_is_inserted(clip, tokenizer):
    ids = prompt_ids(tokenizer, "a photo of a cat", "a dog")
    got = token_embeddings(clip, ids, [])
    assert torch.equal(got, clip.embeddings.token_embedding.weight[ids])


def test_token_embeddings_writes_the_inserted_rows(clip, tokenizer):
    ids = prompt_ids(tokenizer, "a photo of a cat", "a dog")
    vec = vectors(3)
    got = token_embeddings(clip, ids, [(1, 2, vec)])
    lookup = clip.embeddings.token_embedding.weight[ids]
    assert torch.equal(got[1, 2:5], vec)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1, 2:5] = False
    assert torch.equal(got[mask], lookup[mask])
    with pytest.raises(ValueError):
        token_embeddings(clip, ids, [(0, 75, vec)])


def assert_same_outputs(ref, out):
    assert torch.equal(ref.last_hidden_state, out.last_hidden_state)
    assert len(ref.hidden_states) == len(out.hidden_states)
    for a, b in zip(ref.hidden_states, out.hidden_states):
        assert torch.equal(a, b)


@torch.no_grad()
def test_clip_from_input_vectors_equals_clip_from_ids(clip, tokenizer):
    ids = prompt_ids(tokenizer, "a photo of a cat", "a watercolor of a lighthouse")
    ref = clip(ids, output_hidden_states=True)
    out = run_text_model(clip, token_embeddings(clip, ids, []), output_hidden_states=True)
    assert_same_outputs(ref, out)  # so the position embeddings are added, once


@torch.no_grad()
def test_clip_inserted_vectors_act_like_the_tokens_they_copy(clip, tokenizer):
    # Inserting the token vectors of "cat" where "dog" is gives what the prompt "cat" gives.
    cat_ids = prompt_ids(tokenizer, "a photo of a cat")
    dog_ids = prompt_ids(tokenizer, "a photo of a dog")
    position = int((cat_ids[0] != dog_ids[0]).nonzero()[0])
    cat_vec = clip.embeddings.token_embedding.weight[cat_ids[0, position : position + 1]]
    embeds = token_embeddings(clip, dog_ids, [(0, position, cat_vec)])
    got = run_text_model(clip, embeds).last_hidden_state
    assert torch.equal(got, clip(cat_ids).last_hidden_state)
    assert not torch.equal(got, clip(dog_ids).last_hidden_state)


@torch.no_grad()
def test_bert_from_input_vectors_equals_bert_from_ids():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    bert = BertModel(config).eval()
    ids = torch.randint(0, 120, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    ref = bert(ids, attention_mask=mask, output_hidden_states=True)
    embeds = token_embeddings(bert, ids, [])
    assert torch.equal(embeds, bert.embeddings.word_embeddings.weight[ids])
    out = run_text_model(bert, embeds, attention_mask=mask, output_hidden_states=True)
    assert_same_outputs(ref, out)
