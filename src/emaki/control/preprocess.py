"""ControlNet preprocessors ("annotators") that need no downloaded weights.

A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")
is trained on pairs of an image and a *control image* derived from it: Canny edges, soft (HED)
edges, line drawings, scribbles, segmentation maps. These functions derive such control images
with classical image processing only (numpy, scipy.ndimage, PIL), so they run offline and fast.
The network-based annotators (HED, PiDiNet, the lineart and OneFormer/UniFormer segmenters) are
approximated where a classical method gives the same *kind* of map; ``canny`` is the real thing.

Every preprocessor takes a PIL image (any mode; converted to RGB) and returns an RGB PIL image
of the same size. The ControlNets of ControlNet 1.0/1.1 want light structure on black: white
edges, white lines, white scribbles (the training images were made that way), so that is what
these functions return. :func:`preprocess` looks a preprocessor up by name and turns bad names
and options into :class:`~emaki.errors.InvalidRequestError`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from emaki.errors import InvalidRequestError

#: ITU-R BT.601 luma weights, as OpenCV's and PIL's RGB -> grey conversions use.
_LUMA = np.array([0.299, 0.587, 0.114])
#: 8-connectivity, Canny's neighbourhood for hysteresis.
_EIGHT = np.ones((3, 3), dtype=bool)
_TAN_22_5 = float(np.tan(np.pi / 8))
_TAN_67_5 = float(np.tan(3 * np.pi / 8))

#: The ADE20K class colours (150 classes, index = class id, "wall" first) that the segmentation
#: ControlNets were trained on: their control images are ADE20K-style label maps painted in
#: these colours. Stored as RRGGBB hex, ten a line.
_ADE20K_HEX = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 "
    "e005ff ebff07 96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 "
    "0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff "
    "08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 "
    "ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f "
    "14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 "
    "008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff "
    "ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 "
    "00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 "
    "8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff "
    "00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 "
    "00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff "
    "4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff"
)
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in _ADE20K_HEX.split()
)


# --- conversions -----------------------------------------------------------------------------


def _rgb(image: Image.Image) -> np.ndarray:
    """float64 [H, W, 3] in 0..255."""
    if not isinstance(image, Image.Image):
        raise InvalidRequestError(f"a preprocessor takes a PIL image, not {type(image).__name__}")
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """[H, W] grey in the units of ``rgb``."""
    return rgb @ _LUMA


def _image(values: np.ndarray) -> Image.Image:
    """An RGB image from [H, W] or [H, W, 3] values in 0..255 (rounded, clipped)."""
    arr = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return Image.fromarray(arr, "RGB")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)


# --- Canny -----------------------------------------------------------------------------------


def canny(
    image: Image.Image,
    low: float = 100.0,
    high: float = 200.0,
    *,
    sigma: float = 0.0,
    l2: bool = False,
) -> Image.Image:
    """Canny edges (Canny 1986, "A Computational Approach to Edge Detection"): white on black.

    The steps: optional Gaussian smoothing (``sigma`` > 0), 3x3 Sobel gradients, non-maximum
    suppression across the gradient direction (quantised to 0, 45, 90, 135 degrees), double
    threshold, and hysteresis: a pixel above ``low`` is kept when its 8-connected component of
    above-``low`` maxima holds a pixel above ``high`` (both comparisons strict).

    Thresholds use OpenCV's ``cv2.Canny`` units, which ControlNet's canny models were trained
    with and which A1111's sliders (default 100 / 200) pass straight through: the *unnormalised*
    3x3 Sobel response of 0..255 pixel values, L1 norm ``|gx| + |gy|`` by default (``l2=True``:
    ``sqrt(gx^2 + gy^2)``, OpenCV's ``L2gradient``). A step of height ``h`` between flat regions
    gives a magnitude of ``4 h``. As OpenCV does for colour images, the gradient of each pixel is
    taken from the RGB channel with the largest magnitude. OpenCV does not blur, and neither does
    the default here (``sigma=0``): ControlNet's canny training maps were unblurred ``cv2.Canny``
    outputs; blur a noisy photo with ``sigma`` around 1.
    """
    _check(0 <= low <= high, f"canny needs 0 <= low <= high, got low={low}, high={high}")
    _check(sigma >= 0, f"canny sigma must be >= 0, got {sigma}")
    rgb = _rgb(image)
    if sigma > 0:
        rgb = ndimage.gaussian_filter(rgb, sigma=(sigma, sigma, 0), mode="nearest")
    gx, gy, mag = _strongest_channel_gradient(rgb, l2)
    maxima = _non_maximum_suppression(gx, gy, mag)
    candidate = maxima & (mag > low)
    strong = candidate & (mag > high)
    labels, count = ndimage.label(candidate, structure=_EIGHT)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False  # label 0 is the background
    return _image(np.where(keep[labels], 255.0, 0.0))


def _strongest_channel_gradient(
    rgb: np.ndarray, l2: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sobel gx, gy and magnitude [H, W] of the channel with the largest magnitude per pixel."""
    # Replicated borders, as cv2.Canny: no false edge along the frame.
    gx = np.stack([ndimage.sobel(rgb[:, :, c], axis=1, mode="nearest") for c in range(3)], -1)
    gy = np.stack([ndimage.sobel(rgb[:, :, c], axis=0, mode="nearest") for c in range(3)], -1)
    mag = np.hypot(gx, gy) if l2 else np.abs(gx) + np.abs(gy)
    best = mag.argmax(axis=2)[:, :, None]
    pick = lambda a: np.take_along_axis(a, best, axis=2)[:, :, 0]  # noqa: E731
    return pick(gx), pick(gy), pick(mag)


def _non_maximum_suppression(gx: np.ndarray, gy: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Bool [H, W]: local maxima of ``mag`` along the quantised gradient direction.

    Along the horizontal and vertical directions the comparison is ``>`` with the previous
    neighbour and ``>=`` with the next (OpenCV's tie rule), so a two-pixel plateau of equal
    magnitude, which every sharp step produces, yields a one-pixel edge instead of none.
    """
    h, w = mag.shape
    padded = np.pad(mag, 1)  # zeros outside the image

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < ax * _TAN_22_5  # gradient within 22.5 degrees of the x axis
    vertical = ay > ax * _TAN_67_5
    diagonal = ~horizontal & ~vertical
    same_sign = (gx > 0) == (gy > 0)  # gradient along (1, 1) or (-1, -1) in (x, y), y down
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = np.where(
        same_sign,
        (mag > at(-1, -1)) & (mag > at(1, 1)),
        (mag > at(-1, 1)) & (mag > at(1, -1)),
    )
    return (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)


# --- binarisation ----------------------------------------------------------------------------


def threshold(image: Image.Image, level: float = 127.0, *, invert: bool = False) -> Image.Image:
    """Binarise the luma: white where it is above ``level`` (0..255), black elsewhere.

    ``invert`` swaps the two. This is A1111's "threshold"/"binary" preprocessor.
    """
    _check(0 <= level <= 255, f"threshold level must be in 0..255, got {level}")
    above = _luma(_rgb(image)) > level
    return _image(np.where(above != invert, 255.0, 0.0))


def scribble(
    image: Image.Image,
    level: float = 127.0,
    *,
    thicken: int = 0,
    invert: bool | None = None,
) -> Image.Image:
    """A scribble control image: white strokes on black, as the scribble ControlNets expect.

    The luma is binarised at ``level``. People draw dark strokes on white paper, so with
    ``invert=None`` the majority side is taken as the background: a mostly light image has its
    dark pixels as the strokes, a mostly dark one its light pixels. ``invert=True`` / ``False``
    force dark / light strokes. ``thicken`` grows the strokes by that many pixels (a disk of that
    radius), which helps thin pen lines survive the ControlNet's 8x downsampling.
    """
    _check(0 <= level <= 255, f"scribble level must be in 0..255, got {level}")
    _check(
        isinstance(thicken, int) and 0 <= thicken <= 64,
        f"scribble thicken must be 0..64, got {thicken}",
    )
    light = _luma(_rgb(image)) > level
    if invert is None:
        invert = bool(light.mean() > 0.5)
    strokes = ~light if invert else light
    if thicken > 0:
        r = np.arange(-thicken, thicken + 1)
        disk = r[:, None] ** 2 + r[None, :] ** 2 <= thicken**2
        strokes = ndimage.binary_dilation(strokes, structure=disk)
    return _image(np.where(strokes, 255.0, 0.0))


def invert(image: Image.Image) -> Image.Image:
    """255 minus each channel: turns a black-on-white drawing into the white-on-black the line
    ControlNets expect (A1111's "invert (from white bg & black line)")."""
    return _image(255.0 - _rgb(image))


# --- soft edges and lines --------------------------------------------------------------------


def soft_edge(image: Image.Image, sigma: float = 1.0, *, gamma: float = 1.0) -> Image.Image:
    """Soft edges in the spirit of HED (Xie & Tu 2015), without a network: white on black.

    HED fuses edge maps from several scales into a smooth, thick, unthresholded edge
    probability. Here: the scale-normalised gradient magnitude (Lindeberg 1998: the Gaussian
    derivative times its sigma, so a step of any sharpness gives the same peak) at ``sigma`` and
    ``2 sigma``, averaged over the two scales, strongest RGB channel per pixel, normalised by a
    high percentile so the strongest edges are white, then raised to ``gamma`` (< 1 thickens and
    brightens faint edges). Normalisation has a floor, so a nearly flat image stays black rather
    than having its noise stretched to white.
    """
    _check(0 < sigma <= 64, f"soft_edge sigma must be in (0, 64], got {sigma}")
    _check(0 < gamma <= 10, f"soft_edge gamma must be in (0, 10], got {gamma}")
    rgb = _rgb(image) / 255.0
    total = np.zeros(rgb.shape[:2])
    for s in (sigma, 2 * sigma):
        per_channel = [
            ndimage.gaussian_gradient_magnitude(rgb[:, :, c], s, mode="nearest") * s
            for c in range(3)
        ]
        total += np.max(per_channel, axis=0) / 2
    # A unit step's scale-normalised peak is 1/sqrt(2 pi) ~ 0.4; the floor is a 10 % step.
    scale = max(float(np.percentile(total, 99.5)), 0.04)
    return _image(255.0 * np.clip(total / scale, 0, 1) ** gamma)


def lineart(image: Image.Image, sigma: float = 1.0, *, drawing: bool = False) -> Image.Image:
    """Line art from edges: lines on the dark side of each edge, like an artist's ink lines.

    A difference of Gaussians (Marr & Hildreth 1980; the XDoG line stylisation of Winnemöller
    et al. 2012) on the luma: ``G(1.6 sigma) - G(sigma)`` is positive where a pixel is darker
    than its surroundings, that is along dark strokes and on the dark side of every edge, and
    negative or zero elsewhere. Its positive part, normalised by a high percentile (with a floor,
    so flat images stay empty) and cut below 10 %, is the line strength.

    The lineart ControlNets (ControlNet 1.1 ``lineart``, ``lineart_anime``) take *white lines on
    black*: sd-webui-controlnet's ``lineart`` preprocessor returns ``255 - detector(img)`` (its
    "applied auto inversion") because the detector draws dark lines on white, and it offers
    "invert (from white bg & black line)" for user drawings. So that is the default output;
    ``drawing=True`` returns the dark-lines-on-white drawing instead, for display.
    """
    _check(0 < sigma <= 64, f"lineart sigma must be in (0, 64], got {sigma}")
    grey = _luma(_rgb(image)) / 255.0
    dog = ndimage.gaussian_filter(grey, 1.6 * sigma, mode="nearest") - ndimage.gaussian_filter(
        grey, sigma, mode="nearest"
    )
    positive = np.clip(dog, 0, None)
    scale = max(float(np.percentile(positive, 99.5)), 0.02)
    # A dead zone below 10 % of the strongest lines drops the DoG's faint halo and texture noise
    # (the threshold of XDoG), so lines end cleanly instead of fading into a grey wash.
    lines = 255.0 * np.clip((positive / scale - 0.1) / 0.9, 0, 1)
    return _image(255.0 - lines if drawing else lines)


# --- segmentation ----------------------------------------------------------------------------


def segmentation(
    image: Image.Image, k: int = 8, *, sigma: float = 1.0, seed: int = 0
) -> Image.Image:
    """A segmentation-style map: colour regions painted with ADE20K class colours.

    The segmentation ControlNets read a label map painted in the ADE20K palette. Without a
    semantic segmenter we cluster colours instead: pixels are converted to CIE L*a*b*
    (perceptually even distances) and clustered into at most ``k`` groups by k-means (Lloyd's
    algorithm from a k-means++ start, Arthur & Vassilvitskii 2007, with a fixed ``seed``, so the
    result is deterministic); the label map is then cleaned by a Gaussian-weighted majority vote
    of radius ``sigma`` (0: none), which removes speckle without inventing the in-between
    colours that blurring the image would; each group is painted with a palette colour, largest
    group first. The regions follow the image; the class each colour stands for does not (the
    ControlNet sees layout, not meaning).
    """
    _check(isinstance(k, int) and 1 <= k <= 150, f"segmentation k must be 1..150, got {k}")
    _check(0 <= sigma <= 64, f"segmentation sigma must be in [0, 64], got {sigma}")
    rgb = _rgb(image)
    lab = _srgb_to_lab(rgb / 255.0).reshape(-1, 3)
    centres = _kmeans(lab, k, np.random.default_rng(seed))
    labels = _nearest(lab, centres).reshape(rgb.shape[:2])
    if sigma > 0 and len(centres) > 1:
        votes = [
            ndimage.gaussian_filter((labels == j).astype(np.float32), sigma, mode="nearest")
            for j in range(len(centres))
        ]
        labels = np.argmax(votes, axis=0)
    counts = np.bincount(labels.ravel(), minlength=len(centres))
    colours = _distinct_palette()
    paint = np.zeros((len(centres), 3))
    for rank, cluster in enumerate(np.argsort(-counts, kind="stable")):
        paint[cluster] = colours[rank]
    return _image(paint[labels])


def _distinct_palette() -> np.ndarray:
    """The ADE20K colours without repeats (two classes share grey 140), in class order."""
    seen: dict[tuple[int, int, int], None] = dict.fromkeys(ADE20K_PALETTE)
    return np.array(list(seen), dtype=np.float64)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65 white) of sRGB values in 0..1, shape [..., 3]."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each point ([N, 3], [K, 3] -> [N])."""
    d = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None, :]
    return d.argmin(axis=1)


def _kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 25
) -> np.ndarray:
    """Cluster centres [K', 3] (K' <= k: duplicates and empty clusters are dropped)."""
    # Fit on at most 16k pixels: colour statistics need no more, and it bounds the time.
    sample = points[:: max(1, len(points) // 16384)]
    distinct = np.unique(np.round(sample, 6), axis=0)
    if len(distinct) <= k:  # few colours (a flat-colour drawing): each is its own cluster
        return distinct
    centres = [sample[rng.integers(len(sample))]]
    for _ in range(k - 1):  # k-means++: next centre with probability ~ squared distance
        d2 = ((sample[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(axis=1)
        centres.append(sample[rng.choice(len(sample), p=d2 / d2.sum())])
    c = np.array(centres)
    for _ in range(iterations):
        labels = _nearest(sample, c)
        moved = np.array(
            [sample[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(len(c))]
        )
        if np.allclose(moved, c):
            break
        c = moved
    used = np.unique(_nearest(sample, c))
    return c[used]


# --- registry --------------------------------------------------------------------------------

Preprocessor = Callable[..., Image.Image]

#: Name -> preprocessor; every one takes ``(image, **options)`` and returns an RGB image.
PREPROCESSORS: dict[str, Preprocessor] = {
    "canny": canny,
    "soft_edge": soft_edge,
    "lineart": lineart,
    "scribble": scribble,
    "threshold": threshold,
    "invert": invert,
    "segmentation": segmentation,
}


def preprocess(name: str, image: Image.Image, **options: Any) -> Image.Image:
    """Run the preprocessor called ``name`` (case and ``-``/``_``/space insensitive).

    Unknown names and unknown or invalid options are :class:`InvalidRequestError`\\ s naming
    what is accepted.
    """
    key = "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())
    fn = PREPROCESSORS.get(key)
    if fn is None:
        accepted = ", ".join(PREPROCESSORS)
        raise InvalidRequestError(f"unknown ControlNet preprocessor {name!r}; accepted: {accepted}")
    params = inspect.signature(fn).parameters
    accepted_options = list(params)[1:]  # the first parameter is the image
    unknown = sorted(set(options) - set(accepted_options))
    if unknown:
        raise InvalidRequestError(
            f"preprocessor {key!r} does not take option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted_options) or 'none'}"
        )
    checked = {k: _option(key, k, params[k].default, v) for k, v in options.items()}
    return fn(image, **checked)


def _option(name: str, option: str, default: Any, value: Any) -> Any:
    """``value`` checked against the type of the option's default (ints from JSON floats too)."""
    if isinstance(default, bool) or default is None:
        if isinstance(value, bool) or (value is None and default is None):
            return value
        expected = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        expected = "an integer"
    else:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        expected = "a finite number"
    raise InvalidRequestError(
        f"preprocessor {name!r} option {option} must be {expected}, got {value!r}"
    )
