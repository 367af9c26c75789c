"""Loading fails safely and clearly: pickles refused, corrupt or foreign files named in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emaki.errors import ModelLoadError, ModelSaveError, PickleRefusedError
from emaki.models import load_model, make_tiny_bundle, save_diffusers, save_single_file
from emaki.models.saving import bundle_to_compvis


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle("sd1", seed=1)


@pytest.fixture(scope="module")
def compvis(bundle):
    return bundle_to_compvis(bundle)


def write(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def load_error(path, **options) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **options)
    message = str(info.value)
    assert message and "\n" not in message, message
    error = info.value
    # no chained library traceback behind the one line
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


def assert_same_unet(a, b):
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pickle_is_refused_then_read_with_weights_only(tmp_path, bundle, compvis):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": compvis, "global_step": 10}, ckpt)
    with pytest.raises(PickleRefusedError, match="--allow-pickle") as info:
        load_model(ckpt)
    assert "\n" not in str(info.value)
    assert_same_unet(bundle, load_model(ckpt, allow_pickle=True))


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_does_not_run_even_with_the_opt_in(tmp_path, compvis):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": dict(compvis), "x": _Payload(str(marker))}, ckpt)
    error = load_error(ckpt, allow_pickle=True)
    assert "weights_only" in str(error)
    assert not marker.exists()


def test_pickle_disguised_with_another_suffix_is_still_refused(tmp_path, compvis):
    disguised = tmp_path / "model.weights"
    torch.save(compvis, disguised)
    with pytest.raises(PickleRefusedError):
        load_model(disguised)


def test_diffusers_folder_with_bin_weights_needs_the_opt_in(tmp_path, bundle):
    folder = save_diffusers(bundle, tmp_path / "folder")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model(folder)
    assert_same_unet(bundle, load_model(folder, allow_pickle=True))


def test_truncated_file(tmp_path, bundle):
    good = save_single_file(bundle, tmp_path / "good.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated.safetensors" in str(load_error(bad))


def test_random_bytes_and_text_files(tmp_path):
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    assert "not a readable safetensors file" in str(load_error(noise))
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a model\n" * 20)
    assert "notes.safetensors" in str(load_error(text))
    noise_ckpt = tmp_path / "noise.ckpt"
    noise_ckpt.write_bytes(os.urandom(4096))
    assert "weights_only" in str(load_error(noise_ckpt, allow_pickle=True))


def test_missing_path_and_folder_without_index(tmp_path):
    assert "no such file" in str(load_error(tmp_path / "nope.safetensors"))
    assert "model_index.json" in str(load_error(tmp_path))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"}, "SDXL"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"}, "LoRA"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, "SD3"),
        ({"first_stage_model.encoder.down.0.block.0.conv1.weight"}, "VAE"),
        ({"something.else.weight"}, "unknown architecture"),
    ],
)
def test_foreign_architectures_are_named(tmp_path, compvis, keys, expected):
    tensors = {k: torch.zeros(1) for k in keys}
    if expected == "SDXL":
        tensors |= {k: v for k, v in compvis.items() if k.startswith("model.diffusion_model.")}
    assert expected in str(load_error(write(tmp_path / "foreign.safetensors", tensors)))


def test_missing_key_is_named(tmp_path, compvis):
    gone = "model.diffusion_model.output_blocks.2.1.conv.weight"
    tensors = {k: v for k, v in compvis.items() if k != gone}
    message = str(load_error(write(tmp_path / "m.safetensors", tensors)))
    assert "1 missing key" in message and gone in message


def test_many_missing_keys_are_counted(tmp_path, compvis):
    tensors = {
        k: v for k, v in compvis.items() if not k.startswith("first_stage_model.decoder.up.")
    }
    message = str(load_error(write(tmp_path / "m.safetensors", tensors)))
    assert "missing keys" in message and "more)" in message


def test_unexpected_key_is_named(tmp_path, compvis):
    tensors = dict(compvis) | {"model.diffusion_model.extra_head.weight": torch.zeros(3)}
    message = str(load_error(write(tmp_path / "m.safetensors", tensors)))
    assert "1 unexpected key: model.diffusion_model.extra_head.weight" in message


def test_wrong_shape_is_named(tmp_path, bundle):
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = "model.diffusion_model.out.2.bias"
    tensors[key] = torch.zeros(5)
    save_file(tensors, str(path), metadata)
    message = str(load_error(path))
    assert "shape mismatch" in message and key in message


def test_family_contradicting_metadata(tmp_path, bundle):
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() | {"emaki.family": "sd2"}
    tensors = load_file(path)
    save_file(tensors, str(path), metadata)
    assert "metadata says family" in str(load_error(path))


def test_writers_refuse_to_overwrite_and_leave_no_temp_files(tmp_path, bundle):
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    folder = save_diffusers(bundle, tmp_path / "folder")
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="already exists"):
        save_single_file(bundle, path)
    with pytest.raises(ModelSaveError, match="already exists"):
        save_diffusers(bundle, folder)
    assert path.read_bytes() == before
    save_single_file(bundle, path, torch.float16, overwrite=True)
    save_diffusers(bundle, folder, overwrite=True)
    assert load_model(path, dtype=None).unet.dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.safetensors"]


def test_overwriting_the_file_being_read_is_safe(tmp_path, bundle):
    path = save_single_file(bundle, tmp_path / "m.safetensors")
    loaded = load_model(path)
    save_single_file(loaded, path, overwrite=True)
    assert_same_unet(bundle, load_model(path))


def test_single_file_must_be_safetensors(tmp_path, bundle):
    with pytest.raises(ModelSaveError, match="safetensors"):
        save_single_file(bundle, tmp_path / "m.ckpt")
