"""BrownianNoise: per-image seeded Brownian-motion noise for SDE samplers.

The noise over (a, b) is ``(W(b) - W(a)) / sqrt(|b - a|)`` for one fixed path W per seed: unit
normal, independent over disjoint intervals, additive over sub-intervals, and a function of the
seed alone (not of batch size, batch position or query order).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from emaki.sampling.brownian import BrownianNoise
from emaki.sampling.dpm_solvers import sample_dpmpp_2m_sde
from emaki.sampling.noise import SeededNoise

from analytic import karras_sigmas, two_moons_mixture

LO, HI = 0.03, 15.0


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _many(n_seeds: int = 300, width: int = 32) -> BrownianNoise:
    return BrownianNoise(range(n_seeds), (width,), LO, HI, dtype=torch.float64)


def test_disjoint_increments_are_independent_standard_normals() -> None:
    noise = _many()
    # Long, short and tiny intervals, descending as samplers query them, sharing endpoints.
    draws = [noise(_t(a), _t(b)).flatten() for a, b in [(12.0, 5.0), (5.0, 4.7), (0.05, 0.0301)]]
    n = draws[0].numel()  # 9600 samples each: SE of the mean 0.010, of the variance 0.014
    for z in draws:
        assert abs(float(z.mean())) < 0.05
        assert abs(float(z.var()) - 1) < 0.07
    for i in range(3):
        for j in range(i + 1, 3):
            corr = float(torch.corrcoef(torch.stack([draws[i], draws[j]]))[0, 1])
            assert abs(corr) < 5 / math.sqrt(n), (i, j, corr)


def test_overlapping_increments_correlate_as_one_path() -> None:
    """DPM++ SDE draws over (sigma, sigma_mid) and (sigma, sigma_next): the overlap correlates
    them by sqrt(overlap / length) -- what makes its two stages a consistent SDE step."""
    noise = _many()
    sigma, sigma_next = 6.0, 2.0
    sigma_mid = math.sqrt(sigma * sigma_next)
    first, second = (
        noise(_t(sigma), _t(sigma_mid)).flatten(),
        noise(_t(sigma), _t(sigma_next)).flatten(),
    )
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr - math.sqrt((sigma - sigma_mid) / (sigma - sigma_next))) < 0.03


def test_increments_add_up_over_sub_intervals() -> None:
    noise = BrownianNoise([0, 1], (3, 5), LO, HI, dtype=torch.float64)

    def w(a: float, b: float) -> torch.Tensor:  # W(b) - W(a)
        return noise(_t(a), _t(b)) * math.sqrt(abs(b - a))

    points = [HI, 9.123456789, 3.3, 0.51, 0.0457, LO]
    total = w(points[0], points[-1])
    parts = sum(w(a, b) for a, b in itertools.pairwise(points))
    torch.testing.assert_close(parts, total, rtol=0, atol=1e-12)
    # Inside one step too: a lambda-midpoint split.
    mid = math.sqrt(3.3 * 0.51)
    torch.testing.assert_close(w(3.3, mid) + w(mid, 0.51), w(3.3, 0.51), rtol=0, atol=1e-12)


def test_same_seed_gives_same_noise_in_any_query_order() -> None:
    queries = [(14.0, 7.0), (7.0, 3.0), (3.0, 1.0), (1.0, 0.2), (0.2, 0.04)]
    first = BrownianNoise([42], (4, 8, 8), LO, HI)
    second = BrownianNoise([42], (4, 8, 8), LO, HI)
    a = [first(_t(s), _t(sn)) for s, sn in queries]
    b = [second(_t(s), _t(sn)) for s, sn in reversed(queries)][::-1]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_images_in_a_batch_get_their_own_paths() -> None:
    z = BrownianNoise([5, 6, 5], (4, 8, 8), LO, HI)(_t(10.0), _t(4.0))
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert not torch.allclose(z[0], z[1])
    assert torch.equal(z[0], z[2])  # the seed, not the position, defines the path


def test_noise_does_not_depend_on_batch_size() -> None:
    alone = BrownianNoise([11], (4, 8, 8), LO, HI)
    batch = BrownianNoise([11, 12, 13], (4, 8, 8), LO, HI)
    for s, sn in [(15.0, 8.0), (8.0, 8.0 * 0.97), (0.5, 0.03)]:
        assert torch.equal(alone(_t(s), _t(sn))[0], batch(_t(s), _t(sn))[0])


def test_seed_is_not_the_initial_noise_stream() -> None:
    """The pipeline may seed both SeededNoise (initial latent) and BrownianNoise with the image
    seed; the Brownian draws must not replay the initial noise."""
    shape = (4, 64, 64)
    initial = SeededNoise([7], shape).initial().flatten().double()
    raw64 = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    brownian = BrownianNoise([7], shape, LO, HI)
    for a, b in [(HI, LO), (HI, 7.0), (1.0, 0.5)]:
        z = brownian(_t(a), _t(b)).flatten().double()
        for other in (initial, raw64.flatten()):
            assert abs(float(torch.corrcoef(torch.stack([other, z]))[0, 1])) < 0.05  # SE 0.008


def test_queries_outside_the_interval_are_refused() -> None:
    noise = BrownianNoise([0], (2,), LO, HI)
    with pytest.raises(ValueError, match="outside"):
        noise(_t(1.0), _t(0.0))
    with pytest.raises(ValueError):
        BrownianNoise([0], (2,), 0.0, HI)
    assert torch.equal(noise(_t(2.0), _t(2.0)), torch.zeros(1, 2))


def test_sde_sampler_results_converge_as_steps_grow() -> None:
    """Refining the steps refines the same path, so an SDE sampler's result with Brownian noise
    changes little with the step count; with fresh noise per step it changes completely."""
    gm = two_moons_mixture()
    n, sigma_min, sigma_max = 512, 1e-2, 20.0
    x = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * sigma_max

    def run(steps: int, brownian: bool) -> torch.Tensor:
        if brownian:
            source = BrownianNoise([3], (n, gm.dim), sigma_min, sigma_max, dtype=torch.float64)
        else:
            source = SeededNoise([3], (n, gm.dim), dtype=torch.float64)
        sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max)
        return sample_dpmpp_2m_sde(gm.denoiser, x, sigmas, noise=lambda s, sn: source(s, sn)[0])

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt())

    fine = run(100, brownian=True)
    coarse, mid = rms(run(25, True), fine), rms(run(50, True), fine)
    fresh = rms(run(50, False), run(100, False))
    assert mid < coarse < 0.3 * fresh, (coarse, mid, fresh)
