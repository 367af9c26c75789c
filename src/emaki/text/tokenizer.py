"""The CLIP byte-pair-encoding tokenizer that ships inside emaki (no download, ever).

Both Stable Diffusion families tokenize with OpenAI CLIP's BPE (49,408 tokens, 77-token context):
SD 1.x because its text encoder is OpenAI's CLIP ViT-L/14, SD 2.x because OpenCLIP reused the
same vocabulary. They differ only in the padding token:

* ``"eos"`` (SD 1.x): pad with ``<|endoftext|>`` (49407), as CompVis' ``FrozenCLIPEmbedder`` and
  diffusers' ``runwayml/stable-diffusion-v1-5`` tokenizer do.
* ``"zero"`` (SD 2.x / OpenCLIP): pad with ``!`` (id 0), as OpenCLIP's tokenizer pads with zeros
  and diffusers' ``stabilityai/stable-diffusion-2-1`` tokenizer config says ``"pad_token": "!"``.

The padding token matters: the text encoder attends to every position (causal mask only), so the
pad id changes the hidden states after the prompt's end, which the UNet does see.

The vocabulary files in ``clip_bpe/`` are built by ``tools/build_clip_bpe.py`` from the table in
the open-clip-torch wheel; see ``clip_bpe/LICENSE``.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

from transformers import CLIPTokenizer

from emaki.errors import ModelLoadError

PadRule = Literal["eos", "zero"]

#: Context length of both CLIP text encoders (75 prompt tokens + start + end).
CLIP_CONTEXT_LENGTH = 77
#: Number of tokens in the CLIP BPE vocabulary.
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_PAD_TOKENS: dict[str, str] = {"eos": EOS_TOKEN, "zero": "!", "!": "!"}


def pad_token_for(family_pad: str) -> str:
    """The padding token string for a family pad rule (``"eos"``, or ``"zero"`` alias ``"!"``)."""
    try:
        return _PAD_TOKENS[family_pad]
    except KeyError:
        accepted = ", ".join(sorted(_PAD_TOKENS))
        raise ModelLoadError(
            f"unknown tokenizer pad rule {family_pad!r} (accepted: {accepted})"
        ) from None


def load_clip_tokenizer(family_pad: str = "eos") -> CLIPTokenizer:
    """Build transformers' ``CLIPTokenizer`` from the vocabulary shipped in ``emaki.text.clip_bpe``.

    ``family_pad`` is the family's pad rule: ``"eos"`` for SD 1.x, ``"zero"`` for SD 2.x (see the
    module docstring). Fully offline: only the packaged ``vocab.json`` and ``merges.txt`` are read.
    """
    pad_token = pad_token_for(family_pad)
    folder = resources.files("emaki.text") / "clip_bpe"
    with resources.as_file(folder) as path:
        return CLIPTokenizer.from_pretrained(
            str(path),
            local_files_only=True,
            pad_token=pad_token,
            model_max_length=CLIP_CONTEXT_LENGTH,
        )
