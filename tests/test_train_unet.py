"""Training the denoiser: caches, loss terms, exact resume, export that emaki and diffusers load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import compute_snr

from emaki.models.loading import load_model
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest
from emaki.train.loop import train
from emaki.train.recipe import parse_recipe
from emaki.train.tasks import min_snr_weights

from train_fixtures import denoiser_parts, logged_losses, unet_recipe


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return denoiser_parts(tmp_path_factory.mktemp("unet-parts"))


def test_train_export_and_generate_in_emaki_and_diffusers(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    res = train(parse_recipe(unet_recipe(parts, run)), progress=False)
    assert res.finished
    caches = sorted(p.name.split("-")[0] for p in (run / "cache").iterdir())
    assert caches == ["latents", "text"]
    assert (run / "samples" / "step-00000004.png").is_file()
    bundle = load_model(res.model_dir)
    assert type(bundle.text_encoder).__name__ == "BertModel"
    assert bundle.vae_scale_factor == 0.5
    req = GenerationRequest(
        prompt="a red shape", steps=4, seed=1, width=16, height=16, sampler="Euler"
    )
    image = Pipeline(bundle).generate(req).images[0]
    assert image.size == (16, 16)
    ref = StableDiffusionPipeline.from_pretrained(res.model_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    out = ref("a red shape", num_inference_steps=3, height=16, width=16, output_type="np").images[0]
    assert out.shape == (16, 16, 3) and np.isfinite(out).all()


def test_exporting_the_last_checkpoint_equals_the_finished_model(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    from emaki.train.loop import export_checkpoint

    recipe = parse_recipe(unet_recipe(parts, tmp_path / "run"))
    res = train(recipe, progress=False)
    exported = export_checkpoint(recipe, tmp_path / "preview")
    a, b = load_model(res.model_dir).unet.state_dict(), load_model(exported).unet.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an earlier checkpoint is a different (EMA) model
    first = sorted((tmp_path / "run" / "checkpoints").iterdir())[0]
    early = load_model(export_checkpoint(recipe, tmp_path / "early", first)).unet.state_dict()
    assert any(not torch.equal(a[k], early[k]) for k in a)


def test_resume_reproduces_losses_with_cached_latents(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    train(parse_recipe(unet_recipe(parts, tmp_path / "full", steps=5)), progress=False)
    part = tmp_path / "part"
    train(parse_recipe(unet_recipe(parts, part, steps=5)), stop_after=3, progress=False)
    train(parse_recipe(unet_recipe(parts, part, steps=5)), progress=False)
    assert logged_losses(part) == logged_losses(tmp_path / "full")


def test_v_prediction_is_recorded_in_the_export(parts: dict[str, Path], tmp_path: Path) -> None:
    res = train(
        parse_recipe(unet_recipe(parts, tmp_path / "v", steps=2, prediction="v_prediction")),
        progress=False,
    )
    assert load_model(res.model_dir).prediction_type == "v_prediction"


def test_min_snr_weights_match_the_definition_and_diffusers_snr() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 100, 500, 999])
    acp = sched.alphas_cumprod[t]
    snr = compute_snr(sched, t)
    assert torch.allclose(snr, acp / (1 - acp))
    eps = min_snr_weights(acp, 5.0, "epsilon")
    v = min_snr_weights(acp, 5.0, "v_prediction")
    assert torch.allclose(eps, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr)
    assert torch.allclose(v, torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))
    # Low-noise steps (high SNR) are down-weighted; high-noise steps keep weight 1 for ε.
    assert eps[0] < 0.01 and eps[-1] == 1.0


def test_init_starts_from_a_models_unet_and_refuses_other_shapes(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    from accelerate import Accelerator

    from emaki.train.recipe import RecipeError
    from emaki.train.tasks import UNetTask

    first = train(parse_recipe(unet_recipe(parts, tmp_path / "first", steps=2)), progress=False)
    text = unet_recipe(parts, tmp_path / "second").replace(
        "[train]", f'init = "{first.model_dir}"\n[train]'
    )
    task = UNetTask(parse_recipe(text), Accelerator(cpu=True))
    want = load_model(first.model_dir).unet.state_dict()
    got = task.unet.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(RecipeError, match="does not fit the recipe's UNet"):
        UNetTask(parse_recipe(text.replace("[16, 32]", "[16, 16]")), Accelerator(cpu=True))
    with pytest.raises(RecipeError, match=r"no unet/diffusion_pytorch_model\.safetensors"):
        UNetTask(
            parse_recipe(text.replace(str(first.model_dir), str(tmp_path))), Accelerator(cpu=True)
        )
