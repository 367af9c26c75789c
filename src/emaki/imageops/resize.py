"""The img2img resize modes, as A1111 defines them (``resize_mode`` 0-2 of its API).

* 0 "Just resize": stretch to the target size.
* 1 "Crop and resize": scale to cover the target, then centre-crop.
* 2 "Resize and fill": scale to fit inside the target, centre it, and fill the empty bands by
  stretching the image's edge rows (or columns) outwards.
* 3 "Just resize (latent upscale)" is done in latent space by the img2img pipeline, not here.

Resampling is Lanczos, A1111's default when no upscaler model is chosen.
"""

from __future__ import annotations

from PIL import Image

from emaki.errors import InvalidRequestError

LANCZOS = Image.Resampling.LANCZOS


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` brought to ``width`` x ``height`` with resize mode ``mode`` (0, 1 or 2)."""
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"cannot resize to {width}x{height}")
    if mode == 0:
        return image.resize((width, height), LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:  # cover, then crop the overhang
        w = width if ratio > src_ratio else image.width * height // image.height
        h = height if ratio <= src_ratio else image.height * width // image.width
        out = Image.new(image.mode, (width, height))
        out.paste(image.resize((w, h), LANCZOS), ((width - w) // 2, (height - h) // 2))
        return out
    if mode == 2:  # fit, then stretch the edge rows/columns into the empty bands
        w = width if ratio < src_ratio else image.width * height // image.height
        h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((w, h), LANCZOS)
        out = Image.new(image.mode, (width, height))
        out.paste(resized, ((width - w) // 2, (height - h) // 2))
        if ratio < src_ratio:  # bands above and below
            band = height // 2 - h // 2
            if band > 0:
                out.paste(resized.resize((width, band), LANCZOS, box=(0, 0, width, 0)), (0, 0))
                bottom = resized.resize((width, band), LANCZOS, box=(0, h, width, h))
                out.paste(bottom, (0, band + h))
        elif ratio > src_ratio:  # bands left and right
            band = width // 2 - w // 2
            if band > 0:
                out.paste(resized.resize((band, height), LANCZOS, box=(0, 0, 0, height)), (0, 0))
                right = resized.resize((band, height), LANCZOS, box=(w, 0, w, height))
                out.paste(right, (band + w, 0))
        return out
    raise InvalidRequestError(f"resize mode {mode} is not 0, 1 or 2 (3 resizes latents)")
