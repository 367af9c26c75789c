"""MultiDiffusion (Bar-Tal et al. 2023): windows, fusion (eq. 5), regions, and diffusers' panorama.

The fusion is checked analytically (a pointwise denoiser is unchanged by any tiling), against
the windows' own predictions on a tiny UNet, and side by side with diffusers'
``StableDiffusionPanoramaPipeline`` on the same tiny SD model, prompt embeddings and starting
latents (DDIM and Euler, plain and circular); then through the txt2img pipeline (``tiled``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPanoramaPipeline
from PIL import Image, ImageDraw
from torch import Tensor

from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.infotext import parse_infotext
from emaki.models.tiny import make_tiny_bundle
from emaki.prompts.encode import PromptConds, ScheduledCond, ScheduledGuidance
from emaki.request import GenerationRequest, RegionPrompt, TiledDiffusion, request_from_params
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.multidiffusion import (
    Bootstrap,
    MultiDiffusion,
    Region,
    box_mask,
    colour_palette,
    image_mask,
    windows,
)
from emaki.sampling.registry import get_sampler
from emaki.sampling.schedules import make_sigmas
from emaki.sampling.types import StepInfo

from side_by_side import alphas_cumprod, context, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def pointwise(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    """Translation-equivariant and pointwise: the exact x0 of unit-variance Gaussian data."""
    return x / (1 + sigma[:, None, None, None] ** 2)


def constant(x: Tensor, sigma: Tensor, cond: float) -> Tensor:
    """A "denoiser" whose estimate is its conditioning: the fusion then shows the weights."""
    return torch.full_like(x, cond)


class Recorder:
    """Wraps a denoiser; records every call's (batch size, cond) and input, and step reports."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, Any]] = []
        self.inputs: list[Tensor] = []
        self.steps: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        self.calls.append((x.shape[0], cond))
        self.inputs.append(x.clone())
        return self.inner(x, sigma, cond)

    def on_step(self, info: StepInfo) -> None:
        self.steps.append(info.i)


