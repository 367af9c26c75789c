"""MultiDiffusion: many overlapping window denoisings fused into one, as a denoiser wrapper.

Bar-Tal, Yariv, Lipman & Dekel 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled
Image Generation". A model trained on one image size denoises a larger latent window by window;
at every evaluation the windows' estimates are fused by the closed-form least-squares solution
of the paper's eq. 3 (its eq. 5)::

    F(x) = sum_i F_i^-1(W_i * D(F_i(x) | y_i)) / sum_i F_i^-1(W_i)

where ``F_i`` crops window ``i`` out of the latent, ``F_i^-1`` pastes it back (zero elsewhere),
``y_i`` is the conditioning of path ``i`` and ``W_i`` its per-pixel weights. The paper fuses the
noisy samples after each diffusion step; emaki fuses the denoiser's x0 estimates instead, which
is the same thing for every deterministic sampler, since a sampler step is affine in the x0
estimate with the same coefficients at every pixel (checked against diffusers'
``StableDiffusionPanoramaPipeline`` in ``tests/test_multidiffusion.py``). Because the result is
again a denoiser, any sampler, schedule and guidance work unchanged.

Paths are (window, prompt) pairs: the background prompt (the ``cond`` of the call) and any
:class:`Region` prompts, each over every window. Weights follow Bar-Tal's region-based mode
(sec. 4.2 and the authors' code): a region's weight is its mask, the background's is the
complement ``max(0, 1 - sum of region masks)`` (``background="complement"``, the default), so
inside a mask of 1 only the region's prompt counts. ``background="full"`` weighs the
background 1 everywhere instead (regions then blend with it). An optional ``window_weight``
multiplies every window's weights (e.g. a Gaussian, to feather tile seams). Pairs whose weights
are all zero are skipped, so a small region costs only the windows that touch it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser, append_dims
from emaki.sampling.types import StepInfo

#: A window in latent pixels: ``(top, left, height, width)``. With circular windows ``left +
#: width`` may pass the right edge; the window then continues at column 0.
Window = tuple[int, int, int, int]

#: A size in latent pixels: one int for both sides, or ``(height, width)``.
Size = int | tuple[int, int]


def _pair(value: Size, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise InvalidRequestError(f"MultiDiffusion {name} must be an int or (height, width) ints")
    return pair  # type: ignore[return-value]


def _check_window_stride(window: tuple[int, int], stride: tuple[int, int]) -> None:
    if min(window) <= 0:
        raise InvalidRequestError(f"MultiDiffusion window {window} must be positive")
    for s, w, axis in zip(stride, window, ("height", "width")):
        if s <= 0 or s > w:
            raise InvalidRequestError(
                f"MultiDiffusion stride {stride} must be between 1 and the window {window} "
                f"along the {axis} (a larger stride would leave gaps between windows)"
            )


def _starts(size: int, window: int, stride: int, circular: bool) -> list[int]:
    """Window offsets along one axis, covering all of ``size``."""
    if window == size:
        return [0]
    if circular:
        # Offsets a stride apart all round the circle; the last windows wrap onto the first
        # columns, so there is no edge to be flush with. ceil(size / stride) offsets leave no
        # gap wider than the stride (diffusers takes floor, which can leave columns uncovered).
        return list(range(0, size, stride))
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        # (size - window) is not a multiple of the stride: one more window, flush with the edge.
        starts.append(size - window)
    return starts


def windows(
    height: int, width: int, window: Size, stride: Size, *, circular: bool = False
) -> list[Window]:
    """The windows that tile a ``height`` x ``width`` latent (the paper's crops ``F_i``, eq. 7).

    Windows step by ``stride`` from the top-left corner, row by row; when ``size - window`` is
    not a multiple of the stride a last row/column of windows is added flush with the bottom /
    right edge, so every latent pixel is covered. ``circular`` lets windows wrap round the
    horizontal edge (360° panoramas, diffusers' ``circular_padding``): offsets then run a
    stride apart all the way round the width. ``window`` and ``stride`` are in latent pixels.
    """
    win, step = _pair(window, "window"), _pair(stride, "stride")
    _check_window_stride(win, step)
    if win[0] > height or win[1] > width:
        raise InvalidRequestError(
            f"MultiDiffusion window {win[0]}x{win[1]} is larger than the latent "
            f"{height}x{width} (latent pixels; use a window no larger than the image)"
        )
    tops = _starts(height, win[0], step[0], circular=False)
    lefts = _starts(width, win[1], step[1], circular)
    return [(top, left, win[0], win[1]) for top in tops for left in lefts]


def _columns(window: Window, width: int, device: torch.device) -> Tensor | None:
    """Column indices of a window that wraps round the right edge; None if it does not."""
    _, left, _, w = window
    if left + w <= width:
        return None
    return (left + torch.arange(w, device=device)) % width


def crop_window(t: Tensor, window: Window) -> Tensor:
    """``t[..., window]`` for a tensor [..., H, W]: [..., h, w] (a view unless it wraps)."""
    top, left, h, w = window
    rows = t[..., top : top + h, :]
    cols = _columns(window, t.shape[-1], t.device)
    return rows[..., left : left + w] if cols is None else rows.index_select(-1, cols)


def _paste_add(acc: Tensor, window: Window, value: Tensor) -> None:
    """``acc[..., window] += value`` in place (the paper's F_i^-1, accumulated)."""
    top, left, h, w = window
    rows = acc[..., top : top + h, :]
    cols = _columns(window, acc.shape[-1], acc.device)
    if cols is None:
        rows[..., left : left + w].add_(value)  # not ``+=``: its setitem breaks under autograd
    else:
        rows.index_add_(acc.ndim - 1, cols, value)


# --- region masks ------------------------------------------------------------------------------


def box_mask(
    box: tuple[float, float, float, float], height: int, width: int, factor: int = 8
) -> Tensor:
    """A mask [height, width] (latent pixels) of a pixel box ``(x0, y0, x1, y1)``, PIL-style.

    The image is ``width * factor`` x ``height * factor`` pixels (``factor``: the VAE's
    downscale). The box is clipped to the image; each latent cell holds the fraction of its
    ``factor`` x ``factor`` pixels inside it, i.e. the box's binary pixel mask average-pooled to
    the latent grid: a box on the latent grid gives exact 0/1, one off the grid soft edges.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise InvalidRequestError(f"a region box is (x0, y0, x1, y1) with x0 < x1, y0 < y1: {box}")
    if x1 <= 0 or y1 <= 0 or x0 >= width * factor or y0 >= height * factor:
        raise InvalidRequestError(
            f"the region box {tuple(box)} lies outside the image "
            f"({width * factor}x{height * factor} pixels)"
        )

    def coverage(lo: float, hi: float, cells: int) -> Tensor:  # [cells], in [0, 1]
        edges = torch.arange(cells, dtype=torch.float64) * factor
        return ((edges + factor).clamp(max=hi) - edges.clamp(min=lo)).clamp(min=0) / factor

    mask = coverage(y0, y1, height)[:, None] * coverage(x0, x1, width)[None, :]
    return mask.to(torch.float32)  # [H, W]


def image_mask(image: Image.Image, height: int, width: int, factor: int = 8) -> Tensor:
    """A mask [height, width] (latent pixels) from a mask image (white = region, black = not).

    The image (any mode; read as greyscale) must be the generated image's size,
    ``width * factor`` x ``height * factor``; it is average-pooled over ``factor`` x ``factor``
    cells, like :func:`box_mask`.
    """
    if image.size != (width * factor, height * factor):
        raise InvalidRequestError(
            f"a region mask image is {image.size[0]}x{image.size[1]}, the image is "
            f"{width * factor}x{height * factor} (they must be the same size)"
        )
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0  # [H * f, W * f]
    cells = grey.reshape(height, factor, width, factor).mean(axis=(1, 3))
    return torch.from_numpy(np.ascontiguousarray(cells))


@dataclass(frozen=True)
class Region:
    """A region prompt: ``cond`` (what the inner denoiser takes, e.g. a ``PromptConds``) weighted
    by ``mask`` [H, W], latent resolution, values in [0, 1] (see :func:`box_mask`,
    :func:`image_mask`)."""

    cond: Any
    mask: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.mask, Tensor) or self.mask.ndim != 2:
            raise InvalidRequestError("a region mask must be a 2-D tensor [height, width]")
        if not bool(((self.mask >= 0) & (self.mask <= 1)).all()):
            raise InvalidRequestError("a region mask must have values in [0, 1]")


# --- bootstrapping -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bootstrap:
    """Bar-Tal et al.'s bootstrapping (sec. 4.2): early on, regions see a flat noisy background.

    While ``sigma > until_sigma``, a region's prompt is evaluated on ``m x + (1 - m) b`` instead
    of ``x``, where ``m`` is its mask and ``b = c + sigma n`` a random constant colour ``c`` (a
    row of ``palette`` [K, C], latent codes of flat colours, see :func:`colour_palette`) noised
    to the current level. The region's prompt then has to form its object inside the mask rather
    than spread it over the window. ``n`` is one fixed normal draw from ``seed``; the colour is
    drawn per region from ``seed`` and sigma, so the wrapper stays a pure function of its inputs.
    """

    until_sigma: float
    palette: Tensor  # [K, C]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.palette.ndim != 2 or self.palette.shape[0] < 1:
            raise InvalidRequestError("the bootstrap palette must be a tensor [colours, channels]")

    @classmethod
    def for_steps(
        cls, sigmas: Tensor, fraction: float, palette: Tensor, seed: int = 0
    ) -> Bootstrap:
        """Bootstrap the first ``fraction`` of the steps of the schedule ``sigmas`` (Bar-Tal's
        default is 20 of 50 steps, 0.4)."""
        if not 0.0 <= fraction <= 1.0:
            raise InvalidRequestError(f"bootstrap fraction {fraction} must be in [0, 1]")
        steps = len(sigmas) - 1
        return cls(float(sigmas[round(fraction * steps)]), palette, seed)

    def flat_backgrounds(self, x: Tensor, sigma: Tensor, count: int) -> list[Tensor]:
        """``count`` noisy flat backgrounds shaped like ``x`` [B, C, H, W], one per region."""
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed)).to(x)
        pick = torch.Generator().manual_seed(self.seed * 1_000_003 + int(float(sigma.max()) * 1e6))
        idx = torch.randint(self.palette.shape[0], (count,), generator=pick)
        colours = self.palette.to(x)[idx]  # [count, C]
        s = append_dims(sigma.to(x), x.ndim)  # [B, 1, 1, 1]
        return [colour[None, :, None, None] + s * noise for colour in colours]


def colour_palette(
    encode: Callable[[Tensor], Tensor], count: int = 16, *, seed: int = 0, size: int = 64
) -> Tensor:
    """Latent codes [count, C] of ``count`` random flat colours, for :class:`Bootstrap`.

    ``encode`` maps images [N, 3, size, size] in [-1, 1] to latents [N, C, h, w] in the
    sampler's space (VAE encode, mean, times the scaling factor); each latent is averaged over
    its pixels. Bar-Tal et al. draw colours uniformly in RGB, as here.
    """
    rgb = torch.rand(count, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    latents = encode(rgb.expand(count, 3, size, size).contiguous())  # [count, C, h, w]
    return latents.mean(dim=(2, 3)).float()


# --- the wrapper -------------------------------------------------------------------------------


class MultiDiffusion:
    """A denoiser that runs ``denoiser`` over overlapping windows and fuses them (eq. 5).

    ``window`` and ``stride`` are in latent pixels (an int or ``(height, width)``); every window
    has the same shape, so up to ``batch_windows`` of them share one inner call and a panorama
    costs about as many single-window evaluations as it has windows. The inner denoiser must
    accept ``cond`` for any batch size (true of ``CFGDenoiser`` and ``ScheduledGuidance`` with
    batch-1 conditionings, which they broadcast); with ``batch_windows=1`` it only ever sees the
    sampler's own batch. ``circular`` wraps windows round the horizontal edge (360° panoramas).
    ``regions`` add region prompts, weighted as described in the module docstring; ``bootstrap``
    turns on Bar-Tal's bootstrapping for them. ``window_weight`` [h, w] (positive) weighs every
    window's pixels, e.g. to feather tiles; by default all weights are 1, the paper's panorama.
    ``on_window`` is told the window of each inner call before it is made (and None when the
    evaluation is over); windows are then evaluated one per call, for inner models that need
    to know where they are (ControlNets, whose control image is cropped to the window).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        window: Size,
        stride: Size,
        regions: Sequence[Region] = (),
        batch_windows: int = 4,
        circular: bool = False,
        background: Literal["complement", "full"] = "complement",
        window_weight: Tensor | None = None,
        bootstrap: Bootstrap | None = None,
        on_window: Callable[[Window | None], None] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.on_window = on_window
        self.window = _pair(window, "window")
        self.stride = _pair(stride, "stride")
        _check_window_stride(self.window, self.stride)
        if batch_windows < 1:
            raise InvalidRequestError(f"batch_windows must be at least 1, not {batch_windows}")
        if background not in ("complement", "full"):
            raise InvalidRequestError(
                f"background weighting {background!r} is not one of 'complement', 'full'"
            )
        shapes = {tuple(r.mask.shape) for r in regions}
        if len(shapes) > 1:
            raise InvalidRequestError(f"region masks have different shapes: {sorted(shapes)}")
        if window_weight is not None and (
            tuple(window_weight.shape) != self.window or not bool((window_weight > 0).all())
        ):
            raise InvalidRequestError(
                f"window_weight must be a positive tensor of the window's shape {self.window}"
            )
        self.regions = tuple(regions)
        self.batch_windows = batch_windows
        self.circular = circular
        self.background = background
        self.window_weight = window_weight
        self.bootstrap = bootstrap

    def windows(self, height: int, width: int) -> list[Window]:
        """The windows used on a ``height`` x ``width`` latent."""
        return windows(height, width, self.window, self.stride, circular=self.circular)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        b, _, height, width = x.shape  # x [B, C, H, W]
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma  # [B]
        wins = self.windows(height, width)
        paths = self._paths(x, sigma, cond)  # [(cond, input [B, C, H, W], weight [H, W])]
        ww = None if self.window_weight is None else self.window_weight.to(x)  # [h, w]

        value = torch.zeros_like(x)  # sum of W_i * D_i, [B, C, H, W]
        total = x.new_zeros(height, width)  # sum of W_i, [H, W]
        for path_cond, inp, weight in paths:
            jobs = []  # (window, weight [h, w]) of this prompt, zero-weight windows left out
            for win in wins:
                w = crop_window(weight, win)
                if ww is not None:
                    w = w * ww
                if bool(w.any()):
                    jobs.append((win, w))
            per_call = 1 if self.on_window is not None else self.batch_windows
            for start in range(0, len(jobs), per_call):
                batch = jobs[start : start + per_call]
                n = len(batch)
                crops = torch.cat([crop_window(inp, win) for win, _ in batch])  # [n*B, C, h, w]
                if self.on_window is not None:
                    self.on_window(batch[0][0])
                try:
                    denoised = self.denoiser(crops, sigma.repeat(n), path_cond)  # [n*B, C, h, w]
                finally:
                    if self.on_window is not None:
                        self.on_window(None)
                for (win, w), d in zip(batch, denoised.chunk(n)):
                    _paste_add(value, win, d * w)
                    _paste_add(total, win, w)
        # Every pixel lies in a window, and there its weights over all prompts sum to at least 1
        # (complement: max(1, sum of masks); full: 1 + sum of masks), times window_weight > 0.
        return value / total

    def _paths(self, x: Tensor, sigma: Tensor, cond: Any) -> list[tuple[Any, Tensor, Tensor]]:
        """The prompts: (conditioning, the sample it sees, its weights [H, W]), background first."""
        height, width = x.shape[-2:]
        masks = [r.mask.to(x) for r in self.regions]  # each [H, W]
        for m in masks:
            if tuple(m.shape) != (height, width):
                raise InvalidRequestError(
                    f"region mask {m.shape[0]}x{m.shape[1]} does not match the latent "
                    f"{height}x{width} (masks are at latent resolution)"
                )
        if self.background == "full" or not masks:
            background = x.new_ones(height, width)
        else:
            background = (1 - torch.stack(masks).sum(0)).clamp(min=0)
        inputs = [x] * len(masks)
        boot = self.bootstrap
        if boot is not None and masks and float(sigma.max()) > boot.until_sigma:
            flats = boot.flat_backgrounds(x, sigma, len(masks))
            inputs = [m * x + (1 - m) * flat for m, flat in zip(masks, flats)]
        regions = [(r.cond, inp, m) for r, inp, m in zip(self.regions, inputs, masks)]
        return [(cond, x, background), *regions]

    def on_step(self, info: StepInfo) -> None:
        """Forward the sampler's step report to the inner denoiser (prompt schedules)."""
        inner = getattr(self.denoiser, "on_step", None)
        if inner is not None:
            inner(info)
