"""Training a ControlNet for a frozen model: zero start, aligned control images, what is trained,
exact resume, and an export that the pipeline loads and that changes its images."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from emaki.control.preprocess import canny
from emaki.models.loading import load_model
from emaki.pipelines.txt2img import Pipeline
from emaki.request import ControlNetUnit, GenerationRequest
from emaki.train.controlnet import ControlNetTask
from emaki.train.data import load_fitted
from emaki.train.loop import step_generator, train
from emaki.train.recipe import RecipeError, parse_recipe

from train_fixtures import denoiser_parts, logged_losses, unet_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnet-base")
    parts = denoiser_parts(root)
    res = train(parse_recipe(unet_recipe(parts, root / "unet", steps=2)), progress=False)
    assert res.model_dir is not None
    return {**parts, "model": res.model_dir}


def _recipe(base: dict[str, Path], out: Path, steps: int = 4, extra: str = "") -> str:
    return f"""
kind = "controlnet"
output = "{out}"
[data]
path = "{base["data"]}"
resolution = 16
caption_dropout = 0.5
[model]
base = "{base["model"]}"
preprocessor = "canny"
conditioning_channels = [8, 16]
{extra}
[train]
steps = {steps}
batch_size = 3
ema_decay = 0.9
[optim]
lr = 1e-2
[checkpoint]
every = 2
[log]
every = 1
sample_every = {steps}
sample_steps = 3
"""


def _task(recipe_text: str) -> ControlNetTask:
    return ControlNetTask(parse_recipe(recipe_text), Accelerator(cpu=True))


def _unet_args(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"sample": p["noisy"], "timestep": p["t"], "encoder_hidden_states": p["cond"]}


def test_untrained_controlnet_leaves_the_base_models_loss_unchanged(
    base: dict[str, Path], tmp_path: Path
) -> None:
    """Zero convolutions: at step 0 the controlled model is the base model, so the loss with
    the ControlNet equals the plain denoising loss on the same draw."""
    task = _task(_recipe(base, tmp_path / "run"))
    batch = task.next_batch()
    h, w = batch["mean"].shape[-2:]
    assert batch["hint"].shape == (3, 3, 2 * h, 2 * w)  # the image size: VAE factor 2
    with torch.no_grad():
        with_control = task.loss(task.controlnet, batch, step_generator(0, 0, 0, 0))
        problem = task.noised(batch, step_generator(0, 0, 0, 0))
        plain = task.weighted_loss(task.unet(**_unet_args(problem)).sample, problem)
    assert torch.equal(with_control, plain)
    # Gradients reach the ControlNet (its zero convolutions first) and never the frozen base.
    task.loss(task.controlnet, batch, step_generator(0, 0, 0, 0)).backward()
    assert all(p.grad is None for p in task.unet.parameters())
    assert all(p.grad is None for p in task.vae.parameters())
    assert any(m.weight.grad.abs().max() > 0 for m in task.controlnet.controlnet_down_blocks)


def test_control_images_are_the_preprocessor_on_the_latents_crop(
    base: dict[str, Path], tmp_path: Path
) -> None:
    task = _task(_recipe(base, tmp_path / "run"))
    size_of = task.bucket_sizes()
    for i in (0, 1, 5):
        size = size_of[i]
        picture = load_fitted(Path(base["data"]) / task.data.records[i].file, size, None, False)
        want = np.asarray(canny(Image.fromarray(picture)))
        got = task._hints[(i, *size)].permute(1, 2, 0).numpy()
        assert got.shape == (size[1], size[0], 3)
        assert np.array_equal(got, want)
        assert got.max() == 255  # the rectangles' edges are there
    # A second task reads them back from the run's cache.
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "cache").iterdir())
    assert cached == ["hints", "latents", "text"]
    again = _task(_recipe(base, tmp_path / "run"))
    assert again._hints.keys() == task._hints.keys()
    assert all(torch.equal(again._hints[k], task._hints[k]) for k in task._hints)


def test_training_changes_only_the_controlnet_and_its_export_guides_the_pipeline(
    base: dict[str, Path], tmp_path: Path
) -> None:
    res = train(parse_recipe(_recipe(base, tmp_path / "run")), progress=False)
    assert res.finished and res.model_dir is not None
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()
    bundle = load_model(base["model"])
    # The base model's files are untouched; the ControlNet's zero convolutions are not zero now.
    from emaki.control.model import load_controlnet

    net = load_controlnet(res.model_dir)
    assert net.controlnet_cond_embedding.conv_out.weight.abs().max() > 0
    assert any(m.weight.abs().max() > 0 for m in net.controlnet_down_blocks)
    models = tmp_path / "models"
    shutil.copytree(res.model_dir, models / "controlnet" / "edges")
    control = canny(_picture())
    req = GenerationRequest(prompt="a red shape", steps=4, seed=1, width=16, height=16,
                            sampler="Euler")  # fmt: skip
    pipe = Pipeline(bundle, models=models)
    plain = np.asarray(pipe.generate(req).images[0], dtype=np.int16)
    unit = ControlNetUnit(model="edges", image=control, module="none", resize_mode=0)
    guided = pipe.generate(_with(req, unit)).images[0]
    assert guided.size == (16, 16)
    assert np.abs(np.asarray(guided, dtype=np.int16) - plain).max() > 0
    # Weight 0 switches it off: the base model's image again.
    off = dataclasses.replace(unit, weight=0.0)
    same = np.asarray(pipe.generate(_with(req, off)).images[0], dtype=np.int16)
    assert np.array_equal(same, plain)


def _picture() -> Image.Image:
    arr = np.full((16, 16, 3), 255, np.uint8)
    arr[4:12, 3:10] = (200, 30, 30)
    return Image.fromarray(arr)


def _with(req: GenerationRequest, unit: ControlNetUnit) -> GenerationRequest:
    return dataclasses.replace(req, control=(unit,))


def test_resume_reproduces_the_logged_losses(base: dict[str, Path], tmp_path: Path) -> None:
    train(parse_recipe(_recipe(base, tmp_path / "full", steps=5)), progress=False)
    part = tmp_path / "part"
    train(parse_recipe(_recipe(base, part, steps=5)), stop_after=3, progress=False)
    train(parse_recipe(_recipe(base, part, steps=5)), progress=False)
    assert logged_losses(part) == logged_losses(tmp_path / "full")


def test_init_continues_from_a_controlnet(base: dict[str, Path], tmp_path: Path) -> None:
    first = train(parse_recipe(_recipe(base, tmp_path / "first", steps=2)), progress=False)
    task = _task(_recipe(base, tmp_path / "second", extra=f'init = "{first.model_dir}"'))
    from emaki.control.model import load_controlnet

    want = load_controlnet(first.model_dir).state_dict()
    got = task.controlnet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("conditioning_channels = [8, 16, 32]", "downsamples 4x, but the base VAE's factor is 2x"),
        ('preprocessor = "sobel"', "unknown ControlNet preprocessor 'sobel'"),
        ('base = "/nonexistent"', "is not a model folder"),
    ],
)
def test_bad_recipes_are_one_line_errors(
    base: dict[str, Path], tmp_path: Path, extra: str, message: str
) -> None:
    text = _recipe(base, tmp_path / "run")
    key = extra.split(" = ")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))
    text = text.replace("[model]", f"[model]\n{extra}")
    with pytest.raises(RecipeError, match=message):
        _task(text)