def latent(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- windows -----------------------------------------------------------------------------------


def _coverage(height: int, width: int, wins: list[tuple[int, int, int, int]]) -> Tensor:
    count = torch.zeros(height, width, dtype=torch.long)
    for top, left, h, w in wins:
        cols = [(left + j) % width for j in range(w)]
        count[top : top + h, cols] += 1
    return count


@pytest.mark.parametrize(
    ("height", "width", "window", "stride", "expected"),
    [
        (8, 8, 8, 4, 1),  # window == latent: one window
        (8, 24, 8, 8, 3),  # exact tiling
        (8, 24, 8, 4, 5),  # (24 - 8) / 4 + 1
        (8, 23, 8, 4, 5),  # 23 - 8 = 15: 4 strided + 1 flush with the right edge
        (13, 30, (6, 7), (5, 3), 3 * 9),  # rows 0 5 +7; columns 0 3 .. 21 +23
        (16, 16, 5, 5, 4 * 4),  # 0 5 10 +11
    ],
)
def test_windows_cover_everything(height, width, window, stride, expected) -> None:
    wins = windows(height, width, window, stride)
    assert len(wins) == expected
    assert len(set(wins)) == len(wins)
    for top, left, h, w in wins:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
    assert bool((_coverage(height, width, wins) >= 1).all())
    # from the top-left corner to flush with the bottom-right one
    assert wins[0][:2] == (0, 0)
    assert wins[-1][0] + wins[-1][2] == height and wins[-1][1] + wins[-1][3] == width


@pytest.mark.parametrize(("width", "window", "stride"), [(24, 8, 4), (24, 8, 8), (22, 8, 8)])
def test_circular_windows_wrap_and_cover(width: int, window: int, stride: int) -> None:
    wins = windows(8, width, window, stride, circular=True)
    assert len(wins) == math.ceil(width / stride)
    assert [left for _, left, _, _ in wins] == list(range(0, width, stride))
    count = _coverage(8, width, wins)
    assert bool((count >= 1).all())
    if width % stride == 0:  # then every column is covered equally often
        assert bool((count == window // stride).all())


@pytest.mark.parametrize(
    ("height", "width", "window", "stride", "circular"),
    [(16, 48, 16, 8, False), (24, 40, 16, 4, False), (16, 48, 16, 8, True), (16, 40, 8, 4, True)],
)
def test_windows_equal_diffusers_views(height, width, window, stride, circular) -> None:
    # diffusers' get_views takes pixels and divides by 8 (hard-coded); it does not use self.
    views = StableDiffusionPanoramaPipeline.get_views(
        None, height * 8, width * 8, window, stride, circular_padding=circular
    )
    ours = windows(height, width, window, stride, circular=circular)
    assert ours == [(top, left, b - top, r - left) for top, b, left, r in views]


# --- fusion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "stride", "circular", "batch_windows", "feather"),
    [
        (8, 4, False, 4, False),
        ((5, 7), (2, 3), False, 1, False),
        ((6, 9), (5, 9), False, 100, True),
        ((12, 6), 4, True, 3, False),
        ((12, 20), (3, 20), False, 2, True),
    ],
)
def test_pointwise_denoiser_is_unchanged(window, stride, circular, batch_windows, feather) -> None:
    x, sigma = latent((2, 4, 12, 20)), torch.tensor([0.5, 3.0])
    wh, ww = (window, window) if isinstance(window, int) else window
    weight = None
    if feather:  # a Gaussian window profile: eq. 5 holds for any positive per-window weights
        yy, xx = torch.meshgrid(torch.arange(wh) - wh / 2, torch.arange(ww) - ww / 2, indexing="ij")
        weight = torch.exp(-(yy**2 + xx**2) / 8) + 1e-3
    inner = Recorder(pointwise)
    md = MultiDiffusion(
        inner,
        window=window,
        stride=stride,
        circular=circular,
        batch_windows=batch_windows,
        window_weight=weight,
    )
    out = md(x, sigma, None)
    torch.testing.assert_close(out, pointwise(x, sigma, None), rtol=1e-6, atol=1e-6)
    # cost: one inner evaluation per window, in as few calls as the batch limit allows
    n = len(md.windows(12, 20))
    assert len(inner.calls) == math.ceil(n / batch_windows)
    assert sum(b for b, _ in inner.calls) == n * 2


@pytest.fixture(scope="module")
def unet_denoiser() -> DiscreteDenoiser:
    unet = tiny_unet()

    def model(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        ctx = cond.context.expand(x.shape[0], -1, -1)  # batch-1 conditioning for any batch
        return unet(x, t, encoder_hidden_states=ctx).sample

    return DiscreteDenoiser(model, DiscreteSchedule(alphas_cumprod()))


@torch.no_grad()
def test_unet_overlap_is_the_windows_average(unet_denoiser) -> None:
    x, sigma, cond = latent((2, 4, 8, 12)) * 3, torch.tensor([3.0, 3.0]), Conditioning(context(1))
    out = MultiDiffusion(unet_denoiser, window=8, stride=4)(x, sigma, cond)
    left = unet_denoiser(x[..., 0:8], sigma, cond)  # the two windows, each alone
    right = unet_denoiser(x[..., 4:12], sigma, cond)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out[..., 0:4], left[..., 0:4], **tol)
    torch.testing.assert_close(out[..., 4:8], (left[..., 4:8] + right[..., 0:4]) / 2, **tol)
    torch.testing.assert_close(out[..., 8:12], right[..., 4:8], **tol)
    assert float((left[..., 4:8] - right[..., 0:4]).abs().max()) > 1e-2  # the windows disagree


@torch.no_grad()
def test_full_window_is_a_plain_call_bit_exactly(unet_denoiser) -> None:
    x, sigma, cond = latent((2, 4, 8, 12)) * 3, torch.tensor([3.0, 1.0]), Conditioning(context(1))
    md = MultiDiffusion(unet_denoiser, window=(8, 12), stride=4)
    assert torch.equal(md(x, sigma, cond), unet_denoiser(x, sigma, cond))


@torch.no_grad()
def test_any_sampler_with_scheduled_guidance_and_on_step(unet_denoiser) -> None:
    guided = ScheduledGuidance(CFGDenoiser(unet_denoiser, 5.0))
    md = MultiDiffusion(guided, window=8, stride=4)
    sigmas = make_sigmas(DiscreteSchedule(alphas_cumprod()), "karras", 4)
    x = latent((1, 4, 8, 16)) * sigmas[0]
    ctx = context(1)  # prompt editing: the positive prompt switches after step 1
    pos = ScheduledCond((1, 1000), (Conditioning(ctx), Conditioning(-ctx)))
    conds = PromptConds(((1.0, pos),), ScheduledCond((1000,), (Conditioning(context(1, 5)),)))
    seen: list[int] = []

    def callback(info: StepInfo) -> None:
        md.on_step(info)  # forwarded to ScheduledGuidance, which advances its step
        seen.append(guided.step)

    out = get_sampler("dpmpp_2m")(md, x, sigmas, cond=conds, callback=callback)
    assert seen == [1, 2, 3, 4] and bool(out.isfinite().all())
    MultiDiffusion(pointwise, window=4, stride=2).on_step(StepInfo(0, 1, 1.0, x, x))  # no hook


def test_gradients_flow_through_the_fusion() -> None:
    x = latent((1, 4, 8, 12)).requires_grad_()
    for circular in (False, True):
        md = MultiDiffusion(lambda x, s, c: 2 * x, window=8, stride=4, circular=circular)
        (grad,) = torch.autograd.grad(md(x, torch.ones(1), None).sum(), x)
        torch.testing.assert_close(grad, torch.full_like(x, 2.0))


# --- side by side with diffusers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle("sd1")


def _embeddings(bundle, text: str) -> Tensor:
    ids = bundle.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt")
    return bundle.text_encoder(ids.input_ids)[0]  # [1, 77, 32]


@pytest.mark.parametrize(
    ("scheduler", "circular"), [("ddim", False), ("euler", False), ("ddim", True)]
)
@torch.no_grad()
def test_panorama_matches_diffusers(bundle, scheduler: str, circular: bool) -> None:
    steps, scale, window, stride = 5, 7.5, 16, 8
    height, width = 16, 40  # latent pixels: 4 views (circular: 5, the last one wraps)
    pos, neg = _embeddings(bundle, "a wide mountain valley"), _embeddings(bundle, "")
    # diffusers' DDIM ends at alphas_cumprod = 1 with set_alpha_to_one, emaki at sigma = 0; the
    # "leading" spacing with steps_offset 1 (SD's config) is emaki's ddim_uniform schedule.
    config = {**bundle.scheduler_config, "clip_sample": False, "set_alpha_to_one": True}
    sched = (DDIMScheduler if scheduler == "ddim" else EulerDiscreteScheduler).from_config(config)
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    sigmas = make_sigmas(schedule, "ddim_uniform", steps)
    noise = latent((1, 4, height, width), seed=4)

    pipe = StableDiffusionPanoramaPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # __call__ passes get_views only the size, so the window is its default of 64 latent pixels
    # (512 px, and the tiny VAE is 8x as well): give this instance our window and stride.
    base = StableDiffusionPanoramaPipeline.get_views
    pipe.get_views = lambda h, w, circular_padding=False: base(
        pipe, h, w, window, stride, circular_padding
    )
    sched.set_timesteps(steps)
    sigma0 = float(sigmas[0])
    # prepare_latents multiplies by init_noise_sigma; DDIM's sample is VP, x / sqrt(1 + s^2).
    start = noise * sigma0 / (1 + sigma0**2) ** 0.5 if scheduler == "ddim" else noise * sigma0
    theirs = pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=height * 8,
        width=width * 8,
        num_inference_steps=steps,
        guidance_scale=scale,
        view_batch_size=3,
        latents=start / sched.init_noise_sigma,
        output_type="latent",
        circular_padding=circular,
    ).images

    inner = DiscreteDenoiser(
        lambda x, t, c: bundle.unet(x, t, encoder_hidden_states=c.context).sample, schedule
    )
    md = MultiDiffusion(
        CFGDenoiser(inner, scale), window=window, stride=stride, batch_windows=3, circular=circular
    )
    sampler = get_sampler("ddim" if scheduler == "ddim" else "euler")
    cond = GuidedCond(Conditioning(pos), Conditioning(neg))
    ours = sampler(md, noise * sigma0, sigmas, cond=cond)

    diff, size = float((ours - theirs).abs().max()), float(theirs.abs().max())
    print(f"panorama {scheduler} circular={circular}: max |diff| {diff:.2e}, max |x| {size:.2f}")
    assert size > 0.1
    assert diff < 1e-4


# --- regions -----------------------------------------------------------------------------------


def test_region_weights_follow_bar_tal() -> None:
    x, sigma = latent((1, 4, 8, 8)), torch.ones(1)
    m = torch.linspace(0, 1, 8).expand(8, 8)  # a soft mask ramping from left to right
    region = Region(5.0, m)
    out = MultiDiffusion(constant, window=4, stride=2, regions=[region])(x, sigma, 1.0)
    # complement background: (m * 5 + (1 - m) * 1) / (m + 1 - m)
    torch.testing.assert_close(out, (m * 5 + (1 - m)).expand_as(x))
    full = MultiDiffusion(constant, window=4, stride=2, regions=[region], background="full")
    torch.testing.assert_close(full(x, sigma, 1.0), ((m * 5 + 1) / (m + 1)).expand_as(x))
    # overlapping regions: where their masks sum past 1 the background drops out
    two = MultiDiffusion(constant, window=4, stride=2, regions=[region, Region(2.0, m)])
    expected = (m * 5 + m * 2 + (1 - 2 * m).clamp(min=0)) / torch.maximum(2 * m, torch.ones(1))
    torch.testing.assert_close(two(x, sigma, 1.0), expected.expand_as(x))


@torch.no_grad()
def test_region_covering_everything_is_its_prompt_alone(unet_denoiser) -> None:
    x, sigma = latent((1, 4, 8, 16)) * 3, torch.tensor([3.0])
    bg, fg = Conditioning(context(1, seed=1)), Conditioning(context(1, seed=9))
    inner = Recorder(unet_denoiser)
    region = Region(fg, torch.ones(8, 16))
    out = MultiDiffusion(inner, window=8, stride=4, regions=[region])(x, sigma, bg)
    alone = MultiDiffusion(unet_denoiser, window=8, stride=4)(x, sigma, fg)
    assert torch.equal(out, alone)
    assert all(c is fg for _, c in inner.calls)  # the background's weight is 0: never evaluated


@torch.no_grad()
def test_box_region_changes_only_its_windows(unet_denoiser) -> None:
    x, sigma = latent((1, 4, 8, 20)) * 3, torch.tensor([3.0])
    bg, fg = Conditioning(context(1, seed=1)), Conditioning(context(1, seed=9))
    mask = box_mask((8, 16, 28, 48), 8, 20)  # latent rows 2-5, columns 1-2 and half of 3
    assert mask[2:6, 0].tolist() == [0.0] * 4 and mask[2:6, 1:3].flatten().tolist() == [1.0] * 8
    assert mask[2:6, 3].tolist() == [0.5] * 4 and float(mask.sum()) == 4 * 2.5
    inner = Recorder(unet_denoiser)
    out = MultiDiffusion(inner, window=8, stride=4, regions=[Region(fg, mask)])(x, sigma, bg)
    plain = MultiDiffusion(unet_denoiser, window=8, stride=4)(x, sigma, bg)
    # the region's prompt runs only on the one window that overlaps the box (columns 0-7)...
    assert [b for b, c in inner.calls if c is fg] == [1]
    # ...and the fused estimate moves only where the region's weight is non-zero
    inside = (mask > 0).expand_as(x)
    assert torch.equal(out[~inside], plain[~inside])
    assert float((out - plain)[inside].abs().min()) > 0
    # where the mask is 1 only window 0 covers it (columns 1-2): the region's own prediction
    fg_win = unet_denoiser(x[..., 0:8], sigma, fg)
    torch.testing.assert_close(out[..., 2:6, 1:3], fg_win[..., 2:6, 1:3], rtol=1e-5, atol=1e-5)


def test_image_mask_equals_box_mask() -> None:
    image = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(image).rectangle((10, 20, 49, 43), fill=255)  # PIL: inclusive corners
    torch.testing.assert_close(image_mask(image, 8, 12), box_mask((10, 20, 50, 44), 8, 12))
    assert image_mask(image.convert("RGB"), 8, 12).shape == (8, 12)
    # a box reaching past the image is clipped to it
    assert torch.equal(box_mask((-40, 0, 1000, 64), 8, 12), torch.ones(8, 12))


def test_bootstrap_replaces_the_background_early_only() -> None:
    x = latent((2, 4, 8, 8))
    mask = box_mask((16, 16, 48, 48), 8, 8)  # latent rows and columns 2-5
    palette = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    boot = Bootstrap.for_steps(sigmas, 0.5, palette, seed=3)
    assert boot.until_sigma == 2.0  # steps 0 and 1 (sigma 10 and 5) are bootstrapped
    inner = Recorder(pointwise)
    md = MultiDiffusion(inner, window=8, stride=4, regions=[Region("fg", mask)], bootstrap=boot)
    md(x, torch.full((2,), 5.0), "bg")
    seen = inner.inputs[-1]  # the region's input (one window: the whole latent)
    assert torch.equal(seen[..., 2:6, 2:6], x[..., 2:6, 2:6])  # inside the mask: unchanged
    # outside: colour + 5 n, with n a fixed draw from the seed, the colour from the palette
    colour = (seen[..., 0, 0] - 5 * latent(x.shape, seed=3)[..., 0, 0])[0]
    assert any(torch.allclose(colour, p, atol=1e-5) for p in palette)
    # a pure function: the same call gives the same input; from until_sigma on, the input is x
    md(x, torch.full((2,), 5.0), "bg")
    assert torch.equal(inner.inputs[-1], seen)
    md(x, torch.full((2,), 2.0), "bg")
    assert torch.equal(inner.inputs[-1], x)


def test_colour_palette_averages_encoded_flat_colours() -> None:
    # a stand-in "encoder": 2 channels of the image, 8x smaller, doubled
    palette = colour_palette(lambda img: img[:, :2, ::8, ::8] * 2, count=5, seed=1, size=16)
    rgb = torch.rand(5, 3, 1, 1, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(palette, rgb[:, :2, 0, 0] * 2)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 8, "stride": 0}, "stride"),
        ({"window": 8, "stride": 9}, "stride"),
        ({"window": (8, 4), "stride": (4, 5)}, "stride"),
        ({"window": 0, "stride": 1}, "window"),
        ({"window": 8, "stride": 4, "batch_windows": 0}, "batch_windows"),
        ({"window": 8, "stride": 4, "background": "none"}, "background"),
        ({"window": 8, "stride": 4, "window_weight": torch.ones(4, 4)}, "window_weight"),
        (
            {
                "window": 8,
                "stride": 4,
                "regions": [Region(1, torch.ones(8, 8)), Region(2, torch.ones(8, 9))],
            },
            "different shapes",
        ),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        MultiDiffusion(pointwise, **kwargs)


