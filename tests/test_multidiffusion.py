"""MultiDiffusion: window coverage, exact fusion, region prompts, panoramas on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emaki.errors import InvalidRequestError
from emaki.infotext import parse_infotext
from emaki.request import GenerationRequest, RegionPrompt, TiledDiffusion, request_from_params
from emaki.sampling.multidiffusion import MultiDiffusion, Region, box_mask, windows


@pytest.mark.parametrize(
    ("h", "w", "win", "stride"),
    [(8, 20, (8, 8), (4, 4)), (13, 29, (8, 8), (3, 5)), (8, 8, (8, 8), (8, 8))],
)
def test_windows_cover_every_pixel_edges_included(h, w, win, stride) -> None:
    cover = torch.zeros(h, w)
    for t, left, wh, ww in windows(h, w, win, stride):
        assert t + wh <= h and left + ww <= w
        cover[t : t + wh, left : left + ww] += 1
    assert cover.min() >= 1


def test_pointwise_denoiser_fuses_to_the_whole_frame_result() -> None:
    """A translation-equivariant pointwise denoiser gives the same result window by window."""

    def inner(x, sigma, cond):
        return x / (1 + sigma[:, None, None, None] ** 2) + 0.1

    x = torch.randn(2, 4, 13, 29, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    md = MultiDiffusion(inner, window=(8, 8), stride=(3, 5))
    assert torch.allclose(md(x, sigma, None), inner(x, sigma, None), atol=1e-6)


@pytest.fixture(scope="module")
def denoiser(tiny_sd1_pipe):
    from emaki.pipelines.txt2img import Pipeline  # noqa: F401 (the fixture's type)

    pipe = tiny_sd1_pipe
    r = pipe.resolve(GenerationRequest("a red apple", seed=1, cfg_scale=5.0))
    return (
        pipe,
        pipe.denoiser(r),
        pipe.conditioning(r).conds,
        pipe.conditioning(pipe.resolve(GenerationRequest("a blue sky", seed=1))).conds,
    )


def test_full_window_equals_a_plain_call(denoiser) -> None:
    _, d, conds, _ = denoiser
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([5.0])
    plain = d(x, sigma, conds)
    assert torch.equal(MultiDiffusion(d, window=(8, 8), stride=(8, 8))(x, sigma, conds), plain)


def test_overlap_is_the_average_of_the_windows_estimates(denoiser) -> None:
    _, d, conds, _ = denoiser
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2)) * 5
    sigma = torch.tensor([5.0])
    fused = MultiDiffusion(d, window=(8, 8), stride=(8, 4))(x, sigma, conds)
    left, right = d(x[..., :8], sigma, conds), d(x[..., 4:], sigma, conds)
    close = dict(atol=1e-4, rtol=1e-4)  # batched windows round slightly apart from single calls
    assert torch.allclose(fused[..., :4], left[..., :4], **close)
    assert torch.allclose(fused[..., 4:8], (left[..., 4:] + right[..., :4]) / 2, **close)
    assert torch.allclose(fused[..., 8:], right[..., 4:], **close)


def test_region_prompts(denoiser) -> None:
    _, d, conds, sky = denoiser
    x = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(3)) * 5
    sigma = torch.tensor([5.0])
    base = MultiDiffusion(d, window=(8, 8), stride=(8, 8))(x, sigma, conds)
    everywhere = MultiDiffusion(
        d, window=(8, 8), stride=(8, 8), regions=[Region(sky, torch.ones(8, 24))]
    )
    assert torch.allclose(
        everywhere(x, sigma, conds),
        MultiDiffusion(d, window=(8, 8), stride=(8, 8))(x, sigma, sky),
        atol=1e-6,
    )
    boxed = MultiDiffusion(
        d, window=(8, 8), stride=(8, 8), regions=[Region(sky, box_mask((0, 0, 32, 64), 8, 24, 8))]
    )
    out = boxed(x, sigma, conds)
    assert torch.equal(out[..., 8:], base[..., 8:])  # windows the box does not touch
    assert not torch.allclose(out[..., :4], base[..., :4], atol=1e-4)


def test_bad_windows_and_masks() -> None:
    with pytest.raises(InvalidRequestError, match="stride"):
        windows(8, 8, (8, 8), (0, 4))
    with pytest.raises(InvalidRequestError, match="outside the image"):
        box_mask((1000, 1000, 1100, 1100), 8, 8, 8)
    md = MultiDiffusion(
        lambda x, s, c: x, window=(8, 8), stride=(4, 4), regions=[Region(None, torch.ones(3, 3))]
    )
    with pytest.raises(InvalidRequestError, match="region mask"):
        md(torch.zeros(1, 4, 8, 8), torch.ones(1), None)


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
