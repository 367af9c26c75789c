"""img2img and inpainting on tiny models: A1111's step rule, diffusers side by side, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)
from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.latents import encode, from_pil
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.img2img import fixed_steps, img2img_sigmas, latent_mask
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest, InitImage


@pytest.fixture(scope="module")
def bundle(tiny_sd1):
    return tiny_sd1


@pytest.fixture(scope="module")
def pipe(tiny_sd1_pipe):
    return tiny_sd1_pipe


def _image(size: int = 64, seed: int = 3) -> Image.Image:
    """A smooth test picture: colour gradients plus a few blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    arr = np.stack([x, y, 1 - x * y], -1) * 255
    for _ in range(3):
        a, b = rng.integers(0, size - 16, 2)
        arr[a : a + 16, b : b + 16] = rng.integers(0, 255, 3)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _box_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


def _px(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def _euler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", timestep_spacing="linspace",
    )  # fmt: skip


def reference_pipeline(cls, bundle, **components):
    """The diffusers pipeline ``cls`` on ``bundle`` (plus ``components``, e.g. ``controlnet``)
    with Euler at uniform spacing, as the side-by-side tests run emaki."""
    ref = cls(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        unet=bundle.unet, scheduler=_euler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **components,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref


def tiny_inpainting_bundle():
    """A tiny RunwayML-style inpainting model: the sd1 UNet with 9 input channels."""
    from emaki.models.families import tiny_configs

    configs = tiny_configs("sd1")
    unet = {**configs.unet, "in_channels": 9}
    return make_tiny_bundle(
        "sd1", seed=2, configs=type(configs)(**{**configs.__dict__, "unet": unet})
    )


# -- the step rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "strength", "run"), [(20, 0.75, 16), (20, 0.5, 11), (10, 1.0, 10), (10, 0.05, 1)]
)
def test_a1111_runs_int_strength_times_steps_plus_one(steps, strength, run) -> None:
    sigmas = torch.linspace(10, 0, steps + 1)
    tail = img2img_sigmas(sigmas, strength)
    assert len(tail) - 1 == run
    assert torch.equal(tail, sigmas[-len(tail) :])


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.7), (15, 0.5), (8, 0.3), (10, 1.0)])
def test_exact_steps_mode_runs_the_requested_count(steps, strength) -> None:
    total = fixed_steps(steps, strength)
    tail = img2img_sigmas(torch.linspace(10, 0, total + 1), strength, run=steps)
    assert len(tail) - 1 == steps


def test_strength_zero_returns_the_input_unchanged(pipe) -> None:
    image = _image()
    req = GenerationRequest("a cat", steps=5, seed=1, denoising_strength=0.0, init=InitImage(image))
    out = pipe.generate(req).images[0]
    assert np.array_equal(_px(out), _px(image))


# -- against diffusers --------------------------------------------------------------------------


def test_img2img_matches_diffusers(bundle, pipe) -> None:
    """A1111 strength s at n steps starts where diffusers' strength s + 1/n starts."""
    image = _image()
    steps, seed = 10, 77
    req = GenerationRequest(
        "a red apple", negative_prompt="blurry", sampler="Euler", schedule="uniform",
        steps=steps, cfg_scale=5.0, seed=seed, denoising_strength=0.5, init=InitImage(image),
    )  # fmt: skip
    ours = pipe.generate(req).images[0]
    latent = encode(bundle.vae, from_pil(image), pipe.latent_format, mean=True)
    theirs = reference_pipeline(StableDiffusionImg2ImgPipeline, bundle)(
        "a red apple", image=latent, negative_prompt="blurry", strength=0.6,
        num_inference_steps=steps, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]  # fmt: skip
    diff = np.abs(_px(ours) - _px(theirs))
    assert _px(ours).std() > 1
    assert diff.max() <= 1, f"max pixel diff {diff.max()}"


def test_inpainting_matches_diffusers_inside_and_keeps_the_outside(bundle, pipe) -> None:
    """Ordinary model, binary latent-aligned mask, Euler: A1111's x0 blending equals diffusers'
    re-noising of the known region; outside the mask emaki returns the original pixels."""
    image, box = _image(), (16, 8, 48, 40)
    mask = _box_mask(64, box)
    steps, seed = 10, 5
    req = GenerationRequest(
        "a blue ball", sampler="Euler", schedule="uniform", steps=steps, cfg_scale=4.0,
        seed=seed, denoising_strength=0.7,
        init=InitImage(image, mask=mask, mask_blur=0),
    )  # fmt: skip
    ours = _px(pipe.generate(req).images[0])
    ref = reference_pipeline(StableDiffusionInpaintPipeline, bundle)
    latent = encode(bundle.vae, from_pil(image), pipe.latent_format, mean=True)
    ref._encode_vae_image = lambda image, generator: latent  # the same init latent on both sides
    theirs = _px(
        ref(
            "a blue ball", image=image, mask_image=mask, strength=0.8, num_inference_steps=steps,
            guidance_scale=4.0, generator=torch.Generator().manual_seed(seed),
        ).images[0]
    )  # fmt: skip
    inside = _px(mask) > 0
    assert np.abs(ours - theirs)[inside].max() <= 1
    assert np.array_equal(ours[~inside], _px(image)[~inside])
    assert np.abs(ours - _px(image))[inside].mean() > 5, "the masked area was not repainted"