def test_bad_inputs() -> None:
    x, sigma = latent((1, 4, 8, 16)), torch.ones(1)
    with pytest.raises(InvalidRequestError, match="larger than the latent"):
        MultiDiffusion(pointwise, window=(8, 20), stride=4)(x, sigma, None)
    with pytest.raises(InvalidRequestError, match="larger than the latent"):
        MultiDiffusion(pointwise, window=(9, 8), stride=4, circular=True)(x, sigma, None)
    with pytest.raises(InvalidRequestError, match="stride"):
        windows(8, 8, (8, 8), (0, 4))
    bad_mask = MultiDiffusion(pointwise, window=8, stride=4, regions=[Region(1, torch.ones(8, 8))])
    with pytest.raises(InvalidRequestError, match="does not match the latent 8x16"):
        bad_mask(x, sigma, None)
    with pytest.raises(InvalidRequestError, match=r"\[0, 1\]"):
        Region(1, torch.full((8, 8), 1.5))
    with pytest.raises(InvalidRequestError, match="2-D"):
        Region(1, torch.ones(1, 8, 8))
    with pytest.raises(InvalidRequestError, match="outside the image"):
        box_mask((1000, 1000, 1100, 1100), 8, 8)
    with pytest.raises(InvalidRequestError, match="x0 < x1"):
        box_mask((10, 0, 10, 10), 8, 8)
    with pytest.raises(InvalidRequestError, match="same size"):
        image_mask(Image.new("L", (60, 64)), 8, 8)
    with pytest.raises(InvalidRequestError, match="fraction"):
        Bootstrap.for_steps(torch.ones(5), 1.5, torch.ones(2, 4))
    with pytest.raises(InvalidRequestError, match="palette"):
        Bootstrap(1.0, torch.ones(4))


