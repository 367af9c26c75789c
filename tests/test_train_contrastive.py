"""CLIP-style text/image training (kind = "text"): loss, both text towers, export and scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from emaki.eval.prompts import caption_vocabulary, paraphrases, unseen
from emaki.train.contrastive import clip_loss
from emaki.train.loop import train
from emaki.train.recipe import parse_recipe
from emaki.train.tasks import load_text_conditioner

from train_fixtures import shapes_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("clip-data"), n=16)


def _recipe(dataset: Path, out: Path, tower: str) -> str:
    return f"""
kind = "text"
output = "{out}"
[data]
path = "{dataset}"
resolution = 16
[model]
text_encoder = "{tower}"
hidden_size = 32
num_layers = 2
num_heads = 2
intermediate_size = 64
projection_dim = 16
image_channels = [8, 16]
[train]
steps = 3
batch_size = 4
[log]
every = 1
sample_every = 0
"""


def test_clip_loss_is_zero_for_perfect_pairs_and_log_b_for_uninformative_ones() -> None:
    b = 8
    e = F.normalize(torch.eye(b, 16), dim=-1)
    assert clip_loss(e, e, torch.tensor(math.log(100))).item() < 1e-3
    same = F.normalize(torch.ones(b, 16), dim=-1)
    assert clip_loss(same, same, torch.tensor(0.0)).item() == pytest.approx(math.log(b), rel=1e-5)


@pytest.mark.parametrize("tower", ["clip", "minilm"])
def test_text_kind_trains_and_exports(dataset: Path, tmp_path: Path, tower: str) -> None:
    res = train(parse_recipe(_recipe(dataset, tmp_path / tower, tower)), progress=False)
    assert res.finished
    scores = json.loads((res.model_dir / "scores.json").read_text())
    assert set(scores) == {"all_paraphrases", "unseen_word_paraphrases"}
    assert (res.model_dir / "pair.safetensors").is_file()
    if tower == "clip":
        # The CLIP text tower is exported as a text encoder a denoiser recipe can use.
        tok = AutoTokenizer.from_pretrained(str(res.model_dir / "tokenizer"))
        model = AutoModel.from_pretrained(str(res.model_dir / "text_encoder"))
        assert type(model).__name__ == "CLIPTextModel" and model.config.hidden_size == 32
        assert tok.model_max_length == 32
        _, model2 = load_text_conditioner(str(res.model_dir))
        assert type(model2).__name__ == "CLIPTextModel"


def test_paraphrases_name_targets_and_unseen_is_decided_by_the_captions() -> None:
    para = paraphrases()
    assert len(para) >= 30 and all(p["targets"] for p in para)
    vocab = caption_vocabulary(["grinning face, happy, joy, twemoji style", "red heart, love"])
    assert unseen("a gleeful grin", vocab)
    assert not unseen("a happy yellow face", vocab)
    assert not unseen("a", vocab)  # no content words at all
