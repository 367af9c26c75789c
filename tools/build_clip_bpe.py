"""Build the CLIP BPE tokenizer files that ship inside emaki.

Input: OpenAI CLIP's byte-pair-encoding table ``bpe_simple_vocab_16e6.txt.gz`` as carried in the
open-clip-torch wheel (MIT). Get it without torchvision::

    pip download open_clip_torch --no-deps -d /tmp/oc
    python tools/build_clip_bpe.py /tmp/oc/open_clip_torch-*.whl

Output (default ``src/emaki/text/clip_bpe/``): ``vocab.json`` and ``merges.txt`` in the layout
transformers' ``CLIPTokenizer`` reads. The vocabulary follows the CLIP recipe (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", tokenizer code in
openai/CLIP ``simple_tokenizer.py``):

1. the 256 byte symbols of the byte-level alphabet (GPT-2's byte-to-printable-character map),
2. the same 256 symbols with the end-of-word marker ``</w>`` appended,
3. one token per merge rule, the two halves concatenated, in merge-rank order,
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Only the first 49152 - 256 - 2 = 48894 merge rules are used, which gives 49408 tokens.
The script is deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "emaki" / "text" / "clip_bpe"


def byte_alphabet() -> list[str]:
    """The 256 single-character symbols of the byte-level alphabet, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the remaining bytes (controls, space, and a few
    others) are mapped, in increasing byte order, to the code points 256, 257, ... so that no BPE
    symbol is whitespace or a control character. The vocabulary lists the printable bytes first
    (in byte order), then the remapped ones: that order fixes the ids 0..255.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    remapped = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(remapped))]


def read_merges(source: Path) -> list[tuple[str, str]]:
    """Read the merge rules (pairs of symbols) from the ``.txt.gz`` file or the wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = gzip.decompress(wheel.read(BPE_MEMBER))
    else:
        raw = gzip.decompress(source.read_bytes())
    lines = raw.decode("utf-8").split("\n")
    # Line 0 is a version header; the rules used by CLIP are the next NUM_MERGES lines.
    rules = lines[1 : NUM_MERGES + 1]
    merges = []
    for line in rules:
        left, right = line.split()
        merges.append((left, right))
    if len(merges) != NUM_MERGES:
        raise SystemExit(f"expected {NUM_MERGES} merge rules, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in the CLIP order described in the module docstring."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"expected {VOCAB_SIZE} distinct tokens, built {len(vocab)}")
    return vocab


def write_outputs(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path) -> None:
    """Write ``vocab.json`` (compact, UTF-8) and ``merges.txt`` (with the usual version header)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    (out / "vocab.json").write_text(text + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or the .txt.gz inside it")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    merges = read_merges(args.source)
    vocab = build_vocab(merges)
    write_outputs(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