# --- through the pipeline ----------------------------------------------------------------------


def test_panorama_with_a_region_on_a_tiny_model(tiny_sd1_pipe) -> None:
    tiled = TiledDiffusion(stride=32, regions=(RegionPrompt("a blue sky", box=(0, 0, 64, 32)),))
    req = GenerationRequest("a red apple", steps=3, seed=2, width=160, height=64, tiled=tiled)
    result = tiny_sd1_pipe.generate(req)
    assert result.images[0].size == (160, 64)
    t = parse_infotext(result.infotexts[0])
    assert t.params["MultiDiffusion"] == "window 64, stride 32"
    again = request_from_params(t.prompt, t.negative_prompt, t.params)
    assert again.tiled == TiledDiffusion(window=64, stride=32, regions=tiled.regions)
    same = tiny_sd1_pipe.generate(again).images[0]
    assert np.abs(np.asarray(same, np.int16) - np.asarray(result.images[0], np.int16)).max() <= 1


def test_bad_tiled_settings(tiny_sd1_pipe) -> None:
    with pytest.raises(InvalidRequestError, match="multiples of 8"):
        tiny_sd1_pipe.generate(GenerationRequest("x", tiled=TiledDiffusion(window=60)))
    with pytest.raises(InvalidRequestError, match="exactly one of a box or a mask"):
        tiny_sd1_pipe.generate(
            GenerationRequest("x", tiled=TiledDiffusion(regions=(RegionPrompt("y"),)))
        )


