"""Inpainting masks with A1111's semantics: binarize, invert, blur, crop region, fill, overlay.

A mask is an 8-bit greyscale ("L") image; 255 marks pixels to repaint. Uploaded masks may be
RGB(A): any alpha below 255 in an RGBA mask counts as painted, as A1111 treats transparent
uploads; otherwise the luminance is used.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from emaki.errors import InvalidRequestError
from emaki.imageops.resize import resize_image


def binary_mask(mask: Image.Image, *, round_values: bool = True) -> Image.Image:
    """An "L" mask from any upload: RGBA with transparency -> painted where alpha < 255."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1][0] < 255:
        alpha = np.asarray(mask.getchannel("A"))
        return Image.fromarray(np.where(alpha < 255, 255, 0).astype(np.uint8), "L")
    grey = mask.convert("L")
    if round_values:
        grey = grey.point(lambda v: 255 if v >= 128 else 0)
    return grey


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """Separable Gaussian blur of a mask, sigma ``blur_x`` across and ``blur_y`` down.

    The kernel is cut at 2.5 sigma each side (``2 * int(2.5 * sigma + 0.5) + 1`` taps), the
    support A1111 uses, so that "Mask blur: 4" feathers over the same width.
    """
    blur_y = blur_x if blur_y is None else blur_y
    arr = np.asarray(mask.convert("L"), dtype=np.float32)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            arr = _gauss_1d(arr, float(sigma), axis)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")


def _gauss_1d(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(arr, pad, mode="reflect" if arr.shape[axis] > radius else "edge")
    out = np.zeros_like(arr)
    n = arr.shape[axis]
    for i, w in enumerate(k):
        out += w * (padded[:, i : i + n] if axis == 1 else padded[i : i + n, :])
    return out


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x1, y1, x2, y2) of the painted pixels grown by ``padding``, or None."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, mask.width),
        min(y2 + padding, mask.height),
    )


def expand_to_aspect(
    region: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int
) -> tuple[int, int, int, int]:
    """Grow ``region`` to the aspect ratio ``width/height``, shifted to stay inside the image.

    "Only masked" inpainting generates the crop at the full request size; matching the aspect
    first means the crop is scaled, never distorted (up to what the image's own size allows).
    """
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width) - (y2 - y1), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height) - (x2 - x1), image_w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, extra: int, limit: int) -> tuple[int, int]:
    a -= extra // 2
    b += extra - extra // 2
    if b > limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, min(b - a, limit)
    return a, b


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """ "Masked content: fill": paint the masked area with the colours around it.

    Normalised convolution (Knutsson & Westin 1993) from coarse to fine: the estimate at radius
    r is ``blur(colour * known) / blur(known)``; it replaces the coarser estimate where enough
    known pixels lie within r. Large holes get the surrounding average, their edges the local
    colour: a smooth, structure-free start that the sampler then repaints.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = 1.0 - np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # [H, W]
    if keep.sum() < 1e-3:  # nothing known: mid grey
        return Image.new("RGB", image.size, (127, 127, 127))
    est = (rgb * keep[..., None]).sum((0, 1)) / keep.sum()  # the mean colour, [3]
    out = np.broadcast_to(est, rgb.shape).copy()
    for radius in (64, 16, 4, 2):
        den = _blur(keep, radius)
        num = np.stack([_blur(rgb[..., c] * keep, radius) for c in range(3)], axis=-1)
        weight = np.clip(den / 0.05, 0, 1)[..., None]  # trust where >5% of the window is known
        out = out * (1 - weight) + num / np.maximum(den, 1e-6)[..., None] * weight
    result = rgb * keep[..., None] + out * (1 - keep[..., None])
    return Image.fromarray(np.clip(result + 0.5, 0, 255).astype(np.uint8), "RGB")


def _blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(arr.astype(np.float32), sigma, mode="constant", cval=0.0)


def overlay(original: Image.Image, mask: Image.Image) -> Image.Image:
    """The original as RGBA with alpha = 255 - mask: opaque exactly where nothing is repainted."""
    out = original.convert("RGB").convert("RGBA")
    out.putalpha(ImageOps.invert(mask.convert("L")))
    return out


def paste_back(
    generated: Image.Image,
    base: Image.Image,
    over: Image.Image | None,
    region: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """Composite a generated image onto the original size, then lay the overlay on top.

    With ``region`` ("only masked") the generated crop is scaled into the region of an image of
    ``base``'s size; the overlay then restores every unmasked pixel of the original exactly and
    feathers the edge with the blurred mask.
    """
    if region is not None:
        x1, y1, x2, y2 = region
        canvas = base.convert("RGB").copy()
        canvas.paste(resize_image(1, generated.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
        generated = canvas
    if over is None:
        return generated.convert("RGB")
    if over.size != generated.size:
        raise InvalidRequestError(
            f"internal: overlay {over.size} does not match the image {generated.size}"
        )
    out = generated.convert("RGBA")
    out.alpha_composite(over)
    return out.convert("RGB")
