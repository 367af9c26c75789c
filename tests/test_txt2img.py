"""txt2img end to end on tiny models: against diffusers, seeds, infotext, CLI behaviour."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from emaki.cli import main
from emaki.imageio import read_infotext
from emaki.infotext import parse_infotext
from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline(bundle)


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-sd1"
    save_diffusers(bundle, path)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_matches_diffusers_stable_diffusion_pipeline(bundle, pipe) -> None:
    """Same weights, prompt, sampler (Euler, uniform spacing), seed and noise as diffusers."""
    size = pipe.native_size
    req = GenerationRequest(
        prompt="a red apple", negative_prompt="blurry", sampler="Euler", schedule="uniform",
        steps=8, cfg_scale=6.0, seed=1234, width=size, height=size,
    )  # fmt: skip
    ours = pipe.generate(req).images[0]

    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", timestep_spacing="linspace",
    )  # fmt: skip
    ref = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        unet=bundle.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    shape = pipe.latent_format.latent_shape(size, size)
    # diffusers multiplies given latents by init_noise_sigma (= sigma_max for linspace spacing).
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1234))[None]
    theirs = ref(
        "a red apple", negative_prompt="blurry", num_inference_steps=8, guidance_scale=6.0,
        latents=noise, output_type="pil",
    ).images[0]  # fmt: skip
    diff = np.abs(_pixels(ours) - _pixels(theirs))
    assert _pixels(ours).std() > 1, "degenerate image"
    assert diff.max() <= 1, f"max pixel diff {diff.max()}"


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_batch_size_does_not_change_images(pipe, sampler: str) -> None:
    """Per-image noise (generators for ancestral steps, Brownian paths for SDE samplers)."""
    base = GenerationRequest(prompt="a cat", sampler=sampler, steps=6, seed=77)
    batched = pipe.generate(GenerationRequest(**{**base.__dict__, "batch_size": 2}))
    single0 = pipe.generate(base)
    single1 = pipe.generate(GenerationRequest(**{**base.__dict__, "seed": 78}))
    assert batched.seeds == [77, 78]
    for a, b in zip(batched.images, [single0.images[0], single1.images[0]]):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    assert np.abs(_pixels(batched.images[0]) - _pixels(batched.images[1])).max() > 10


def test_n_iter_continues_seeds_and_infotext_names_them(pipe) -> None:
    result = pipe.generate(GenerationRequest(prompt="x", steps=3, seed=5, batch_size=2, n_iter=2))
    assert result.seeds == [5, 6, 7, 8]
    seeds = [parse_infotext(t).params["Seed"] for t in result.infotexts]
    assert seeds == ["5", "6", "7", "8"]


def test_infotext_has_a1111_fields(pipe, bundle) -> None:
    req = GenerationRequest(
        prompt="an owl, (detailed:1.2)", negative_prompt="lowres", sampler="DPM++ 2M",
        steps=4, cfg_scale=7.5, seed=42, clip_skip=2,
    )  # fmt: skip
    info = parse_infotext(pipe.generate(req).infotexts[0])
    assert info.prompt == req.prompt
    assert info.negative_prompt == "lowres"
    p = info.params
    assert p["Steps"] == "4"
    assert p["Sampler"] == "DPM++ 2M"
    assert p["Schedule type"] == "Karras"  # the A1111 default schedule of DPM++ 2M
    assert p["CFG scale"] == "7.5"
    assert p["Seed"] == "42"
    assert p["Size"] == f"{pipe.native_size}x{pipe.native_size}"
    assert p["Model hash"] == bundle.hash
    assert p["Clip skip"] == "2"


def test_random_seed_is_drawn_and_recorded(pipe) -> None:
    result = pipe.generate(GenerationRequest(prompt="x", steps=2))
    assert 0 <= result.request.seed < 2**32
    assert parse_infotext(result.infotexts[0]).params["Seed"] == str(result.request.seed)


def test_bf16_runs_and_stays_close_to_fp32(pipe) -> None:
    req = GenerationRequest(prompt="a tree", steps=4, seed=3, sampler="Euler")
    fp32 = _pixels(pipe.generate(req).images[0])
    bf16 = _pixels(
        pipe.generate(GenerationRequest(**{**req.__dict__, "precision": "bf16"})).images[0]
    )
    assert np.abs(fp32 - bf16).mean() < 8


def test_cli_generate_then_recreate_from_image_bit_exactly(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["generate", "a blue bird", "--model", str(model_dir), "--out", str(out)]
    assert main([*args, "--steps", "5", "--sampler", "Euler a", "--seed", "31"]) == 0
    first = capsys.readouterr().out.strip().splitlines()
    assert len(first) == 1 and first[0].endswith(".png")
    original = out / first[0].split("/")[-1]
    assert original.name.startswith("31-a blue bird")
    assert (
        main(["generate", "--from", str(original), "--model", str(model_dir), "--out", str(out)])
        == 0
    )
    second = capsys.readouterr().out.strip().splitlines()[0]
    assert second != str(original), "the re-created image must not overwrite the original"
    a, b = _pixels(Image.open(original)), _pixels(Image.open(second))
    assert (a == b).all()
    info = read_infotext(original)
    assert info is not None and info.params["Sampler"] == "Euler a"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sampler", "nope"], "unknown sampler 'nope'; accepted: Euler, Euler a"),
        (["--width", "100"], "width 100 is not a multiple of 8"),
        (["--steps", "0"], "steps must be between 1 and"),
        (["--schedule", "zigzag"], "unknown schedule 'zigzag'; accepted:"),
        (["--mask", "m.png"], "--mask needs --init"),
        (["--loopback", "2"], "--loopback needs --init"),
        (["--init", "missing.png"], "missing.png"),
        (["--hires-upscaler", "ESRGAN"], "unknown hires upscaler"),
    ],
)
def test_cli_bad_input_is_one_clear_line(model_dir, tmp_path, capsys, extra, needle) -> None:
    code = main(["generate", "x", "--model", str(model_dir), "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_missing_model_and_unreadable_image(tmp_path, capsys) -> None:
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err


def test_text_encoding_matches_diffusers(bundle, pipe) -> None:
    ref = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        unet=bundle.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    theirs, _ = ref.encode_prompt("a castle on a hill", "cpu", 1, False)
    ours = pipe.text.encode("a castle on a hill").context
    assert ours.shape == theirs.shape == (1, 77, bundle.text_encoder.config.hidden_size)
    assert torch.equal(ours, theirs)


def test_clip_skip_equals_a_text_encoder_without_its_last_layers(bundle, pipe) -> None:
    """Clip skip N (A1111) = the same encoder truncated by N-1 layers, final norm applied."""
    cfg = bundle.text_encoder.config
    short = CLIPTextModel(CLIPTextConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})).eval()
    missing, _ = short.load_state_dict(bundle.text_encoder.state_dict(), strict=False)
    assert not missing
    ids = torch.tensor(pipe.text.chunks("a castle on a hill"))
    with torch.no_grad():
        expected = short(ids).last_hidden_state
    assert cfg.num_hidden_layers == 2
    assert torch.allclose(pipe.text.encode("a castle on a hill", clip_skip=2).context, expected)


def test_long_prompt_is_encoded_in_75_token_chunks(pipe) -> None:
    words = " ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    chunks = pipe.text.chunks(words)
    assert len(chunks) >= 2 and all(len(c) == 77 for c in chunks)
    ctx = pipe.text.encode(words).context
    assert ctx.shape[1] == 77 * len(chunks)
    first = pipe.text.encode_chunks(chunks[:1]).context
    assert torch.equal(ctx[:, :77], first)
    # Positive and negative of different lengths still generate (two model calls, not one).
    pipe.generate(GenerationRequest(prompt=words, negative_prompt="bad", steps=2, seed=1))


def test_sd2_family_generates(tmp_path) -> None:
    sd2 = Pipeline(make_tiny_bundle("sd2", seed=1, prediction_type="v_prediction"))
    result = sd2.generate(GenerationRequest(prompt="a boat", steps=3, seed=2, width=64, height=48))
    assert result.images[0].size == (64, 48)
    assert _pixels(result.images[0]).std() > 1


def test_encode_many_equals_encoding_one_by_one(pipe) -> None:
    long = " ".join(f"w{i}" for i in range(90))
    texts = ["a cat", "", long, "a dog, (happy)"]
    many = pipe.text.encode_many(texts)
    for text, cond in zip(texts, many):
        alone = pipe.text.encode(text).context
        assert cond.context.shape == alone.shape
        assert torch.allclose(cond.context, alone, atol=1e-5)


def test_generate_prompts_equals_each_prompt_alone(tiny_sd1_pipe, one_thread):
    """A list of prompts in batched calls gives each prompt's own image, seed and infotext; a
    composable prompt (not stackable) in the list falls back to its own call."""
    prompts = ["a red apple", "a blue cat, noto style", "a dog AND a hat :0.5", "a sun"]
    base = GenerationRequest(
        prompt="", negative_prompt="ugly", steps=4, cfg_scale=5.0, seed=11, width=32, height=32,
        sampler="Euler a", batch_size=2,
    )  # fmt: skip
    many = tiny_sd1_pipe.generate_prompts(base, prompts)
    assert many.seeds == [11, 12, 13, 14]
    assert len(many.images) == len(prompts)
    for i, prompt in enumerate(prompts):
        alone = tiny_sd1_pipe.generate(replace(base, prompt=prompt, seed=11 + i, batch_size=1))
        a = np.asarray(alone.images[0], dtype=np.int16)
        b = np.asarray(many.images[i], dtype=np.int16)
        assert np.abs(a - b).max() <= 1, prompt
        assert many.infotexts[i] == alone.infotexts[0]
    # different prompts really differ (the batch rows are not one prompt repeated)
    assert np.asarray(many.images[0]).tolist() != np.asarray(many.images[1]).tolist()


def test_generate_prompts_refuses_img2img(tiny_sd1_pipe):
    from emaki.errors import InvalidRequestError
    from emaki.request import InitImage

    req = GenerationRequest(prompt="", init=InitImage(Image.new("RGB", (32, 32))), seed=1)
    with pytest.raises(InvalidRequestError, match="txt2img only"):
        tiny_sd1_pipe.generate_prompts(req, ["a cat"])