def test_tiled_integrates_with_small_sides_inpainting_and_hires(tiny_sd1_pipe) -> None:
    from PIL import Image

    from emaki.request import HiresFix, InitImage

    pipe = tiny_sd1_pipe
    thin = pipe.generate(
        GenerationRequest("x", steps=2, seed=1, width=192, height=32, tiled=TiledDiffusion())
    )
    assert thin.images[0].size == (192, 32)  # the window shrinks to the short side
    init = Image.new("RGB", (128, 64), (40, 160, 40))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (64, 0, 128, 64))
    req = GenerationRequest(
        "x", steps=3, seed=1, denoising_strength=0.9, tiled=TiledDiffusion(),
        init=InitImage(init, mask=mask, mask_blur=0),
    )  # fmt: skip
    out = np.asarray(pipe.generate(req).images[0], np.int16)
    assert (out[:, :56] == (40, 160, 40)).all()  # the masked denoiser wraps the tiled one
    assert np.abs(out[:, 72:] - (40, 160, 40)).mean() > 5
    tiled = TiledDiffusion(regions=(RegionPrompt("a blue sky", box=(0, 0, 64, 32)),))
    hires = pipe.generate(
        GenerationRequest(
            "x",
            steps=2,
            seed=1,
            width=128,
            height=64,
            tiled=tiled,
            hires=HiresFix(scale=1.5, steps=2, denoising_strength=0.5),
        )
    )
    assert hires.images[0].size == (192, 96)