def test_inpainting_model_conditioning_matches_diffusers(pipe) -> None:
    """A 9-channel UNet gets [mask, latent of the masked image] as diffusers prepares them;
    with everything masked at strength 1 both generate the same image."""
    bundle = tiny_inpainting_bundle()
    ipipe = Pipeline(bundle)
    assert ipipe.inpainting_model(bundle)
    image = _image(seed=9)
    mask = Image.new("L", (64, 64), 255)
    steps, seed = 6, 11
    req = GenerationRequest(
        "a house", sampler="Euler", schedule="uniform", steps=steps, cfg_scale=3.0, seed=seed,
        denoising_strength=1.0, init=InitImage(image, mask=mask, mask_blur=0, inpainting_fill=3),
    )  # fmt: skip
    ours = _px(ipipe.generate(req).images[0])
    ref = reference_pipeline(StableDiffusionInpaintPipeline, bundle)
    # both sides encode with the posterior mean (diffusers would sample it) of a contiguous
    # tensor (diffusers' masked image is channels-last, which CPU convolutions round differently)
    ref._encode_vae_image = lambda image, generator: encode(
        bundle.vae, image.contiguous(), ipipe.latent_format, mean=True
    )
    theirs = _px(
        ref(
            "a house", image=image, mask_image=mask, strength=1.0, num_inference_steps=steps,
            guidance_scale=3.0, generator=torch.Generator().manual_seed(seed),
        ).images[0]
    )  # fmt: skip
    assert ours.std() > 1
    assert np.abs(ours - theirs).max() <= 1


# -- masks, fills, only masked ----------------------------------------------------------------------


def test_mask_blur_feathers_but_far_pixels_stay_exact(pipe) -> None:
    image, box = _image(), (24, 24, 40, 40)
    req = GenerationRequest(
        "x", steps=4, seed=3, denoising_strength=0.9,
        init=InitImage(image, mask=_box_mask(64, box), mask_blur=4),
    )  # fmt: skip
    out = _px(pipe.generate(req).images[0])
    far = np.ones((64, 64), bool)
    far[24 - 11 : 40 + 11, 24 - 11 : 40 + 11] = False  # 2.5 sigma of blur + rounding margin
    assert np.array_equal(out[far], _px(image)[far])
    assert np.abs(out - _px(image))[28:36, 28:36].mean() > 5


def test_invert_mask_repaints_the_outside(pipe) -> None:
    image, box = _image(), (16, 16, 48, 48)
    req = GenerationRequest(
        "x", steps=4, seed=3, denoising_strength=0.9,
        init=InitImage(image, mask=_box_mask(64, box), mask_blur=0, inpainting_mask_invert=True),
    )  # fmt: skip
    out = _px(pipe.generate(req).images[0])
    assert np.array_equal(out[16:48, 16:48], _px(image)[16:48, 16:48])
    assert np.abs(out - _px(image))[:8].mean() > 5


def test_only_masked_pastes_a_full_size_crop_back(pipe) -> None:
    image = _image(96, seed=4)
    box = (40, 40, 56, 56)
    req = GenerationRequest(
        "x", steps=4, seed=3, width=64, height=64, denoising_strength=0.9,
        init=InitImage(
            image, mask=_box_mask(96, box), mask_blur=0, inpaint_full_res=True,
            inpaint_full_res_padding=8,
        ),
    )  # fmt: skip
    result = pipe.generate(req)
    out = _px(result.images[0])
    assert out.shape == (96, 96, 3)  # the original's size, not the generation size
    outside = np.ones((96, 96), bool)
    outside[40:56, 40:56] = False
    assert np.array_equal(out[outside], _px(image)[outside])
    assert np.abs(out - _px(image))[42:54, 42:54].mean() > 5
    assert "Inpaint area: Only masked" in result.infotexts[0]
    assert "Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("fill", [0, 2, 3])
