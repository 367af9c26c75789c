"""Models conditioned on a BERT-style encoder (as emaki's default model, on MiniLM): save, load,
and generate the same image as diffusers' StableDiffusionPipeline on the same folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

from emaki.errors import ModelSaveError
from emaki.models.loading import load_model
from emaki.models.saving import save_diffusers, save_single_file
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest
from emaki.text.encoder import TextEncoder

from train_fixtures import tiny_bert


@pytest.fixture(scope="module")
def bert_bundle(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bert")
    tok, text = tiny_bert(tmp)
    base = make_tiny_bundle("sd1", seed=0)
    unet_cfg = {**dict(base.unet.config), "cross_attention_dim": 32}
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(unet_cfg).eval()
    return replace(base, unet=unet, text_encoder=text, tokenizer=tok, name="tiny-bert")


def test_chunks_use_cls_sep_pad_and_the_tokenizer_length(bert_bundle) -> None:
    enc = TextEncoder(bert_bundle.tokenizer, bert_bundle.text_encoder)
    (chunk,) = enc.chunks("a red apple")
    tok = bert_bundle.tokenizer
    assert len(chunk) == 16
    assert chunk[:5] == [
        tok.cls_token_id,
        *tok("a red apple", add_special_tokens=False).input_ids,
        tok.sep_token_id,
    ]
    assert chunk[5:] == [tok.pad_token_id] * 11
    # Matches what diffusers feeds the encoder: padding to model_max_length, masked.
    ref = tok("a red apple", padding="max_length", max_length=16, return_tensors="pt")
    assert chunk == ref.input_ids[0].tolist()
    ours = enc.encode("a red apple").context
    theirs = bert_bundle.text_encoder(ref.input_ids, attention_mask=ref.attention_mask)[0]
    assert torch.allclose(ours, theirs, atol=1e-6)
    # Long prompts: chunks of 14 tokens.
    assert len(enc.chunks(" ".join(["apple"] * 20))) == 2


def test_folder_round_trip_and_diffusers_agree(bert_bundle, tmp_path: Path) -> None:
    folder = save_diffusers(bert_bundle, tmp_path / "m")
    loaded = load_model(folder)
    assert type(loaded.text_encoder).__name__ == "BertModel"
    assert type(loaded.tokenizer).__name__.startswith("BertTokenizer")
    for a, b in zip(
        loaded.text_encoder.state_dict().values(), bert_bundle.text_encoder.state_dict().values()
    ):
        assert torch.equal(a, b)

    req = GenerationRequest(
        prompt="a happy yellow face", negative_prompt="sad", sampler="Euler", schedule="uniform",
        steps=6, cfg_scale=5.0, seed=7, width=64, height=64,
    )  # fmt: skip
    ours = np.asarray(Pipeline(loaded).generate(req).images[0], dtype=np.int16)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.scheduler = EulerDiscreteScheduler.from_config(
        ref.scheduler.config, timestep_spacing="linspace"
    )
    ref.set_progress_bar_config(disable=True)
    shape = (1, 4, 8, 8)
    noise = torch.randn(shape[1:], generator=torch.Generator().manual_seed(7))[None]
    theirs = ref(
        "a happy yellow face", negative_prompt="sad", num_inference_steps=6, guidance_scale=5.0,
        latents=noise, output_type="np",
    ).images[0]  # fmt: skip
    theirs = np.round(theirs * 255).astype(np.int16)
    assert ours.std() > 1
    assert np.abs(ours - theirs).max() <= 1


def test_single_file_refuses_a_bert_model(bert_bundle, tmp_path: Path) -> None:
    with pytest.raises(ModelSaveError, match="CLIP text encoders only"):
        save_single_file(bert_bundle, tmp_path / "m.safetensors")
