"""The shipped CLIP BPE tokenizer: exact ids, hand-checkable byte symbols, padding per family."""

from __future__ import annotations

import importlib.util
import json
import string
from importlib import resources
from pathlib import Path

import pytest

from emaki.errors import ModelLoadError
from emaki.text.tokenizer import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE, load_clip_tokenizer

BOS, EOS = 49406, 49407
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer("eos")


def byte_symbol_id(char: str) -> int:
    """Id of ``char + '</w>'`` for a printable ASCII char: 256 end-of-word symbols follow the 256
    byte symbols, which start with '!' (33) and run in byte order through '~'."""
    return 256 + ord(char) - ord("!")


def test_reference_prompt_gives_the_published_ids(tokenizer):
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_vocabulary_size_and_context(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE == 49408
    assert tokenizer.model_max_length == CLIP_CONTEXT_LENGTH == 77
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [BOS, EOS]


@pytest.mark.parametrize("char", list(string.ascii_lowercase + string.digits + string.punctuation))
def test_single_ascii_characters_map_to_their_byte_symbol(tokenizer, char):
    assert tokenizer(char).input_ids == [BOS, byte_symbol_id(char), EOS]


def test_punctuation_splits_into_runs(tokenizer):
    # "hello" and "world" are merged words; "," is its byte symbol; "!!" is a merged run.
    encoded = tokenizer("Hello, World!!")
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[1:-1]) == [
        "hello</w>",
        ",</w>",
        "world</w>",
        "!!</w>",
    ]
    assert encoded.input_ids == [BOS, 3306, byte_symbol_id(","), 1002, 748, EOS]


def test_case_and_whitespace_are_normalised(tokenizer):
    assert tokenizer("  A   PHOTO\n\tof ").input_ids == tokenizer("a photo of").input_ids


def test_unicode_is_encoded_as_utf8_byte_symbols(tokenizer):
    # "é" is UTF-8 C3 A9, which the byte alphabet writes as "Ã©"; "café" is one merged token.
    assert tokenizer.tokenize("café") == ["cafÃ©</w>"]
    # 🐱 is F0 9F 90 B1: "ð" for F0, then remapped symbols for the non-printable bytes.
    assert tokenizer.tokenize("a 🐱 cat") == ["a</w>", "ðŁĲ±</w>", "cat</w>"]
    assert tokenizer("a 🐱 cat").input_ids == [BOS, 320, 22979, 2368, EOS]


@pytest.mark.parametrize(
    "text", ["café naïve", "a 🐱 cat", "日本語の猫", "it's (red:1.3) <lora:x:0.5>"]
)
def test_decoding_gives_back_the_lowercased_text(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(
        " ", ""
    )


@pytest.mark.parametrize(("rule", "pad_id"), [("eos", EOS), ("zero", 0), ("!", 0)])
def test_padding_follows_the_family_rule(rule, pad_id):
    tok = load_clip_tokenizer(rule)
    ids = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:4] == [BOS, 320, 2368, EOS]
    assert set(ids[4:]) == {pad_id}
    assert tok.pad_token_id == pad_id


def test_truncation_keeps_the_end_token(tokenizer):
    ids = tokenizer("cat " * 100, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS


def test_unknown_pad_rule_is_a_one_line_error():
    with pytest.raises(ModelLoadError, match="unknown tokenizer pad rule") as info:
        load_clip_tokenizer("left")
    assert "\n" not in str(info.value)


def test_shipped_files_follow_the_clip_recipe():
    folder = resources.files("emaki.text") / "clip_bpe"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) - 1 == 49152 - 256 - 2
    assert sorted(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    # merge rule r (0-based) becomes token 512 + r, its halves concatenated
    for rank in (0, 1, 1000, len(merges) - 2):
        left, right = merges[rank + 1].split()
        assert vocab[left + right] == 512 + rank
    assert (folder / "LICENSE").is_file()
    assert "MIT" in (folder / "LICENSE").read_text(encoding="utf-8")


def test_build_tool_alphabet_matches_the_shipped_vocabulary():
    spec = importlib.util.spec_from_file_location(
        "build_clip_bpe", ROOT / "tools" / "build_clip_bpe.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    alphabet = tool.byte_alphabet()
    vocab = json.loads(
        (resources.files("emaki.text") / "clip_bpe" / "vocab.json").read_text(encoding="utf-8")
    )
    assert len(set(alphabet)) == 256
    assert [vocab[c] for c in alphabet] == list(range(256))
    assert [vocab[c + "</w>"] for c in alphabet] == list(range(256, 512))