def test_masked_content_modes_change_the_start(pipe, fill) -> None:
    image, box = _image(), (16, 16, 48, 48)
    mask = _box_mask(64, box)
    state = pipe.init_state(
        pipe.resolve(GenerationRequest("x", init=InitImage(image, mask=mask, mask_blur=0, inpainting_fill=fill))),
        pipe.bundle,
    )  # fmt: skip
    assert state is not None and state.keep is not None
    noise = torch.randn(1, *state.latent.shape[1:], generator=torch.Generator().manual_seed(0))
    start = state.start_latent(noise)
    keep = state.keep.bool().expand_as(start)
    assert torch.equal(start[keep], state.latent.expand_as(start)[keep])
    if fill == 2:
        assert torch.equal(start[~keep], noise[~keep])
    elif fill == 3:
        assert torch.count_nonzero(start[~keep]) == 0
    else:  # "fill": the masked pixels were painted from the surroundings before encoding
        inner = _px(state.image)[24:40, 24:40].reshape(-1, 3)
        assert inner.std(0).max() < _px(image)[16:48, 16:48].reshape(-1, 3).std(0).max()


def test_latent_mask_is_rounded_and_downsampled() -> None:
    m = latent_mask(_box_mask(64, (16, 16, 48, 48)), (8, 8))
    assert m.shape == (1, 1, 8, 8)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 0, 2:6, 2:6].all() and m.sum() == 16


def test_rgba_upload_counts_transparency_as_the_mask(pipe) -> None:
    image = _image()
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
    req = GenerationRequest("x", steps=3, seed=1, init=InitImage(image, mask=rgba, mask_blur=0))
    out = _px(pipe.generate(req).images[0])
    assert np.array_equal(out[:, 32:], _px(image)[:, 32:])
    assert np.abs(out - _px(image))[:, :24].mean() > 5


def test_batch_of_img2img_uses_per_image_seeds(pipe) -> None:
    init = InitImage(_image())
    one = pipe.generate(GenerationRequest("x", steps=3, seed=40, init=init)).images
    two = pipe.generate(GenerationRequest("x", steps=3, seed=39, batch_size=2, init=init)).images
    assert np.abs(_px(one[0]) - _px(two[1])).max() <= 1  # batched convolutions round apart
    assert np.abs(_px(two[0]) - _px(two[1])).max() > 10


def test_img2img_size_defaults_to_the_init_image(pipe) -> None:
    image = _image(96).crop((0, 0, 90, 75))
    out = pipe.generate(GenerationRequest("x", steps=2, seed=1, init=InitImage(image))).images[0]
    assert out.size == (88, 72)


def test_latent_resize_mode_and_infotext(pipe) -> None:
    req = GenerationRequest(
        "x", steps=2, seed=1, width=64, height=64, denoising_strength=0.4,
        init=InitImage(_image(32), resize_mode=3, initial_noise_multiplier=0.9),
    )  # fmt: skip
    result = pipe.generate(req)
    assert result.images[0].size == (64, 64)
    info = result.infotexts[0]
    assert "Denoising strength: 0.4" in info
    assert "Resize mode: Just resize (latent upscale)" in info and "Noise multiplier: 0.9" in info


@pytest.mark.parametrize(
    ("init", "needle"),
    [
        (dict(resize_mode=7), "resize mode"),
        (dict(inpainting_fill=4), "masked content"),
        (dict(mask="not an image"), "mask must be an image"),
        (dict(initial_noise_multiplier=3.0), "noise multiplier"),
    ],
)
def test_bad_img2img_input_is_a_clear_error(pipe, init, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        pipe.generate(GenerationRequest("x", steps=2, init=InitImage(_image(), **init)))


def test_bad_strength_is_a_clear_error(pipe) -> None:
    with pytest.raises(InvalidRequestError, match="denoising strength"):
        pipe.generate(GenerationRequest("x", denoising_strength=1.5, init=InitImage(_image())))


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    from emaki.models.saving import save_diffusers

    path = tmp_path_factory.mktemp("model") / "tiny-sd1"
    save_diffusers(bundle, path)
    return path


def test_cli_inpaint_then_recreate_from_image(model_dir, tmp_path, capsys) -> None:
    from emaki.cli import main
    from emaki.imageio import read_image, read_infotext

    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    _image().save(image)
    _box_mask(64, (16, 16, 48, 48)).save(mask)
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--init", str(image), "--steps", "3", "--out", str(out)]
    argv = ["generate", "a cat", *common, "--mask", str(mask), "--seed", "4",
            "--denoising-strength", "0.6", "--mask-blur", "2", "--masked-content", "2"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    params = read_infotext(first).params
    assert params["Denoising strength"] == "0.6" and params["Masked content"] == "latent noise"
    assert main(["generate", "--from", first, *common, "--mask", str(mask)]) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert np.array_equal(_px(read_image(first)), _px(read_image(again)))


def test_cli_batch_folder_and_loopback(model_dir, tmp_path, capsys) -> None:
    from emaki.cli import main

    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(2):
        _image(seed=i).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["generate", "x", "--model", str(model_dir), "--init", str(folder), "--steps", "2",
            "--seed", "1", "--loopback", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    written = capsys.readouterr().out.strip().splitlines()
    assert len(written) == 4  # 2 images x (1 + 1 loopback)
    assert len(list(out.glob("*.png"))) == 4
