"""Formats and round trips: every tensor comes back bit for bit; diffusers agrees independently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emaki.models import (
    load_model,
    make_tiny_bundle,
    save_diffusers,
    save_single_file,
    tiny_configs,
)
from emaki.models.convert import convert
from emaki.models.files import files_hash
from emaki.models.saving import public_config

FAMILIES = ["sd1", "sd2"]
PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """A tiny bundle of each family, written once as a single file and as a diffusers folder."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    bundle = make_tiny_bundle(family, seed=3, prediction_type="v_prediction")
    single = save_single_file(bundle, root / "tiny.safetensors")
    folder = save_diffusers(bundle, root / "tiny-diffusers")
    return bundle, single, folder


def assert_same_weights(a, b, parts=PARTS):
    for part in parts:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{part}.{key}"


def read_file_tensors(path: Path) -> dict[str, bytes]:
    tensors = load_file(path)
    return {k: v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


def folder_tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for key, data in read_file_tensors(file).items():
            out[f"{file.parent.name}/{key}"] = data
    return out


def test_single_file_loads_back_exactly(saved):
    bundle, single, _ = saved
    loaded = load_model(single)
    assert_same_weights(bundle, loaded)
    assert loaded.family == bundle.family and loaded.prediction_type == "v_prediction"
    assert public_config(loaded.unet.config) == public_config(bundle.unet.config)
    assert public_config(loaded.vae.config) == public_config(bundle.vae.config)
    assert loaded.text_encoder.config.to_diff_dict() == bundle.text_encoder.config.to_diff_dict()
    assert dict(loaded.scheduler_config) == dict(bundle.scheduler_config)
    assert torch.equal(loaded.alphas_cumprod, bundle.alphas_cumprod)
    assert loaded.hash == hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    assert loaded.name == "tiny" and loaded.source == single


def test_diffusers_folder_loads_back_exactly(saved):
    bundle, _, folder = saved
    loaded = load_model(folder)
    assert_same_weights(bundle, loaded)
    assert loaded.family == bundle.family and loaded.prediction_type == "v_prediction"
    assert public_config(loaded.unet.config) == public_config(bundle.unet.config)
    weights = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.safetensors")]
    assert len(weights) == 3 and loaded.hash == files_hash(weights)
    assert loaded.tokenizer.pad_token_id == bundle.tokenizer.pad_token_id


def test_single_to_diffusers_to_single_is_bit_identical(saved, tmp_path):
    _, single, _ = saved
    convert(single, tmp_path / "folder", "diffusers")
    convert(tmp_path / "folder", tmp_path / "again.safetensors", "single-file")
    assert read_file_tensors(tmp_path / "again.safetensors") == read_file_tensors(single)
    with (
        safe_open(str(single), "pt") as a,
        safe_open(str(tmp_path / "again.safetensors"), "pt") as b,
    ):
        assert a.metadata() == b.metadata()


def test_diffusers_to_single_to_diffusers_is_bit_identical(saved, tmp_path):
    _, _, folder = saved
    convert(folder, tmp_path / "one.safetensors", "single-file")
    convert(tmp_path / "one.safetensors", tmp_path / "folder", "diffusers")
    assert folder_tensors(tmp_path / "folder") == folder_tensors(folder)
    for name in (
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ):
        assert json.loads((tmp_path / "folder" / name).read_text()) == json.loads(
            (folder / name).read_text()
        )


def test_diffusers_pipeline_opens_emaki_folder_and_agrees(saved):
    bundle, _, folder = saved
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, local_files_only=True
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    prompt = ["a red apple on a table"]
    ids = bundle.tokenizer(
        prompt, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert torch.equal(
        pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids,
        ids,
    )
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = bundle.text_encoder(ids.repeat(2, 1)).last_hidden_state
        assert torch.equal(pipe.text_encoder(ids.repeat(2, 1)).last_hidden_state, cond)
        ours = bundle.unet(latents, torch.tensor([10, 900]), cond).sample
        theirs = pipe.unet(latents, torch.tensor([10, 900]), cond).sample
    assert torch.equal(ours, theirs)


def test_diffusers_single_file_loader_reads_emaki_files_identically(saved, tmp_path):
    """diffusers' own CompVis converter is an independent check of emaki's key map."""
    bundle, single, folder = saved
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(configs), local_files_only=True, safety_checker=None
    )
    assert_same_weights(load_model(single), pipe)
    assert_same_weights(bundle, pipe)


def test_deeper_unet_covers_every_up_block_layout(tmp_path):
    """Three levels: up blocks with and without attention, each with an upsampler."""
    configs = tiny_configs("sd1")
    configs.unet.update(
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
    )
    bundle = make_tiny_bundle("sd1", configs=configs)
    single = save_single_file(bundle, tmp_path / "deep.safetensors")
    keys = set(load_file(single))
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys  # plain level
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in keys  # attention level
    save_diffusers(bundle, tmp_path / "deep")
    configs_only = tmp_path / "configs"
    shutil.copytree(tmp_path / "deep", configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(configs_only), local_files_only=True, safety_checker=None
    )
    assert_same_weights(bundle, pipe)
    assert_same_weights(bundle, load_model(single))


def strip_metadata(source: Path, target: Path) -> Path:
    save_file(load_file(source), str(target))
    return target


def test_file_without_metadata_loads_through_shape_inference(saved, tmp_path):
    bundle, single, _ = saved
    loaded = load_model(strip_metadata(single, tmp_path / "plain.safetensors"))
    assert loaded.prediction_type == "epsilon"  # nothing says v any more: the family default
    if bundle.family == "sd1":
        assert_same_weights(bundle, loaded)
        return
    # SD 2.x convention: the last OpenCLIP layer of a file is not used (penultimate conditioning)
    assert_same_weights(bundle, loaded, parts=("unet", "vae"))
    layers = bundle.text_encoder.config.num_hidden_layers
    assert loaded.text_encoder.config.num_hidden_layers == layers - 1
    ours = bundle.text_encoder.state_dict()
    for key, value in loaded.text_encoder.state_dict().items():
        assert torch.equal(value, ours[key]), key
