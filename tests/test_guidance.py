"""Guidance and thresholding against diffusers' implementations and analytic cases."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from emaki.conditioning import Conditioning
from emaki.sampling.denoisers import thresholded
from emaki.sampling.guidance import CFGDenoiser, GuidedCond


def _fake_eps_model(eps_by_id: dict[float, torch.Tensor]):
    """A denoiser whose epsilon is looked up by the conditioning's value (first element)."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        eps = torch.stack([eps_by_id[float(c[0, 0])] for c in cond.context])
        return x - sigma[:, None, None, None] * eps

    return denoiser


def _pair() -> tuple[GuidedCond, dict[float, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    eps_pos, eps_neg = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g) * 2
    cond = GuidedCond(Conditioning(torch.ones(1, 3, 5)), Conditioning(torch.zeros(1, 3, 5)))
    return cond, {1.0: eps_pos, 0.0: eps_neg}


def test_cfg_is_negative_plus_scale_times_difference() -> None:
    cond, eps = _pair()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    out = CFGDenoiser(_fake_eps_model(eps), scale=7.5)(x, sigma, cond)
    expected_eps = eps[0.0] + 7.5 * (eps[1.0] - eps[0.0])
    assert torch.allclose(out, x - 3.0 * expected_eps, atol=1e-5)


def test_cfg_scale_one_uses_only_the_positive_prompt() -> None:
    cond, eps = _pair()
    calls: list[int] = []
    inner = _fake_eps_model(eps)

    def counting(x, sigma, c):
        calls.append(x.shape[0])
        return inner(x, sigma, c)

    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    out = CFGDenoiser(counting, scale=1.0)(x, sigma, cond)
    assert calls == [1]
    assert torch.allclose(out, x - 2.0 * eps[1.0])


def test_guidance_rescale_matches_diffusers() -> None:
    cond, eps = _pair()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 5.0])
    out = CFGDenoiser(_fake_eps_model(eps), scale=9.0, rescale=0.7)(x, sigma, cond)
    eps_cfg = (eps[0.0] + 9.0 * (eps[1.0] - eps[0.0]))[None].expand(2, -1, -1, -1)
    expected = rescale_noise_cfg(eps_cfg, eps[1.0][None].expand(2, -1, -1, -1), 0.7)
    assert torch.allclose((x - out) / 5.0, expected, atol=1e-5)


def test_cfg_with_prompts_of_different_lengths_makes_two_calls() -> None:
    _, eps = _pair()
    cond = GuidedCond(Conditioning(torch.ones(1, 6, 5)), Conditioning(torch.zeros(1, 3, 5)))
    calls: list[int] = []
    inner = _fake_eps_model(eps)

    def counting(x, sigma, c):
        calls.append(c.context.shape[1])
        return inner(x, sigma, c)

    CFGDenoiser(counting, scale=5.0)(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), cond)
    assert sorted(calls) == [3, 6]


def test_dynamic_thresholding_matches_diffusers() -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 16, 16, generator=g) * torch.tensor([0.3, 1.5, 4.0])[:, None, None, None]
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    expected = sched._threshold_sample(x0.clone())
    ours = thresholded(lambda x, s, c: x, percentile=0.9, max_threshold=2.5)(x0, None, None)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.equal(ours[0], x0[0].clamp(-1, 1))  # small samples: s = 1, plain clipping
    assert float(ours.abs().max()) <= 1.0
