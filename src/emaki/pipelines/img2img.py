"""img2img and inpainting input: from an init image (and mask) to latents, masks and overlays.

This is the stage before sampling in an img2img job, with A1111's semantics
(``modules/processing.py``, ``StableDiffusionProcessingImg2Img.init``):

1. the image is flattened onto white and brought to the request size by the resize mode;
2. a mask is binarized, optionally inverted and blurred; "only masked" crops the masked region
   (plus padding, grown to the request's aspect ratio) and generates it at the full size;
3. an overlay (the original with alpha = 1 - mask) is kept to restore unmasked pixels at the end;
4. the masked area is pre-filled ("fill"), kept ("original"), or replaced in latent space by noise
   ("latent noise") or zeros ("latent nothing");
5. the image is encoded (posterior mean), and for inpainting models (9-channel UNet input) the
   masked image and the mask are encoded as the extra input channels.

:func:`img2img_sigmas` truncates the sigma schedule by the denoising strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image, ImageOps
from torch import Tensor

from emaki.imageops.masks import (
    binary_mask,
    blur_mask,
    crop_region,
    expand_to_aspect,
    fill_masked,
    overlay,
    paste_back,
)
from emaki.imageops.resize import resize_image
from emaki.latents import LatentFormat, encode, from_pil
from emaki.request import InitImage


@dataclass(frozen=True)
class InitState:
    """A prepared img2img input for one image size (shared by every image of the job).

    ``latent`` [1, C, h, w] is the encoded init image; ``keep`` [1, 1, h, w] is 1 where the
    image is kept (None: no mask); ``concat`` [1, 5, h, w] is the inpainting model's extra input
    (mask, masked-image latent) or None for ordinary models.
    """

    latent: Tensor
    image: Image.Image  #: the processed (resized / cropped / filled) init image
    keep: Tensor | None = None
    concat: Tensor | None = None
    fill: int = 1  #: masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    overlay: Image.Image | None = None
    region: tuple[int, int, int, int] | None = None  #: "only masked" crop (x1, y1, x2, y2)
    base: Image.Image | None = None  #: the original-size image the result is pasted into

    def start_latent(self, noise: Tensor) -> Tensor:
        """The latent to add noise to: the init latent with the masked area as ``fill`` says.

        ``noise`` [B, C, h, w] is the job's initial noise; "latent noise" puts that same noise
        into the masked area (A1111 draws it from the same seeds, so it is the same tensor).
        """
        latent = self.latent.to(noise).expand_as(noise)
        if self.keep is None or self.fill in (0, 1):
            return latent
        keep = self.keep.to(noise)
        if self.fill == 2:
            return latent * keep + noise * (1 - keep)
        return latent * keep

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """Paste generated images back: only-masked crops into place, then the overlay."""
        if self.overlay is None:
            return images
        base = self.base or self.image
        return [paste_back(im, base, self.overlay, self.region) for im in images]


def prepare_init(
    init: InitImage,
    width: int,
    height: int,
    vae: AutoencoderKL,
    fmt: LatentFormat,
    *,
    inpainting_model: bool = False,
) -> InitState:
    """Resize, mask, fill and encode an init image for a ``width`` x ``height`` job."""
    image = flatten(init.image)
    region = None
    over = None
    mask = None
    base = None
    if init.mask is not None:
        mask = binary_mask(init.mask)
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        if init.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if init.mask_blur > 0:
            mask = blur_mask(mask, init.mask_blur)
        if init.inpaint_full_res:
            region = crop_region(mask, init.inpaint_full_res_padding)
        if region is not None:
            region = expand_to_aspect(region, width, height, mask.width, mask.height)
            over = overlay(image, mask)
            base = image
            mask = resize_image(2, mask.crop(region), width, height)
            image = resize_image(2, image.crop(region), width, height)
        else:
            if init.resize_mode != 3:
                image = resize_image(init.resize_mode, image, width, height)
            mask = resize_image(min(init.resize_mode, 2), mask, *image.size)
            # The overlay restores the original inside the blurred edge too: the doubled mask
            # makes the feather reach only inwards from the mask's edge.
            doubled = Image.fromarray(
                np.clip(np.asarray(mask, np.float32) * 2, 0, 255).astype(np.uint8)
            )
            over = overlay(image, doubled)
        if init.inpainting_fill == 0:
            image = fill_masked(image, mask)
    elif init.resize_mode != 3:
        image = resize_image(init.resize_mode, image, width, height)
    pixels = from_pil(image)  # [1, 3, H, W] in [-1, 1]
    latent = encode(vae, pixels, fmt, mean=True)
    if init.resize_mode == 3 and region is None:
        latent = F.interpolate(
            latent, size=(height // fmt.downsample, width // fmt.downsample), mode="bilinear"
        )
    keep = None
    if mask is not None:
        keep = 1.0 - latent_mask(mask, latent.shape[-2:])
    concat = None
    if inpainting_model:
        concat = inpainting_conditioning(vae, fmt, pixels, mask, latent.shape[-2:])
    return InitState(latent, image, keep, concat, init.inpainting_fill, over, region, base)


def flatten(image: Image.Image) -> Image.Image:
    """RGB; transparent images are composited onto white (A1111's img2img background)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return image.convert("RGB")


def latent_mask(mask: Image.Image, size: tuple[int, int] | torch.Size) -> Tensor:
    """The mask at latent resolution, rounded to 0/1 (A1111's default ``mask_round``): [1, 1, h, w]."""
    h, w = int(size[0]), int(size[1])
    small = mask.convert("L").resize((w, h), Image.Resampling.BICUBIC)
    arr = np.round(np.asarray(small, dtype=np.float32) / 255.0)
    return torch.from_numpy(arr)[None, None]


def inpainting_conditioning(
    vae: AutoencoderKL,
    fmt: LatentFormat,
    pixels: Tensor,
    mask: Image.Image | None,
    size: tuple[int, int] | torch.Size,
) -> Tensor:
    """The extra input of an inpainting UNet (RunwayML SD-inpainting): [1, 1 + C, h, w].

    The mask (1 = repaint, rounded; all ones without a mask) at latent size, nearest-neighbour,
    followed by the latent of the image with the masked pixels set to 0 (mid grey), as the
    inpainting checkpoints were trained with.
    """
    if mask is None:
        m = torch.ones(1, 1, *pixels.shape[-2:])
    else:
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        m = torch.round(m)
        if m.shape[-2:] != pixels.shape[-2:]:
            m = F.interpolate(m, size=pixels.shape[-2:], mode="nearest")
    masked = encode(vae, pixels * (1 - m), fmt, mean=True)
    small = F.interpolate(m, size=(int(size[0]), int(size[1])), mode="nearest")
    return torch.cat([small.to(masked), masked], dim=1)


def txt2img_conditioning(vae: AutoencoderKL, fmt: LatentFormat, width: int, height: int) -> Tensor:
    """An inpainting model's extra input for txt2img: everything masked, an empty grey image."""
    pixels = torch.zeros(1, 3, height, width)
    return inpainting_conditioning(vae, fmt, pixels, None, fmt.latent_shape(width, height)[1:])


def img2img_sigmas(sigmas: Tensor, strength: float, run: int | None = None) -> Tensor:
    """The tail of a schedule that img2img runs at denoising ``strength`` (A1111's rule).

    With ``n`` steps A1111 runs ``t_enc + 1`` of them, ``t_enc = int(min(strength, 0.999) * n)``,
    starting at ``sigmas[n - t_enc - 1]``. (diffusers starts one index later, so its strength
    ``s`` corresponds to A1111's ``s - 1/n``.) With ``run`` (the "exact steps" mode, see
    :func:`fixed_steps`) the last ``run`` steps are taken instead. Strength 0 means no step at
    all: the input is returned unchanged.
    """
    n = len(sigmas) - 1
    if strength <= 0:
        return sigmas[-1:]
    t_enc = run - 1 if run is not None else int(min(strength, 0.999) * n)
    return sigmas[max(n - t_enc - 1, 0) :]


def fixed_steps(steps: int, strength: float) -> int:
    """Schedule length so that img2img at ``strength`` runs exactly ``steps`` steps.

    A1111's "do exactly the amount of steps the slider specifies" (always on for hires fix): a
    schedule of ``int(steps / strength)`` steps, of which the last ``steps`` run.
    """
    return int(steps / min(strength, 0.999)) if strength > 0 else steps
