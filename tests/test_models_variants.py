"""Checkpoint variants found in the wild: fp16, EMA, key-layout quirks, VAE files, v-prediction."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emaki.errors import ModelLoadError
from emaki.models import load_model, make_tiny_bundle, save_diffusers, save_single_file
from emaki.models.saving import bundle_to_compvis

UNET = "model.diffusion_model."


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def bundle(request):
    return make_tiny_bundle(request.param, seed=5)


@pytest.fixture(scope="module")
def sd1():
    return make_tiny_bundle("sd1", seed=5)


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_fp16_file_keeps_or_upcasts_exactly(tmp_path, bundle):
    path = save_single_file(bundle, tmp_path / "half.safetensors", torch.float16)
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}
    half = load_model(path, dtype=None)
    full = load_model(path)
    for part in ("unet", "vae", "text_encoder"):
        ours = getattr(bundle, part).state_dict()
        for key, value in getattr(half, part).state_dict().items():
            assert value.dtype == torch.float16 and torch.equal(value, ours[key].half()), key
        for key, value in getattr(full, part).state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, ours[key].half().float()), (
                key
            )


def test_ema_weights_are_ignored_or_preferred(tmp_path, sd1):
    tensors = bundle_to_compvis(sd1)
    ema = {
        "model_ema." + k.removeprefix("model.").replace(".", ""): v + 1
        for k, v in tensors.items()
        if k.startswith(UNET)
    }
    ema |= {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(100, dtype=torch.int32),
    }
    path = write(tmp_path / "ema.safetensors", tensors | ema)
    assert same(load_model(path).unet, sd1.unet)
    preferred = load_model(path, prefer_ema=True).unet.state_dict()
    for key, value in sd1.unet.state_dict().items():
        assert torch.equal(preferred[key], value + 1), key
    plain = write(tmp_path / "plain.safetensors", tensors)
    with pytest.raises(ModelLoadError, match="no EMA weights"):
        load_model(plain, prefer_ema=True)


def test_sd1_text_keys_without_text_model_level(tmp_path, sd1):
    prefix = "cond_stage_model.transformer."
    tensors = {
        k.replace(prefix + "text_model.", prefix): v for k, v in bundle_to_compvis(sd1).items()
    }
    assert not any(".text_model." in k for k in tensors)
    assert same(
        load_model(write(tmp_path / "old.safetensors", tensors)).text_encoder, sd1.text_encoder
    )


def test_known_unused_keys_are_tolerated(tmp_path, sd1):
    tensors = bundle_to_compvis(sd1) | {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "alphas_cumprod": sd1.alphas_cumprod.double(),
        "betas": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
    }
    loaded = load_model(write(tmp_path / "full.safetensors", tensors))
    assert same(loaded.unet, sd1.unet) and same(loaded.text_encoder, sd1.text_encoder)


def test_sd2_file_with_openclip_extras_uses_the_penultimate_layer(tmp_path):
    sd2 = make_tiny_bundle("sd2", seed=5)
    tensors = bundle_to_compvis(sd2)
    prefix = "cond_stage_model.model."
    last = sd2.text_encoder.config.num_hidden_layers
    hidden = sd2.text_encoder.config.hidden_size
    # an extra (last) resblock, as real SD 2.x files have, plus the unused projection heads
    extra = {
        k.replace(".resblocks.0.", f".resblocks.{last}."): v + 1
        for k, v in tensors.items()
        if ".resblocks.0." in k
    }
    tensors |= extra | {
        prefix + "text_projection": torch.zeros(hidden, hidden),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    loaded = load_model(write(tmp_path / "sd2.safetensors", tensors))
    assert loaded.family == "sd2" and loaded.text_layers_skipped == 1
    assert same(loaded.text_encoder, sd2.text_encoder)
    assert loaded.tokenizer.pad_token_id == 0


def vae_variants(donor) -> dict[str, dict]:
    compvis = {
        k: v for k, v in bundle_to_compvis(donor).items() if k.startswith("first_stage_model.")
    }
    return {
        "compvis": {k.removeprefix("first_stage_model."): v for k, v in compvis.items()},
        "prefixed": compvis,
        "diffusers": dict(donor.vae.state_dict()),
    }


@pytest.mark.parametrize("flavour", ["compvis", "prefixed", "diffusers"])
def test_vae_file_overrides_the_model_vae(tmp_path, sd1, flavour):
    donor = make_tiny_bundle("sd1", seed=99)
    vae_file = write(tmp_path / "better-vae.safetensors", vae_variants(donor)[flavour])
    # the model file may then even lack its own VAE
    model = {
        k: v for k, v in bundle_to_compvis(sd1).items() if not k.startswith("first_stage_model.")
    }
    model_file = write(tmp_path / "model.safetensors", model)
    loaded = load_model(model_file, vae_path=vae_file)
    assert same(loaded.vae, donor.vae) and same(loaded.unet, sd1.unet)
    assert loaded.vae_name == "better-vae"
    assert loaded.vae_hash == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    assert loaded.vae_scale_factor == 0.18215


def test_vae_override_for_a_diffusers_folder(tmp_path, sd1):
    donor = make_tiny_bundle("sd1", seed=99)
    folder = save_diffusers(sd1, tmp_path / "folder")
    vae_file = write(tmp_path / "vae.safetensors", vae_variants(donor)["compvis"])
    assert same(load_model(folder, vae_path=vae_file).vae, donor.vae)


def test_bad_vae_file_names_the_problem(tmp_path, sd1):
    model_file = save_single_file(sd1, tmp_path / "model.safetensors")
    compvis = vae_variants(sd1)["compvis"]
    del compvis["decoder.conv_out.bias"]
    vae_file = write(tmp_path / "vae.safetensors", compvis)
    with pytest.raises(
        ModelLoadError, match=r"vae\.safetensors: 1 missing key: decoder\.conv_out\.bias"
    ):
        load_model(model_file, vae_path=vae_file)


def test_old_diffusers_vae_attention_names_load(tmp_path, sd1):
    folder = save_diffusers(sd1, tmp_path / "folder")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    old = {}
    for key, value in sd1.vae.state_dict().items():
        for new, legacy in renames.items():
            key = key.replace(new, legacy)
        old[key] = value
    write(weights, old)
    assert same(load_model(folder).vae, sd1.vae)


YAML_V = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"  # SD 2.x 768-v
    linear_start: 0.00085
"""


def test_prediction_type_sources_in_order(tmp_path, sd1):
    plain = write(tmp_path / "model.safetensors", bundle_to_compvis(sd1))
    assert load_model(plain).prediction_type == "epsilon"
    (tmp_path / "model.yaml").write_text(YAML_V)
    loaded = load_model(plain)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert load_model(plain, prediction_type="epsilon").prediction_type == "epsilon"
    assert load_model(plain, prediction_type="x0").prediction_type == "sample"
    (tmp_path / "model.yaml").write_text(YAML_V.replace('"v"', "eps"))
    assert load_model(plain).prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="unknown prediction type"):
        load_model(plain, prediction_type="vee")


def test_prediction_type_from_metadata_and_folder(tmp_path):
    vpred = make_tiny_bundle("sd2", seed=5, prediction_type="v_prediction")
    assert (
        load_model(save_single_file(vpred, tmp_path / "v.safetensors")).prediction_type
        == "v_prediction"
    )
    folder = save_diffusers(vpred, tmp_path / "folder")
    assert load_model(folder).prediction_type == "v_prediction"
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "epsilon"}))
    assert load_model(folder).prediction_type == "epsilon"
    assert load_model(folder, prediction_type="v").prediction_type == "v_prediction"
