"""Variation seeds, seed resize, seamless tiling and hires fix on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emaki.adapters.tiling import circular
from emaki.errors import InvalidRequestError
from emaki.infotext import parse_infotext
from emaki.pipelines.hires import hires_size
from emaki.request import GenerationRequest, HiresFix, request_from_params
from emaki.sampling.noise import SeededNoise, paste_centred, slerp


@pytest.fixture(scope="module")
def bundle(tiny_sd1):
    return tiny_sd1


@pytest.fixture(scope="module")
def pipe(tiny_sd1_pipe):
    return tiny_sd1_pipe


def _px(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def _gen(pipe, **kw):
    base = dict(prompt="a red apple", steps=4, seed=5, sampler="DPM++ 2M")
    return pipe.generate(GenerationRequest(**{**base, **kw}))


# -- variation seeds ---------------------------------------------------------------------------


def test_slerp_end_points_and_unit_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    # the vectors are the (channel, column) pairs along H: for unit ones the midpoint is a
    # unit vector at equal angles from both ends (a great-circle midpoint)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid.norm(dim=1), torch.ones(4, 8), atol=1e-5)
    assert torch.allclose((a * mid).sum(1), (mid * b).sum(1), atol=1e-5)


def test_variation_strength_zero_is_the_seed_and_one_is_the_variation_seed(pipe) -> None:
    base = _px(_gen(pipe, seed=5).images[0])
    other = _px(_gen(pipe, seed=9).images[0])
    assert np.array_equal(_px(_gen(pipe, seed=5, subseed=9, subseed_strength=0.0).images[0]), base)
    one = _px(_gen(pipe, seed=5, subseed=9, subseed_strength=1.0).images[0])
    assert np.abs(one - other).max() <= 1
    half = _px(_gen(pipe, seed=5, subseed=9, subseed_strength=0.5).images[0])
    assert np.abs(half - base).mean() > 2 and np.abs(half - other).mean() > 2


def test_variation_seed_is_shared_by_the_batch_and_recorded(pipe) -> None:
    result = _gen(pipe, seed=5, subseed=9, subseed_strength=0.3, batch_size=2)
    t = parse_infotext(result.infotexts[1])
    prompt, neg, params = t.prompt, t.negative_prompt, t.params
    assert params["Variation seed"] == "9" and params["Variation seed strength"] == "0.3"
    again = request_from_params(prompt, neg, params)
    assert (again.subseed, again.subseed_strength, again.seed) == (9, 0.3, 6)
    single = _px(pipe.generate(again).images[0])
    assert np.abs(single - _px(result.images[1])).max() <= 1


def test_random_variation_seed_is_drawn_only_when_used(pipe) -> None:
    assert GenerationRequest("x", seed=1).with_seed().subseed == -1
    drawn = GenerationRequest("x", seed=1, subseed_strength=0.2).with_seed().subseed
    assert 0 <= drawn < 2**32


# -- seed resize ----------------------------------------------------------------------------------


def test_paste_centred_places_and_crops() -> None:
    big, small = torch.zeros(1, 6, 6), torch.arange(4.0).reshape(1, 2, 2)
    out = paste_centred(big, small)
    assert torch.equal(out[:, 2:4, 2:4], small) and out.sum() == small.sum()
    cropped = paste_centred(torch.zeros(1, 2, 2), torch.arange(16.0).reshape(1, 4, 4))
    assert torch.equal(cropped, torch.tensor([[[5.0, 6.0], [9.0, 10.0]]]))


def test_seed_resize_keeps_the_seeds_noise_in_the_centre() -> None:
    small = SeededNoise([7], (4, 8, 8)).initial()[0]
    wide = SeededNoise([7], (4, 8, 12), resize_from=(4, 8, 8)).initial()[0]
    assert torch.equal(wide[:, :, 2:10], small)
    plain = SeededNoise([7], (4, 8, 12)).initial()[0]
    assert not torch.equal(wide, plain)
    # the generator continues after the full-size draw, as without resizing
    a = SeededNoise([7], (4, 8, 12), resize_from=(4, 8, 8))
    b = SeededNoise([7], (4, 8, 12))
    a.initial(), b.initial()
    assert torch.equal(a.draw(), b.draw())


def test_seed_resize_to_the_same_size_changes_nothing_and_is_recorded(pipe) -> None:
    base = _px(_gen(pipe).images[0])
    same = _gen(pipe, seed_resize_from=(64, 64))
    assert np.array_equal(_px(same.images[0]), base)
    resized = _gen(pipe, width=96, seed_resize_from=(64, 64))
    assert "Seed resize from: 64x64" in resized.infotexts[0]
    assert resized.images[0].size == (96, 64)


# -- seamless tiling --------------------------------------------------------------------------------


def test_circular_unet_commutes_with_circular_shifts(bundle) -> None:
    unet = circular(bundle.unet)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, bundle.unet.config.cross_attention_dim)
    t = torch.tensor([500.0])
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx).sample
        shifted = unet(torch.roll(x, (2, 4), (2, 3)), t, encoder_hidden_states=ctx).sample
        plain = bundle.unet(torch.roll(x, (2, 4), (2, 3)), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(shifted, torch.roll(out, (2, 4), (2, 3)), atol=1e-4)
    assert not torch.allclose(plain, torch.roll(out, (2, 4), (2, 3)), atol=1e-2)
    # the shared model is untouched and shares its weights with the clone
    assert all(
        m.padding_mode == "zeros" for m in bundle.unet.modules() if hasattr(m, "padding_mode")
    )
    assert unet.conv_in.weight is bundle.unet.conv_in.weight


def test_tiled_image_wraps_like_an_interior_seam(pipe) -> None:
    tiled = _px(_gen(pipe, tiling=True, steps=6).images[0]).astype(np.float64)
    plain = _px(_gen(pipe, steps=6).images[0]).astype(np.float64)

    def seam_ratio(img: np.ndarray) -> float:
        wrap = np.abs(img[:, 0] - img[:, -1]).mean() + np.abs(img[0] - img[-1]).mean()
        inner = np.mean(
            [np.abs(img[:, i] - img[:, i + 1]).mean() + np.abs(img[i] - img[i + 1]).mean()
             for i in range(8, 56)]
        )  # fmt: skip
        return wrap / inner

    assert seam_ratio(tiled) < 1.5, seam_ratio(tiled)
    assert seam_ratio(plain) > seam_ratio(tiled)


def test_tiling_is_recorded_and_read_back(pipe) -> None:
    result = _gen(pipe, tiling=True)
    t = parse_infotext(result.infotexts[0])
    prompt, neg, params = t.prompt, t.negative_prompt, t.params
    assert params["Tiling"] == "True"
    assert request_from_params(prompt, neg, params).tiling


# -- hires fix -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hires", "first", "upscale_to", "final"),
    [
        (HiresFix(scale=2.0), (64, 48), (128, 96), (128, 96)),
        (HiresFix(scale=1.5), (64, 64), (96, 96), (96, 96)),
        (HiresFix(resize_x=128), (64, 48), (128, 96), (128, 96)),
        (HiresFix(resize_y=96), (64, 48), (128, 96), (128, 96)),
        (HiresFix(resize_x=128, resize_y=128), (64, 48), (168, 128), (128, 128)),
        (HiresFix(resize_x=160, resize_y=96), (64, 64), (160, 160), (160, 96)),
    ],
)
def test_hires_target_size_rules(hires, first, upscale_to, final) -> None:
    size = hires_size(hires, *first, downsample=8)
    assert size.upscale_to == upscale_to
    assert size.final(8) == final


@pytest.mark.parametrize(
    "upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "Lanczos"]
)
def test_hires_fix_renders_at_the_larger_size(pipe, upscaler) -> None:
    calls: list[tuple[int, int]] = []
    hires = HiresFix(scale=1.5, upscaler=upscaler, steps=3, denoising_strength=0.5)
    result = pipe.generate(
        GenerationRequest("a red apple", steps=4, seed=5, hires=hires),
        progress=lambda info, index, total: calls.append((index, total)),
    )
    assert result.images[0].size == (96, 96)
    assert [c for c in calls if c[0] == 0] == [(0, 2)] * 4  # first pass, 4 steps
    assert [c for c in calls if c[0] == 1] == [(1, 2)] * 3  # exactly "Hires steps"
    info = result.infotexts[0]
    for needle in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 1.5",
                   "Hires steps: 3", f"Hires upscaler: {upscaler}"):  # fmt: skip
        assert needle in info


def test_hires_second_pass_refines_the_first(pipe) -> None:
    """Strength 0 returns the upscaled first pass; a low strength stays closer to it."""
    hr = lambda s: HiresFix(scale=1.5, denoising_strength=s)  # noqa: E731
    zero = _gen(pipe, steps=6, hires=hr(0.0)).images[0]
    low = _gen(pipe, steps=6, hires=hr(0.3)).images[0]
    high = _gen(pipe, steps=6, hires=hr(0.9)).images[0]
    d = lambda a, b: np.abs(_px(a) - _px(b)).mean()  # noqa: E731
    assert 0 < d(low, zero) < d(high, zero)


def test_hires_prompt_sampler_and_infotext_round_trip(pipe) -> None:
    hires = HiresFix(
        scale=1.5, steps=3, denoising_strength=0.8, sampler="Euler", prompt="a green pear",
        cfg_scale=30.0,
    )  # fmt: skip
    result = _gen(pipe, hires=hires)
    same_prompt = _gen(
        pipe,
        hires=HiresFix(scale=1.5, steps=3, denoising_strength=0.8, sampler="Euler", cfg_scale=30.0),
    )
    assert np.abs(_px(result.images[0]) - _px(same_prompt.images[0])).mean() > 1
    t = parse_infotext(result.infotexts[0])
    prompt, neg, params = t.prompt, t.negative_prompt, t.params
    assert params["Hires prompt"] == "a green pear" and params["Hires sampler"] == "Euler"
    again = request_from_params(prompt, neg, params)
    assert again.hires == hires
    assert np.abs(_px(pipe.generate(again).images[0]) - _px(result.images[0])).max() <= 1


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(hires=HiresFix(upscaler="ESRGAN_4x")), "unknown hires upscaler"),
        (dict(hires=HiresFix(scale=20)), "hires scale"),
        (dict(subseed_strength=2.0), "variation strength"),
        (dict(seed_resize_from=(3, 64)), "seed resize width"),
    ],
)
def test_bad_controls_are_clear_errors(pipe, kw, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        _gen(pipe, **kw)
